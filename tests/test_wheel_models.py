"""Published models from PyPI wheels: each converts within its budget or fails by name.

PP-OCR's text-direction classifier and text detector (ONNX, from rapidocr), and
mediapipe's short-range face detector (float TFLite with float16 weights and no
signature), calibrated on scikit-image's pictures. These never skip in CI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.core import Agent
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.errors import NoResultError
from edgefleet.converter.pipeline import convert
from edgefleet.converter.report import ConversionReport
from tests import wheel_models
from tests.conftest import Keys

# A failure must say why in one of these ways; anything else is a bug.
NAMED_REASONS = ("exceeds the budget", "did not make the model smaller", "cannot load the model",
                 "is not offered")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wheel_models.sample_images(tmp_path_factory.mktemp("skimage"))


def _convert(key: str, tmp_path: Path, keys: Keys, images: Path,
             **kw: object) -> ConversionReport | NoResultError:
    config = ConvertConfig(model=wheel_models.model(key), output=tmp_path / f"{key}.efb",
                           sign_key=keys.secret, calibration=images, **kw)  # type: ignore[arg-type]
    try:
        return convert(config)
    except NoResultError as failed:
        return failed


def _check_contract(result: ConversionReport | NoResultError, keys: Keys) -> None:
    if isinstance(result, NoResultError):
        assert not Path(str(result.report.output or "none")).exists()
        for attempt in result.report.attempts:
            assert any(r in attempt.reason for r in NAMED_REASONS), attempt.reason
        return
    chosen = result.chosen_attempt
    assert chosen is not None and result.output is not None
    assert chosen.size_bytes is not None
    assert chosen.size_bytes < result.source_bytes or chosen.kept_source, "fp16 may keep float16"
    Agent(keys.trusted).load(Path(result.output))  # verifies, loads, passes its health check


def test_ppocr_classifier_int8_within_two_points_or_named(
        tmp_path: Path, signing_keys: Keys, images: Path) -> None:
    result = _convert("ppocr-cls", tmp_path, signing_keys, images, format="onnx",
                      quantize="int8", scale="-1-1", max_drop=2.0)
    _check_contract(result, signing_keys)
    report = result.report if isinstance(result, NoResultError) else result
    assert all(a.reason for a in report.attempts), "every attempt says why"
    assert report.attempts[0].agreement["worst"], "the worst output is named"


@pytest.mark.timeout(600)  # a search: int8, weight-only and dynamic, each measured
def test_auto_on_a_float16_mediapipe_model_returns_a_result_within_the_default_budget(
        tmp_path: Path, signing_keys: Keys, images: Path) -> None:
    """A float .tflite source searches ai-edge-quantizer's recipes; without --max-drop the
    default budget (1 point) holds whatever is written."""
    calibration, evaluation = wheel_models.domain_images("people", tmp_path, count=8)
    result = _convert("face-detection", tmp_path, signing_keys, calibration, quantize="auto",
                      scale="-1-1", eval=evaluation, search_budget=120.0)
    assert isinstance(result, ConversionReport), result
    chosen = result.chosen_attempt
    assert chosen is not None and chosen.accuracy_drop_points is not None
    assert chosen.accuracy_drop_points <= 1.0
    assert all(a.recipe for a in result.attempts)
    _check_contract(result, signing_keys)


def test_ppocr_detector_int8_within_budget_or_named(tmp_path: Path, signing_keys: Keys,
                                                    images: Path) -> None:
    result = _convert("ppocr-det", tmp_path, signing_keys, images, format="onnx",
                      quantize="int8", max_drop=2.0)
    _check_contract(result, signing_keys)
    report = result.report if isinstance(result, NoResultError) else result
    attempt = report.attempts[0]
    assert attempt.agreement["cosine"], "agreement was measured on the pictures"
    assert "QuantizeLinear" in attempt.ops


def test_mediapipe_face_detector_int8_loads_with_symmetric_weights(images: Path) -> None:
    """mediapipe writes operator codes in the old schema field only; unnormalized, the
    quantizer took every operator for ADD and quantized convolution weights as activations
    (zero point != 0), which LiteRT refused to load."""
    from ai_edge_litert import schema_py_generated as schema

    from edgefleet.agent.runtime.select import load_runtime
    from edgefleet.converter import litert_quantizer
    from edgefleet.converter.data import load_dataset
    from edgefleet.converter.sources import load_source

    path = wheel_models.model("face-detection")
    raw = path.read_bytes()
    codes = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0)).operatorCodes
    assert any(c.deprecatedBuiltinCode > c.builtinCode for c in codes), "the case being fixed"
    fixed = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(
        litert_quantizer.normalize_opcodes(raw), 0)).operatorCodes
    assert all(c.builtinCode == c.deprecatedBuiltinCode for c in fixed)
    data = load_dataset(images, load_source(path).inputs, "-1-1").take(8)
    quantized = litert_quantizer.quantize_tflite(raw, "int8", data)
    assert len(quantized) < len(raw), "the float16 copies of folded weights are dropped"
    root = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(quantized, 0))
    graph, conv = root.subgraphs[0], schema.BuiltinOperator.CONV_2D
    convs = [op for op in graph.operators if root.operatorCodes[op.opcodeIndex].builtinCode == conv]
    for op in convs:
        weights = graph.tensors[op.inputs[1]].quantization
        assert weights.zeroPoint is not None and not any(weights.zeroPoint)
        assert len(weights.scale) > 1, "per-channel"
    assert convs and load_runtime(quantized, "tflite").outputs


@pytest.mark.parametrize("mode", ["dynamic", "int8", "fp16"])
def test_mediapipe_face_detector_within_budget_or_named(tmp_path: Path, signing_keys: Keys,
                                                        images: Path, mode: str) -> None:
    result = _convert("face-detection", tmp_path, signing_keys, images, quantize=mode,
                      scale="-1-1", max_drop=2.0)
    _check_contract(result, signing_keys)
