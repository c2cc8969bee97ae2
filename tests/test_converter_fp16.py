"""ONNX float16 keeps in float32 what float16 cannot hold.

The model is built here the way a published text detector is: a convolution whose
activations reach ~1e5 (beyond float16's 65,504) and a batch norm whose variance, 1e10,
is a Constant node. Converted whole, float16 clips both and the output is garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.data import Dataset
from edgefleet.converter.onnx_backend import FP16_MAX, quantize_onnx
from edgefleet.converter.report import ConversionReport


def _overflowing_model() -> bytes:
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((4, 3, 3, 3)) * 2e4).astype(np.float32)
    variance = np.full(4, 1e10, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["var"], value=numpy_helper.from_array(variance)),
        helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    inits = [numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(np.ones(4, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(4, np.float32), "bias"),
             numpy_helper.from_array(np.zeros(4, np.float32), "mean")]
    graph = helper.make_graph(nodes, "overflow",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0], np.float64).ravel()


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Relative RMS error of ``b`` against ``a`` (a cosine would miss a scale error)."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def data() -> Dataset:
    return Dataset({"x": np.random.default_rng(1).uniform(-1, 1, (6, 3, 8, 8))
                    .astype(np.float32)})


def test_the_model_breaks_float16_converted_whole(data: Dataset) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _overflowing_model()
    probe = onnx.load_from_string(model)
    probe.graph.output.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, None))
    conv = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(conv.run(["conv"], {"x": data.inputs["x"][:1]})[0]).max() > FP16_MAX
    whole = convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True)
    x = data.inputs["x"][:1]
    broken = _run(whole.SerializeToString(), x)
    assert not np.isfinite(broken).all() or _rel_error(_run(model, x), broken) > 10


def test_fp16_keeps_overflowing_nodes_float32_and_agrees(data: Dataset) -> None:
    model = _overflowing_model()
    converted = quantize_onnx(model, "fp16", data)
    graph = onnx.load_from_string(converted).graph
    casts = [n for n in graph.node if n.op_type == "Cast"]
    assert len(casts) <= 4, "no float32 -> float16 -> float32 round trip between kept nodes"
    for x in data.inputs["x"]:
        assert _rel_error(_run(model, x[None]), _run(converted, x[None])) < 1e-2


def test_fp16_without_data_still_keeps_a_constant_beyond_float16(data: Dataset) -> None:
    model = _overflowing_model()
    converted = quantize_onnx(model, "fp16")
    outputs = [_run(converted, x[None]) for x in data.inputs["x"]]
    assert all(np.isfinite(o).all() for o in outputs), "the variance was not clipped to inf/0"


def test_fp16_weights_held_in_constant_nodes_are_stored_as_two_bytes_each() -> None:
    weight = np.random.default_rng(3).standard_normal((128, 128)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = model.SerializeToString()
    converted = quantize_onnx(source, "fp16")
    values = [a.t for n in onnx.load_from_string(converted).graph.node for a in n.attribute
              if a.name == "value"]
    assert [v.data_type for v in values] == [TensorProto.FLOAT16]
    assert len(values[0].raw_data) == weight.size * 2
    assert len(converted) < 0.55 * len(source)
    x = np.random.default_rng(4).standard_normal((1, 128)).astype(np.float32)
    assert _rel_error(np.asarray(x @ weight, np.float64).ravel(), _run(converted, x)) < 1e-2



def test_fp16_keeps_a_graph_output_beyond_float16_whole(data: Dataset) -> None:
    """The kept node makes the graph output itself: no float16 on its way out either."""
    weight = (np.random.default_rng(5).standard_normal((4, 3, 3, 3)) * 2e4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "big-output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = bytes(model.SerializeToString())
    converted = quantize_onnx(source, "fp16", data)
    for x in data.inputs["x"]:
        expected = _run(source, x[None])
        assert np.abs(expected).max() > FP16_MAX
        assert _rel_error(expected, _run(converted, x[None])) < 1e-3


@pytest.mark.parametrize("drop", [float("nan"), float("inf"), 0.0])
def test_outputs_that_come_out_not_finite_are_refused_never_accepted(drop: float) -> None:
    """A NaN drop compared as within any budget (NaN > 1 is false): a result whose outputs
    are NaN was written with exit 0. Not finite, in the drop or the worst score, is refused."""
    from types import SimpleNamespace

    from edgefleet.converter.judge import judge
    from edgefleet.converter.report import Attempt, Verdict

    attempt = Attempt("fp16", "fp16", size_bytes=10, accuracy_drop_points=drop)
    attempt.agreement = {"worst_score": float("nan") if drop == 0.0 else 0.5}
    config = ConvertConfig(model=Path("m.onnx"), output=Path("o.efb"), sign_key=Path("k.key"),
                           max_drop=100.0)
    source = SimpleNamespace(kind="onnx", size_bytes=100)
    judge(SimpleNamespace(config=config, source=source), attempt)  # type: ignore[arg-type]
    assert attempt.verdict is Verdict.NOT_FINITE and not attempt.accepted
    assert "not finite" in attempt.reason
    report = ConversionReport("m.onnx", "onnx", "onnx", "fp16", 100, attempts=[attempt])
    for data in (report.as_dict(), report.metrics()):  # strict JSON: no NaN, no Infinity
        json.loads(json.dumps(data), parse_constant=_refuse)


def _refuse(constant: str) -> None:
    raise AssertionError(f"{constant} in JSON")


# --- data the converter is given (from the outside view: tracebacks before) -------------------

def test_a_scale_that_does_not_exist_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"scale must be one of .*'0-2'"):
        ConvertConfig(model=Path("m.onnx"), output=Path("o.efb"), sign_key=Path("k.key"),
                      scale="0-2")  # type: ignore[arg-type]


@pytest.mark.parametrize(("labels", "says"), [
    (np.arange(4), r"'labels' has shape \[4\] for 6 samples"),
    (np.full(6, 0.5), r"'labels' are float64, not class indices"),
])
def test_labels_that_do_not_fit_the_samples_are_refused_by_name(
        tmp_path: Path, labels: np.ndarray, says: str) -> None:
    from edgefleet.agent.runtime.base import TensorInfo
    from edgefleet.converter.data import load_dataset
    from edgefleet.converter.errors import DataError

    np.savez(tmp_path / "eval.npz", x=np.zeros((6, 3, 8, 8), np.float32), labels=labels)
    with pytest.raises(DataError, match=says):
        load_dataset(tmp_path / "eval.npz", [TensorInfo("x", (1, 3, 8, 8), "float32")])


def test_whole_float_labels_are_read_as_class_indices(tmp_path: Path) -> None:
    from edgefleet.agent.runtime.base import TensorInfo
    from edgefleet.converter.data import load_dataset

    np.savez(tmp_path / "eval.npz", x=np.zeros((3, 3, 8, 8), np.float32),
             labels=np.array([0.0, 2.0, 1.0]))
    found = load_dataset(tmp_path / "eval.npz", [TensorInfo("x", (1, 3, 8, 8), "float32")])
    assert found.labels is not None and found.labels.tolist() == [0, 2, 1]
    assert found.labels.dtype.kind == "i"
