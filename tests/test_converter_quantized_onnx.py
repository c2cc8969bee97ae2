"""An ONNX source that is quantized already (QDQ, QOperator, dynamic) as a user converts it:
refused as not smaller, saying the source is quantized already, with ``--quantize none`` as
the hint; and that hint packages it as it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.converter.quantized_source import onnx_quantization_ops
from tests.conftest import Keys

FORMS = ("qdq", "qoperator", "dynamic")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True,
                          text=True, timeout=300, check=False,
                          env={**os.environ, "COLUMNS": "200"})


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """Calibration rows for ONNX Runtime's quantize_static, one sample a call."""

    def __init__(self, x: np.ndarray) -> None:
        self.rows = iter([{"x": x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.rows, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float MatMul + Add model of 64 features, its calibration data, and the three
    quantized forms ONNX Runtime writes of it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    out = tmp_path_factory.mktemp("quantized-onnx")
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(rng.normal(size=(64, 16)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    paths = {name: out / f"{name}.onnx" for name in ("float", *FORMS)}
    onnx.save(model, paths["float"])
    x = rng.normal(size=(32, 64)).astype(np.float32)
    np.savez(out / "calib.npz", x=x)
    for form, layout in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        quantize_static(str(paths["float"]), str(paths[form]), _Reader(x),
                        quant_format=layout, weight_type=QuantType.QInt8)
    quantize_dynamic(str(paths["float"]), str(paths["dynamic"]), weight_type=QuantType.QInt8)
    return {**paths, "calibration": out / "calib.npz"}


def test_the_quantization_operators_of_each_form_are_found_and_none_in_the_float_model(
        models: dict[str, Path]) -> None:
    assert onnx_quantization_ops(models["float"].read_bytes()) == []
    assert onnx_quantization_ops(models["qdq"].read_bytes()) == ["DequantizeLinear",
                                                                 "QuantizeLinear"]
    assert "QLinearMatMul" in onnx_quantization_ops(models["qoperator"].read_bytes())
    assert "MatMulInteger" in onnx_quantization_ops(models["dynamic"].read_bytes())


@pytest.mark.parametrize(("form", "mode"), [("qdq", "int8"), ("qoperator", "int8"),
                                          ("dynamic", "dynamic"), ("qdq", "fp16")])
def test_a_quantized_onnx_source_is_refused_as_not_smaller_and_the_hint_packages_it(
        models: dict[str, Path], signing_keys: Keys, tmp_path: Path, form: str,
        mode: str) -> None:
    """Was a traceback-like failure ('two nodes with same node name' for int8 of a QDQ
    model, float16 scales for fp16) or 'nothing it quantizes was found' for dynamic."""
    refused = tmp_path / "again.efb"
    result = _run("convert", str(models[form]), "-o", str(refused), "--format", "onnx",
                  "--quantize", mode, "--calibration", str(models["calibration"]),
                  "--sign-key", str(signing_keys.secret))
    assert result.returncode == 1, result.stderr
    error = " ".join(result.stderr.split())
    assert f"{mode} did not make the model smaller: the source is quantized already (its " \
           "graph holds" in error
    assert f"{mode} finds nothing left to quantize (the result is the source unchanged)" in error
    assert "fix: package it as it is with --quantize none" in error
    assert "try: --quantize none (the source is quantized already" in result.stdout
    assert not refused.exists()

    kept = tmp_path / "kept.efb"
    result = _run("convert", str(models[form]), "-o", str(kept), "--format", "onnx",
                  "--quantize", "none", "--calibration", str(models["calibration"]),
                  "--sign-key", str(signing_keys.secret))
    assert result.returncode == 0, result.stderr
    bundle = read_bundle(kept, signing_keys.trusted)
    assert bundle.manifest.optimization.quantization == "source (quantized already)"
    assert set(onnx_quantization_ops(bundle.files["model.onnx"])) == \
        set(onnx_quantization_ops(models[form].read_bytes()))


def test_a_float16_onnx_source_is_kept_as_float16_and_int8_says_how(
        models: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    """The converter's own fp16 result fed back in: fp16 keeps it (was 'two nodes with same
    node name'), dynamic says what works instead (was a hint to the failing fp16)."""
    from edgefleet.converter.onnx_backend import quantize_onnx, stores_float16_onnx

    half = quantize_onnx(models["float"].read_bytes(), "fp16")
    assert stores_float16_onnx(half) and not stores_float16_onnx(models["float"].read_bytes())
    source = tmp_path / "half.onnx"
    source.write_bytes(half)
    result = _run("convert", str(source), "-o", str(tmp_path / "d.efb"), "--format", "onnx",
                  "--quantize", "dynamic", "--sign-key", str(signing_keys.secret))
    assert result.returncode == 1
    error = " ".join(result.stderr.split())
    assert "stores float16 weights is not offered" in error
    assert "fix: keep float16 with --quantize fp16" in error
    kept = tmp_path / "kept.efb"
    result = _run("convert", str(source), "-o", str(kept), "--format", "onnx", "--quantize",
                  "fp16", "--sign-key", str(signing_keys.secret), "--json")
    assert result.returncode == 0, result.stderr
    bundle = read_bundle(kept, signing_keys.trusted)
    assert bundle.files["model.onnx"] == half
    import json

    [attempt] = json.loads(result.stdout)["attempts"]
    assert attempt["recipe"] == "float16 (kept)" and attempt["kept_source"]
    assert not [w for w in attempt["warnings"] if "slower" in w]  # not against itself
