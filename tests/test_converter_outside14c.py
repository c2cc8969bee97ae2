"""What the outside view 14c found on ONNX sources: non-numeric outputs (a string Cast,
scikit-learn's ZipMap), inputs declared at shapes edgefleet cannot feed, several inputs of
different sample counts or batches, and weights kept as external data. Each on a tiny ONNX
graph made here, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.runtime.base import TensorInfo
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.data import load_dataset
from edgefleet.converter.errors import (
    ConversionFailedError,
    DataError,
    NoResultError,
    SourceModelError,
    UnsupportedPathError,
)
from edgefleet.converter.onnx_backend import quantize_onnx
from edgefleet.converter.pipeline import convert
from tests.conftest import Keys

vi = helper.make_tensor_value_info


def _save(graph: onnx.GraphProto, path: Path, opsets: dict[str, int] | None = None,
          **kw: object) -> Path:
    imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    onnx.save(model, str(path), **kw)  # type: ignore[arg-type]
    return path


def _weight(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def _config(model: Path, out: Path, keys: Keys, **kw: object) -> ConvertConfig:
    return ConvertConfig(model=model, output=out, sign_key=keys.secret, format="onnx",
                         **kw)  # type: ignore[arg-type]


def _x16(path: Path, rows: int = 120) -> Path:
    np.save(path, np.random.default_rng(4).standard_normal((rows, 16)).astype(np.float32))
    return path


def _json_error(args: list[str]) -> dict[str, str]:
    """``edgefleet ARGS`` run as a user runs it: exit non-zero, no traceback, one JSON
    error document on stdout."""
    result = subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    document: dict[str, str] = json.loads(result.stdout)
    return document


# --- F10 / F17: outputs that are not numeric tensors are refused up front ---------------------

def _string_output(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["y"]),
         helper.make_node("Cast", ["y"], ["s"], to=TensorProto.STRING)], "g",
        [vi("x", TensorProto.FLOAT, ["N", 16])],
        [vi("y", TensorProto.FLOAT, ["N", 32]), vi("s", TensorProto.STRING, ["N", 32])],
        [_weight("W1", (16, 32))])
    return _save(graph, path)


def _zipmap(path: Path) -> Path:
    """scikit-learn's classifier shape: an int64 label and ZipMap's sequence<map<int64,float>>
    of probabilities (ONNX Runtime's datasets/logreg_iris.onnx)."""
    classifier = helper.make_node(
        "LinearClassifier", ["x"], ["label", "scores"], domain="ai.onnx.ml",
        classlabels_ints=[0, 1, 2], coefficients=[0.2, -0.1, 0.4, 0.3, -0.5, 0.1],
        intercepts=[0.1, -0.2, 0.05], post_transform="SOFTMAX")
    zipmap = helper.make_node("ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml",
                              classlabels_int64s=[0, 1, 2])
    probabilities = helper.make_value_info("probabilities", helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64,
                                   helper.make_tensor_type_proto(TensorProto.FLOAT, None))))
    graph = helper.make_graph([classifier, zipmap], "g", [vi("x", TensorProto.FLOAT, ["N", 2])],
                              [vi("label", TensorProto.INT64, ["N"]), probabilities])
    return _save(graph, path, {"": 17, "ai.onnx.ml": 1})


def test_a_string_output_is_refused_before_any_work_naming_it(signing_keys: Keys,
                                                               tmp_path: Path) -> None:
    """It converted, was measured, then crashed writing health.npz (object arrays)."""
    model = _string_output(tmp_path / "str.onnx")
    for mode in ("none", "int8"):
        with pytest.raises(SourceModelError, match=r"output 's' is tensor\(string\)") as found:
            convert(_config(model, tmp_path / "s.efb", signing_keys, quantize=mode,
                            calibration=_x16(tmp_path / "x.npy")))
        assert "remove 's' from the graph's outputs" in (found.value.hint or "")
    assert not (tmp_path / "s.efb").exists()


def test_a_zipmap_output_is_refused_with_the_skl2onnx_fix(signing_keys: Keys,
                                                          tmp_path: Path) -> None:
    model = _zipmap(tmp_path / "logreg.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((30, 2)).astype(np.float32))
    document = _json_error(["convert", str(model), "-o", str(tmp_path / "t.efb"), "--format",
                            "onnx", "--sign-key", str(signing_keys.secret), "--calibration",
                            str(tmp_path / "x.npy"), "--json"])
    assert document["error"] == "SourceModelError"
    assert "output 'probabilities' is sequence<map<int64,float>>" in document["message"]
    assert "{'zipmap': False}" in document["hint"]


def _ml_only(path: Path) -> Path:
    """A scikit-learn classifier without ZipMap, importing only the ai.onnx.ml opset."""
    classifier = helper.make_node(
        "LinearClassifier", ["x"], ["label", "scores"], domain="ai.onnx.ml",
        classlabels_ints=[0, 1, 2], coefficients=[0.2, -0.1, 0.4, 0.3, -0.5, 0.1],
        intercepts=[0.1, -0.2, 0.05], post_transform="SOFTMAX")
    graph = helper.make_graph([classifier], "g", [vi("x", TensorProto.FLOAT, ["N", 2])],
                              [vi("label", TensorProto.INT64, ["N"]),
                               vi("scores", TensorProto.FLOAT, ["N", 3])])
    return _save(graph, path, {"ai.onnx.ml": 1})


def test_an_ml_only_model_is_described_as_such_not_as_opset_0(signing_keys: Keys,
                                                              tmp_path: Path) -> None:
    model = _ml_only(tmp_path / "ml.onnx")
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).random((30, 2)).astype(np.float32) * 5)
    with pytest.raises(NoResultError) as found:
        convert(_config(model, tmp_path / "t.efb", signing_keys, quantize="int8",
                        calibration=data))
    assert "imports only the operator set ai.onnx.ml v1" in found.value.message
    assert "opset 0" not in found.value.message
    assert "--quantize none" in (found.value.hint or "")
    with pytest.raises(ConversionFailedError, match="imports only the operator set ai.onnx.ml"):
        quantize_onnx(model.read_bytes(), "dynamic")
    report = convert(_config(model, tmp_path / "t.efb", signing_keys, calibration=data))
    assert report.chosen == "none"


# --- F12: declared input shapes edgefleet cannot feed are refused up front --------------------

def _relu_sum(path: Path, shape: list[int | str]) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                               helper.make_node("ReduceSum", ["r"], ["y"], keepdims=1)], "g",
                              [vi("x", TensorProto.FLOAT, shape)],
                              [vi("y", TensorProto.FLOAT, None)], [])
    return _save(graph, path)


@pytest.mark.parametrize(("shape", "says"), [
    (["N", 2**40], r"input 'x' declares dims \[-1, 1099511627776\] = 1,099,511,627,776 numbers "
                   r"a call .* above the 16,777,216"),
    ([16], r"input 'x' has dims \[16\]: one dim, fixed at 16, so no batch dim"),
    (["N", 0], r"input 'x' has dims \[-1, 0\]: dim 1 is 0"),
    ([], r"input 'x' is a single number \(rank 0, dims \[\]\)"),
    ([1, 8192, 4096], r"input 'x' declares dims \[1, 8192, 4096\] = 33,554,432 numbers"),
])
def test_declared_input_shapes_that_cannot_be_fed_are_refused(
        signing_keys: Keys, tmp_path: Path, shape: list[int | str], says: str) -> None:
    """Were a MemoryError traceback, an ONNX Runtime traceback, or blamed on the data."""
    model = _relu_sum(tmp_path / "m.onnx", shape)
    with pytest.raises(UnsupportedPathError, match=says) as found:
        convert(_config(model, tmp_path / "t.efb", signing_keys))
    assert "export the model" in (found.value.hint or "")


@pytest.mark.parametrize("shape", [["N"], [1], [1, 16000], ["N", "T", 3]])
def test_declared_shapes_edgefleet_feeds_still_convert(signing_keys: Keys, tmp_path: Path,
                                                       shape: list[int | str]) -> None:
    """A number a sample ([N]), a fixed batch of one, one second of 16 kHz audio (a dim
    above --input-shape's 8192, within the numbers a call)."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [vi("x", TensorProto.FLOAT, shape)],
                              [vi("y", TensorProto.FLOAT, shape)], [])
    model = _save(graph, tmp_path / "m.onnx")
    report = convert(_config(model, tmp_path / "t.efb", signing_keys))
    assert report.chosen == "none"


def test_a_huge_declared_dim_under_json_is_a_json_error(signing_keys: Keys,
                                                        tmp_path: Path) -> None:
    model = _relu_sum(tmp_path / "huge.onnx", ["N", 2**40])
    document = _json_error(["convert", str(model), "-o", str(tmp_path / "t.efb"), "--format",
                            "onnx", "--sign-key", str(signing_keys.secret), "--json"])
    assert document["error"] == "UnsupportedPathError" and "'x'" in document["message"]


# --- F18: several inputs -----------------------------------------------------------------------

def _two_inputs(path: Path, a: list[int | str], b: list[int | str]) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "Wa"], ["pa"]),
         helper.make_node("MatMul", ["b", "Wb"], ["pb"]),
         helper.make_node("Add", ["pa", "pb"], ["y"])], "g",
        [vi("a", TensorProto.FLOAT, a), vi("b", TensorProto.FLOAT, b)],
        [vi("y", TensorProto.FLOAT, None)], [_weight("Wa", (16, 32)), _weight("Wb", (8, 32), 1)])
    return _save(graph, path)


def test_inputs_of_different_sample_counts_are_refused_naming_each(tmp_path: Path) -> None:
    """5 rows of ``a`` and 7 of ``b`` ended in ONNX Runtime's Gemm traceback."""
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "two.npz", a=rng.standard_normal((5, 16)).astype(np.float32),
             b=rng.standard_normal((7, 8)).astype(np.float32))
    specs = [TensorInfo("a", (-1, 16), "float32"), TensorInfo("b", (-1, 8), "float32")]
    with pytest.raises(DataError, match=r"two\.npz: the inputs hold different numbers of "
                                        r"samples \('a' 5, 'b' 7\)"):
        load_dataset(tmp_path / "two.npz", specs)
    with pytest.raises(DataError, match=r"different numbers of samples \('a' 5, 'b' 7\)"):
        load_dataset(tmp_path / "two.npz", specs, limit=3)  # the whole arrays disagree
    np.savez(tmp_path / "lab.npz", a=rng.standard_normal((5, 16)).astype(np.float32),
             b=rng.standard_normal((5, 8)).astype(np.float32), labels=np.arange(6))
    with pytest.raises(DataError, match=r"'labels' has shape \[6\] for 5 samples"):
        load_dataset(tmp_path / "lab.npz", specs, limit=3)


def test_inputs_of_different_sample_counts_under_json(signing_keys: Keys,
                                                      tmp_path: Path) -> None:
    model = _two_inputs(tmp_path / "two.onnx", ["N", 16], ["N", 8])
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "two.npz", a=rng.standard_normal((5, 16)).astype(np.float32),
             b=rng.standard_normal((7, 8)).astype(np.float32))
    document = _json_error(["convert", str(model), "-o", str(tmp_path / "t.efb"), "--format",
                            "onnx", "--sign-key", str(signing_keys.secret), "--calibration",
                            str(tmp_path / "two.npz"), "--json"])
    assert document["error"] == "DataError" and "'a' 5, 'b' 7" in document["message"]


@pytest.mark.parametrize(("b", "said"), [(["N", 8], "'a' 2, 'b' N (dynamic)"),
                                         ([1, 8], "'a' 2, 'b' 1")])
def test_inputs_of_different_fixed_batches_are_refused_naming_them(
        signing_keys: Keys, tmp_path: Path, b: list[int | str], said: str) -> None:
    """Were blamed on the data's values ("integer ids within its vocabulary")."""
    model = _two_inputs(tmp_path / "two.onnx", [2, 16], b)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "two.npz", a=rng.standard_normal((5, 16)).astype(np.float32),
             b=rng.standard_normal((5, 8)).astype(np.float32))
    with pytest.raises(UnsupportedPathError, match=r"different leading \(batch\) dims") as found:
        convert(_config(model, tmp_path / "t.efb", signing_keys,
                        calibration=tmp_path / "two.npz"))
    assert said in found.value.message and "vocabulary" not in str(found.value)
    assert "one batch on every input" in (found.value.hint or "")


# --- F11: weights kept as external data --------------------------------------------------------

def _external(folder: Path) -> Path:
    folder.mkdir()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("MatMul", ["b", "W2"], ["y"])], "g",
        [vi("x", TensorProto.FLOAT, ["N", 16])], [vi("y", TensorProto.FLOAT, ["N", 10])],
        [_weight("W1", (16, 256)), _weight("W2", (256, 10), 1)])
    return _save(graph, folder / "ext.onnx", save_as_external_data=True,
                 all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    """A working directory without the model's data file."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    previous = Path.cwd()
    os.chdir(other)
    try:
        yield other
    finally:
        os.chdir(previous)


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_a_model_with_external_data_is_bundled_whole(signing_keys: Keys, tmp_path: Path,
                                                     elsewhere: Path, mode: str) -> None:
    """ONNX Runtime read the data against the working directory; from the model's folder
    the bundle's model referenced a file the bundle did not hold."""
    model = _external(tmp_path / "model")
    assert len(model.read_bytes()) < 1000  # the weights are in ext.onnx.data
    out = tmp_path / f"ext-{mode}.efb"
    convert(_config(model, out, signing_keys, quantize=mode, max_drop=100.0,
                    calibration=_x16(tmp_path / "x.npy")))
    (tmp_path / "model" / "ext.onnx.data").unlink()  # the bundle needs it no more
    bundle = read_bundle(out, signing_keys.trusted)
    carried = onnx.load_model_from_string(bundle.model_bytes)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in carried.graph.initializer)
    runtime = load_runtime(bundle.model_bytes, "onnx")
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    got = runtime.run({"x": x})["y"]
    w1 = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32) * 0.3
    w2 = np.random.default_rng(1).standard_normal((256, 10)).astype(np.float32) * 0.3
    want = np.maximum(x @ w1, 0) @ w2
    assert np.allclose(got, want, atol=0.05 * float(np.abs(want).max()))


def test_external_data_missing_from_the_model_folder_is_named(signing_keys: Keys,
                                                              tmp_path: Path,
                                                              elsewhere: Path) -> None:
    model = _external(tmp_path / "model")
    (tmp_path / "model" / "ext.onnx.data").rename(elsewhere / "ext.onnx.data")
    with pytest.raises(SourceModelError, match=r"keeps its weights as external data in "
                                               r"'ext.onnx.data', which is not a file in"):
        convert(_config(model, tmp_path / "t.efb", signing_keys))


def test_external_data_beyond_protobufs_limit_is_refused_naming_the_size(
        signing_keys: Keys, tmp_path: Path) -> None:
    """A tensor whose external data says 3 GiB: refused before any of it is read."""
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "big.data").write_bytes(b"\0" * 64)
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[16, 3 << 24])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.data"), ("offset", "0"), ("length", str(3 << 30))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [vi("x", TensorProto.FLOAT, ["N", 16])],
                              [vi("y", TensorProto.FLOAT, ["N", 3 << 24])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "big.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(SourceModelError, match=r"holds 3\.00 GiB: above protobuf's 2 GiB"):
        convert(_config(folder / "big.onnx", tmp_path / "t.efb", signing_keys))
