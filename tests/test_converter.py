"""The converter on the real digits CNN: every path, the budget, auto, data and targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.errors import DataError, NoResultError, UnsupportedPathError
from edgefleet.converter.pipeline import convert
from edgefleet.converter.search import choose
from edgefleet.converter.slower import SLOWER_MARGIN, is_slower
from tests.conftest import Keys
from tests.models import TrainedModels


@dataclass(frozen=True)
class Data:
    calibration: Path
    eval: Path
    bad_calibration: Path


@pytest.fixture(scope="session")
def digits_data(digits_models: TrainedModels, tmp_path_factory: pytest.TempPathFactory) -> Data:
    out = tmp_path_factory.mktemp("data")
    d = digits_models.digits
    np.savez(out / "calib.npz", x=d.x_train[:200])
    np.savez(out / "eval.npz", x=d.x_test, labels=d.y_test)
    np.savez(out / "bad.npz", x=d.x_train[:200] * 0.01)  # ranges 100x too small
    return Data(out / "calib.npz", out / "eval.npz", out / "bad.npz")


def _config(model: Path, out: Path, keys: Keys, **kw: object) -> ConvertConfig:
    return ConvertConfig(model=model, output=out, sign_key=keys.secret, **kw)  # type: ignore[arg-type]


# (format, mode) -> ops that must appear, ops that must not, dtypes that must appear
EXPECTED = {
    ("tflite", "none"): ({"CONV_2D", "FULLY_CONNECTED"}, {"QUANTIZE", "DEQUANTIZE"}, {"float32"}),
    ("tflite", "fp16"): ({"CONV_2D", "DEQUANTIZE"}, {"QUANTIZE"}, {"float16", "float32"}),
    ("tflite", "dynamic"): ({"CONV_2D", "FULLY_CONNECTED"}, set(), {"int8", "float32"}),
    ("tflite", "int8"): ({"CONV_2D", "QUANTIZE", "DEQUANTIZE"}, set(), {"int8"}),
    ("onnx", "none"): ({"Conv", "MatMul"}, {"QuantizeLinear"}, {"float32"}),
    ("onnx", "fp16"): ({"Conv", "Cast"}, {"QuantizeLinear"}, {"float16"}),
    ("onnx", "dynamic"): ({"DynamicQuantizeLinear"}, set(), {"int8"}),
    ("onnx", "int8"): ({"QuantizeLinear", "DequantizeLinear", "Conv"}, set(), {"int8"}),
}


@pytest.mark.parametrize(("fmt", "mode"), sorted(EXPECTED))
def test_keras_converts_on_every_path(digits_models: TrainedModels, digits_data: Data,
                                      signing_keys: Keys, tmp_path: Path, fmt: str,
                                      mode: str) -> None:
    out = tmp_path / f"digits-{fmt}-{mode}.efb"
    report = convert(_config(digits_models.keras, out, signing_keys, format=fmt, quantize=mode,
                             calibration=digits_data.calibration, eval=digits_data.eval,
                             max_drop=1.0))
    chosen = report.chosen_attempt
    assert chosen is not None and report.output == str(out)
    must, must_not, dtypes = EXPECTED[(fmt, mode)]
    assert must <= set(chosen.ops), f"ops {sorted(chosen.ops)}"
    assert not must_not & set(chosen.ops)
    assert dtypes <= set(chosen.dtypes), f"dtypes {chosen.dtypes}"
    assert report.source_accuracy is not None and chosen.accuracy is not None
    assert report.source_accuracy - chosen.accuracy <= 0.01, "within 1 point of float"
    assert chosen.agreement["top1"] >= 0.98 and min(chosen.agreement["cosine"]) > 0.99
    bundle = read_bundle(out, signing_keys.trusted)
    assert bundle.manifest.optimization.quantization == mode
    assert bundle.manifest.metrics["accuracy"] == chosen.accuracy
    assert bundle.manifest.metrics["source_bytes"] == digits_models.keras.stat().st_size
    agent = Agent(signing_keys.trusted)
    agent.load(out)
    x, y = digits_models.digits.x_test, digits_models.digits.y_test
    probs = next(iter(agent.predict(x).values()))
    assert float((probs.argmax(1) == y).mean()) >= 0.95


def test_quantized_models_are_smaller(digits_models: TrainedModels, digits_data: Data,
                                      signing_keys: Keys, tmp_path: Path) -> None:
    sizes: dict[str, int] = {}
    for mode in ("none", "fp16", "int8"):
        report = convert(_config(digits_models.keras, tmp_path / f"{mode}.efb", signing_keys,
                                 quantize=mode, calibration=digits_data.calibration))
        sizes[mode] = report.chosen_attempt.size_bytes or 0  # type: ignore[union-attr]
    assert sizes["int8"] < sizes["fp16"] < sizes["none"]


def test_result_beyond_the_budget_is_not_written(digits_models: TrainedModels,
                                                 digits_data: Data, signing_keys: Keys,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "never.efb"
    with pytest.raises(NoResultError) as failed:
        convert(_config(digits_models.keras, out, signing_keys, quantize="int8",
                        calibration=digits_data.bad_calibration, eval=digits_data.eval,
                        max_drop=1.0))
    assert "exceeds the budget of 1.0 points" in str(failed.value)
    [attempt] = failed.value.report.attempts
    assert attempt.accuracy_drop_points is not None and attempt.accuracy_drop_points > 1.0
    assert not out.exists()


def test_auto_lists_every_attempt_and_keeps_the_smallest_within_budget(
        digits_models: TrainedModels, digits_data: Data, signing_keys: Keys,
        tmp_path: Path) -> None:
    report = convert(_config(digits_models.keras, tmp_path / "auto.efb", signing_keys,
                             quantize="auto", calibration=digits_data.bad_calibration,
                             eval=digits_data.eval, max_drop=1.0))
    labels = [a.label for a in report.attempts]
    assert labels[:2] == ["int8", "dynamic"], "full int8, then the next smallest recipe"
    assert "exceeds the budget" in report.attempts[0].reason
    assert all(a.recipe and a.agreement.get("worst") for a in report.attempts)
    chosen = choose(report.attempts)
    assert chosen is not None and report.chosen == chosen.label


def test_auto_stops_at_int8_when_it_fits(digits_models: TrainedModels, digits_data: Data,
                                         signing_keys: Keys, tmp_path: Path) -> None:
    report = convert(_config(digits_models.keras, tmp_path / "auto.efb", signing_keys,
                             quantize="auto", calibration=digits_data.calibration,
                             eval=digits_data.eval, max_drop=1.0))
    labels = [a.label for a in report.attempts]
    assert labels == ["int8", "dynamic"], "no mixed or fp16 once full int8 passed"
    chosen = choose(report.attempts)
    assert chosen is not None and report.chosen == chosen.label


def test_data_of_the_wrong_shape_names_expected_and_given(
        digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path) -> None:
    bad = tmp_path / "flat.npy"
    np.save(bad, np.zeros((10, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"expects shape \['N', 8, 8, 1\] dtype float32, "
                       r"given shape \[10, 8, 8\] dtype float32"):
        convert(_config(digits_models.keras, tmp_path / "x.efb", signing_keys,
                        quantize="int8", calibration=bad))


def test_data_of_the_wrong_dtype_is_named(digits_models: TrainedModels, signing_keys: Keys,
                                          tmp_path: Path) -> None:
    bad = tmp_path / "complex.npy"
    np.save(bad, np.zeros((10, 8, 8, 1), np.complex64))
    with pytest.raises(DataError, match=r"expects dtype float32, given complex64"):
        convert(_config(digits_models.keras, tmp_path / "x.efb", signing_keys,
                        quantize="int8", calibration=bad))


def test_an_image_folder_is_resized_scaled_and_labelled(
        digits_models: TrainedModels, digits_data: Data, signing_keys: Keys,
        tmp_path: Path) -> None:
    from PIL import Image

    x, y = digits_models.digits.x_test[:40], digits_models.digits.y_test[:40]
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = tmp_path / "images" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray((img[..., 0] * 255).astype(np.uint8)).resize((32, 32))
        big.save(folder / f"{i}.png")
    report = convert(_config(digits_models.keras, tmp_path / "img.efb", signing_keys,
                             quantize="int8", calibration=digits_data.calibration,
                             eval=tmp_path / "images"))
    assert report.eval_samples == 40
    assert report.source_accuracy is not None and report.source_accuracy > 0.8


def test_coral_target_reports_every_violation(digits_models: TrainedModels, digits_data: Data,
                                              signing_keys: Keys, tmp_path: Path) -> None:
    out = tmp_path / "coral.efb"
    with pytest.raises(NoResultError) as failed:
        convert(_config(digits_models.keras, out, signing_keys, quantize="int8",
                        calibration=digits_data.calibration, targets=("coral-edgetpu",)))
    kinds = {v["kind"] for v in failed.value.report.attempts[0].violations}
    assert {"dtype", "op"} <= kinds
    op = next(v for v in failed.value.report.attempts[0].violations if v["kind"] == "op")
    assert "SHAPE" in op["message"] and op["nodes"], "the offending nodes are named"
    assert not out.exists()


def test_onnx_source_quantizes_to_int8(digits_models: TrainedModels, digits_data: Data,
                                       signing_keys: Keys, tmp_path: Path) -> None:
    report = convert(_config(digits_models.onnx, tmp_path / "o.efb", signing_keys,
                             format="onnx", quantize="int8",
                             calibration=digits_data.calibration, eval=digits_data.eval))
    chosen = report.chosen_attempt
    assert chosen is not None and "QuantizeLinear" in chosen.ops
    assert report.source_accuracy is not None and chosen.accuracy is not None
    assert report.source_accuracy - chosen.accuracy <= 0.01


def test_onnx_dynamic_slower_than_float_is_warned_and_refused_by_a_strict_profile(
        digits_models: TrainedModels, digits_data: Data, signing_keys: Keys,
        tmp_path: Path) -> None:
    report = convert(_config(digits_models.onnx, tmp_path / "dyn.efb", signing_keys,
                             format="onnx", quantize="dynamic", eval=digits_data.eval))
    chosen = report.chosen_attempt
    assert chosen is not None
    assert chosen.latency_p50_ms is not None and chosen.reference_latency_p50_ms is not None
    slower = is_slower(chosen.latency_p50_ms, chosen.reference_latency_p50_ms)
    assert bool(chosen.warnings) == slower
    if slower:
        with pytest.raises(NoResultError, match="slower than its source"):
            convert(_config(digits_models.onnx, tmp_path / "strict.efb", signing_keys,
                            format="onnx", quantize="dynamic", eval=digits_data.eval,
                            targets=("jetson-orin-nano",)))


@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_float_tflite_is_quantized_with_the_litert_quantizer(
        digits_models: TrainedModels, digits_data: Data, signing_keys: Keys, tmp_path: Path,
        mode: str) -> None:
    report = convert(_config(digits_models.tflite, tmp_path / f"q-{mode}.efb", signing_keys,
                             quantize=mode, calibration=digits_data.calibration,
                             eval=digits_data.eval, max_drop=1.0))
    chosen = report.chosen_attempt
    assert chosen is not None and "int8" in chosen.dtypes
    assert chosen.size_bytes is not None and chosen.size_bytes < report.source_bytes * 0.5


def test_signature_less_tflite_gets_a_signature(digits_models: TrainedModels) -> None:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from edgefleet.converter.litert_quantizer import ensure_signature

    raw = digits_models.tflite.read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))
    model.signatureDefs = []
    builder = flatbuffers.Builder(len(raw))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    bare = bytes(builder.Output())
    signed = schema.Model.GetRootAsModel(ensure_signature(bare), 0)
    assert schema.Model.GetRootAsModel(bare, 0).SignatureDefsLength() == 0
    assert signed.SignatureDefsLength() == 1
    assert signed.SignatureDefs(0).SignatureKey() == b"serving_default"


def test_paths_not_offered_say_why(digits_models: TrainedModels, signing_keys: Keys,
                                   tmp_path: Path) -> None:
    with pytest.raises(UnsupportedPathError, match="onnx -> tflite is not offered"):
        convert(_config(digits_models.onnx, tmp_path / "x.efb", signing_keys, format="tflite"))


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="quantize must be one of"):
        ConvertConfig(Path("m.keras"), Path("o.efb"), Path("k.key"),
                      quantize="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sparsity must be between 0 and 1"):
        ConvertConfig(Path("m.keras"), Path("o.efb"), Path("k.key"), prune=1.5)


@pytest.fixture(scope="session")
def tune_data(digits_models: TrainedModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "tune.npz"
    np.savez(path, x=digits_models.digits.x_train, labels=digits_models.digits.y_train)
    return path


def test_pruning_with_fine_tune_reaches_the_sparsity_within_budget(
        digits_models: TrainedModels, digits_data: Data, signing_keys: Keys, tune_data: Path,
        tmp_path: Path) -> None:
    plain = convert(_config(digits_models.keras, tmp_path / "plain.efb", signing_keys,
                            quantize="int8", calibration=digits_data.calibration,
                            eval=digits_data.eval))
    report = convert(_config(digits_models.keras, tmp_path / "pruned.efb", signing_keys,
                             quantize="int8", calibration=digits_data.calibration,
                             eval=digits_data.eval, prune=0.75, fine_tune_data=tune_data,
                             fine_tune_epochs=3, max_drop=1.0))
    pruning = report.pruning
    assert pruning["fine_tuned_epochs"] == 3
    assert abs(pruning["sparsity"] - 0.75) < 0.01
    assert all(abs(s - 0.75) < 0.02 for s in pruning["per_layer"].values())
    assert len(pruning["per_layer"]) == 3, "two convolutions and the dense layer"
    pruned, base = report.chosen_attempt, plain.chosen_attempt
    assert pruned is not None and base is not None
    assert pruned.gzip_bytes is not None and base.gzip_bytes is not None
    assert pruned.gzip_bytes < base.gzip_bytes * 0.8, "pruned weights compress"
    bundle = read_bundle(tmp_path / "pruned.efb", signing_keys.trusted)
    assert bundle.manifest.optimization.sparsity == pytest.approx(pruning["sparsity"])


def test_post_training_pruning_backs_off_to_stay_within_budget(
        digits_models: TrainedModels, digits_data: Data, signing_keys: Keys,
        tmp_path: Path) -> None:
    report = convert(_config(digits_models.keras, tmp_path / "pt.efb", signing_keys,
                             eval=digits_data.eval, prune=0.9, max_drop=1.0))
    assert report.pruning["drop_points"] <= 1.0
    assert report.pruning["sparsity"] < 0.9, "90% without fine-tuning breaks the budget"
    assert report.pruning["target"] == 0.9


def test_pruning_a_non_keras_model_is_refused(digits_models: TrainedModels,
                                               signing_keys: Keys, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedPathError, match="pruning needs a Keras model"):
        convert(_config(digits_models.onnx, tmp_path / "x.efb", signing_keys, format="onnx",
                        prune=0.5))


def test_guard_compares_a_keras_conversion_with_its_float_export(
        digits_models: TrainedModels, digits_data: Data, signing_keys: Keys,
        tmp_path: Path) -> None:
    report = convert(_config(digits_models.keras, tmp_path / "q.efb", signing_keys,
                             format="onnx", quantize="int8", calibration=digits_data.calibration))
    chosen = report.chosen_attempt
    assert chosen is not None and chosen.latency_p50_ms is not None
    assert report.float_latency_p50_ms is not None, "the float export was measured"
    assert chosen.reference_latency_p50_ms is not None
    slower = is_slower(chosen.latency_p50_ms, chosen.reference_latency_p50_ms)
    assert any("slower than the float conversion" in w for w in chosen.warnings) == slower


def test_slower_means_beyond_the_measurement_margin() -> None:
    assert SLOWER_MARGIN == 0.03
    assert not is_slower(1.0, 1.0) and not is_slower(1.03, 1.0)
    assert is_slower(1.031, 1.0) and is_slower(3.1, 1.0)


def test_onnx_int8_has_uint8_activations_and_no_leftover_shape_annotations(
        digits_models: TrainedModels, digits_data: Data) -> None:
    import onnx

    from edgefleet.converter.data import load_dataset
    from edgefleet.converter.onnx_backend import quantize_onnx
    from edgefleet.converter.sources import load_source

    source = load_source(digits_models.onnx)
    data = load_dataset(digits_data.calibration, source.inputs)
    model = onnx.load_model_from_string(quantize_onnx(digits_models.onnx.read_bytes(), "int8",
                                                      data))
    zero_points = {i.name: i.data_type for i in model.graph.initializer}
    activations = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and {zero_points[z] for z in activations} == {onnx.TensorProto.UINT8}
    weights = [n.input[2] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in zero_points and zero_points[n.input[0]] == onnx.TensorProto.INT8]
    assert weights, "weights stay int8 (per channel)"
    assert len(model.graph.value_info) == 0
