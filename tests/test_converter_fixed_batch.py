"""A model exported with a fixed batch (1, as many published ones are) converts, packages
and serves: evaluation, calibration, the drift reference and the health check feed it as
many rows a call as it takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.core import Agent
from edgefleet.converter.config import ConvertConfig, Quantize
from edgefleet.converter.pipeline import convert
from tests.conftest import Keys


def _batch_one(path: Path, batch: int = 1) -> Path:
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(256, 64)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "batch_one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 64])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_a_batch_one_onnx_model_converts_and_serves(tmp_path: Path, signing_keys: Keys,
                                                   mode: Quantize) -> None:
    source = _batch_one(tmp_path / "one.onnx")
    data = np.random.default_rng(1).uniform(0, 1, size=(70, 256)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data)
    out = tmp_path / f"one-{mode}.efb"
    report = convert(ConvertConfig(model=source, output=out, format="onnx", quantize=mode,
                                   calibration=tmp_path / "calib.npy",
                                   sign_key=signing_keys.secret, max_drop=100.0))
    assert out.exists() and report.eval_samples == 70
    agent = Agent(signing_keys.trusted)
    agent.load(out)  # verifies and runs the bundle's health check (one row a call)
    got = next(iter(agent.predict(data[:1]).values()))
    assert got.shape == (1, 64)


def test_a_model_of_a_fixed_batch_of_three_has_its_latency_measured_in_calls_of_three(
        tmp_path: Path, signing_keys: Keys) -> None:
    source = _batch_one(tmp_path / "three.onnx", batch=3)
    data = np.random.default_rng(2).uniform(0, 1, size=(30, 256)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data)
    report = convert(ConvertConfig(model=source, output=tmp_path / "three.efb", format="onnx",
                                   quantize="dynamic", calibration=tmp_path / "calib.npy",
                                   sign_key=signing_keys.secret, max_drop=100.0))
    assert report.source_latency_p50_ms is not None and report.source_latency_p50_ms > 0
    assert (tmp_path / "three.efb").exists()


def test_a_file_name_with_spaces_gives_a_bundle_name_and_a_bad_name_is_refused_up_front(
        tmp_path: Path) -> None:
    config = ConvertConfig(model=tmp_path / "My tiny_model (2).keras", output=tmp_path / "o.efb",
                           sign_key=tmp_path / "k")
    assert config.model_name == "my-tiny-model-2"
    with pytest.raises(ValueError, match="bundle name 'dig<b>x' is not allowed"):
        ConvertConfig(model=tmp_path / "m.keras", output=tmp_path / "o.efb",
                      sign_key=tmp_path / "k", name="dig<b>x")
    with pytest.raises(ValueError, match="not a semantic version"):
        ConvertConfig(model=tmp_path / "m.keras", output=tmp_path / "o.efb",
                      sign_key=tmp_path / "k", version="1.0")


def test_a_file_that_is_no_image_in_a_calibration_folder_is_named(tmp_path: Path) -> None:
    from edgefleet.agent.runtime.base import TensorInfo
    from edgefleet.converter.data import load_dataset
    from edgefleet.converter.errors import DataError

    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "junk.png").write_bytes(b"this is not a picture")
    with pytest.raises(DataError, match="cannot read image .*junk.png") as caught:
        load_dataset(folder, [TensorInfo(name="x", shape=(1, 8, 8, 3), dtype="float32")])
    assert ".npy" in caught.value.hint
