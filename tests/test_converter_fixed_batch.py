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


def _batch_one(path: Path) -> Path:
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(256, 64)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "batch_one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weights])
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
