"""Device limits no recipe lifts are said so at once, and an ONNX opset newer than the
converter's table records the ONNX Runtime that measured it (outside test 14c, F9, F21,
F27)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from edgefleet.agent.runtime.inspect import ModelInfo
from edgefleet.converter.advice import failure, unliftable
from edgefleet.converter.bundle import ONNX_RUNTIME_FOR_OPSET, _min_runtime
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.errors import TargetViolationError
from edgefleet.converter.report import Attempt, ConversionReport, Verdict


def _off(mode: str, *violations: tuple[str, str]) -> Attempt:
    attempt = Attempt(mode, mode, violations=[{"kind": k, "message": m} for k, m in violations])
    attempt.verdict = Verdict.OFF_TARGET
    return attempt


SHAPE = ("op", "op SHAPE is not supported on coral-edgetpu")
FLOAT = ("dtype", "coral-edgetpu does not run float32 tensors")
OPSET = ("opset", "model uses ONNX opset 24; raspberry-pi-4's onnxruntime loads at most 23")
DEQUANT = ("op", "op DEQUANTIZE is not supported on coral-edgetpu")


def test_an_operator_every_recipe_keeps_is_named_and_no_recipe_offered(tmp_path: Path) -> None:
    attempts = [_off("int8", SHAPE, FLOAT), _off("int8", SHAPE)]
    assert unliftable(attempts) == [f"{SHAPE[1]} (replace the operator in the model, or "
                                    "export it without it (a fixed batch removes the SHAPE a "
                                    "dynamic Flatten or Reshape adds))"]
    report = ConversionReport("m.keras", "keras", "tflite", "int8", 1)
    report.attempts = attempts
    config = ConvertConfig(model=tmp_path / "m.keras", output=tmp_path / "m.efb",
                           sign_key=tmp_path / "k", targets=("coral-edgetpu",))
    error = failure(report, config)
    assert isinstance(error, TargetViolationError)
    assert (error.hint or "").startswith("no --quantize option lifts op SHAPE")
    assert "--quantize auto" not in (error.hint or "") and report.suggestions == []


def test_an_opset_or_a_missing_runtime_is_never_lifted_by_a_recipe() -> None:
    assert "re-export the model at an opset" in unliftable([_off("int8", OPSET)])[0]
    runtime = ("runtime", "coral-edgetpu has no runtime for .onnx models")
    assert "--format tflite" in unliftable([_off("int8", runtime)])[0]
    conv = ("op", "op Conv is not supported on coral-edgetpu")
    assert unliftable([_off("int8", runtime, conv)]) == \
        unliftable([_off("int8", runtime)])  # its operators do not matter there


def test_limits_a_recipe_changes_leave_the_recipes_offered() -> None:
    assert unliftable([_off("fp16", DEQUANT)]) == []  # float16 adds DEQUANTIZE; int8 not
    assert unliftable([_off("int8", FLOAT)]) == []  # --int8-io lifts it
    assert unliftable([_off("int8", SHAPE), _off("int8-mixed-1", FLOAT)]) == []  # not in all


def test_an_opset_newer_than_the_table_needs_the_runtime_that_measured_it() -> None:
    newest = max(ONNX_RUNTIME_FOR_OPSET)
    installed = metadata.version("onnxruntime")
    assert _min_runtime("onnx", ModelInfo("onnx", {}, opset=newest + 1)) == installed
    assert _min_runtime("onnx", ModelInfo("onnx", {}, opset=17)) == ONNX_RUNTIME_FOR_OPSET[17]


def test_a_profile_path_that_is_a_folder_or_invalid_is_a_profile_error(tmp_path: Path) -> None:
    import json

    import pytest

    from edgefleet.agent.protocol.manifest import Manifest, RuntimeRequirement, TensorSpec
    from edgefleet.devices import ProfileError, check_model, load_profile

    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ProfileError, match="is not a regular file"):
        load_profile(str(tmp_path / "dir.json"))
    base = json.loads(load_profile.__globals__["_profiles_dir"]().joinpath(
        "generic-x86_64.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**base, "ram_bytes": -1}))
    with pytest.raises(ProfileError, match=r"ram_bytes: Input should be greater than 0"):
        load_profile(str(tmp_path / "bad.json"))
    (tmp_path / "ram.json").write_text(json.dumps({**base, "ram_bytes": 1000}))
    tiny = load_profile(str(tmp_path / "ram.json"))
    manifest = Manifest(schema_version=1, name="m", version="1.0.0", created="", format="onnx",
                        runtime=RuntimeRequirement(name="onnxruntime"),
                        inputs=[TensorSpec(name="x", shape=[1, 4], dtype="float32")],
                        outputs=[TensorSpec(name="y", shape=[1, 2], dtype="float32")],
                        files={})
    found = check_model(tiny, manifest, ModelInfo("onnx", {}), 29_000)
    assert [v.message for v in found] == [f"model is 29000 bytes; {tiny.name} has 1000 bytes "
                                          "of memory"]


def test_a_model_that_is_a_fifo_or_empty_is_refused_by_name(tmp_path: Path) -> None:
    import os

    import pytest

    from edgefleet.converter.errors import SourceModelError
    from edgefleet.converter.sources import load_source

    os.mkfifo(tmp_path / "fifo.onnx")  # opening it would block for ever
    with pytest.raises(SourceModelError, match="is not a regular file"):
        load_source(tmp_path / "fifo.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(SourceModelError, match=r"is empty \(0 bytes\)") as caught:
        load_source(tmp_path / "empty.onnx")
    assert caught.value.hint == "download or export the model again"
