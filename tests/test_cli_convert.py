"""``edgefleet convert`` and ``edgefleet device`` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Keys
from tests.models import TrainedModels


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True,
                          text=True, timeout=300, check=False,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def calib(digits_models: TrainedModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "calib.npz"
    np.savez(path, x=digits_models.digits.x_train[:100], labels=digits_models.digits.y_train[:100])
    return path


def test_convert_prints_a_json_report_and_writes_the_bundle(
        digits_models: TrainedModels, signing_keys: Keys, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "digits.efb"
    result = _run("convert", str(digits_models.keras), "-o", str(out), "--quantize", "int8",
                  "--calibration", str(calib), "--eval", str(calib), "--sign-key",
                  str(signing_keys.secret), "--name", "digits", "--version", "2.0.0", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chosen"] == "int8" and report["output"] == str(out)
    assert report["attempts"][0]["accuracy"] >= 0.9
    assert out.exists()
    assert "Saved artifact" not in result.stdout and "oneDNN" not in result.stderr


def test_convert_shows_a_table(digits_models: TrainedModels, signing_keys: Keys, calib: Path,
                               tmp_path: Path) -> None:
    result = _run("convert", str(digits_models.keras), "-o", str(tmp_path / "d.efb"),
                  "--quantize", "fp16", "--eval", str(calib), "--sign-key",
                  str(signing_keys.secret))
    assert result.returncode == 0, result.stderr
    assert "attempt" in result.stdout and "chosen" in result.stdout
    assert "wrote" in result.stdout


def test_convert_over_budget_exits_non_zero_and_writes_nothing(
        digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    d = digits_models.digits
    np.savez(bad, x=d.x_train[:100] * 0.01)
    good = tmp_path / "eval.npz"
    np.savez(good, x=d.x_test, labels=d.y_test)
    out = tmp_path / "never.efb"
    result = _run("convert", str(digits_models.keras), "-o", str(out), "--quantize", "int8",
                  "--calibration", str(bad), "--eval", str(good), "--max-drop", "1",
                  "--sign-key", str(signing_keys.secret))
    assert result.returncode == 1
    assert "exceeds the budget" in result.stderr and "rejected" in result.stdout
    assert not out.exists()
    as_json = _run("convert", str(digits_models.keras), "-o", str(out), "--quantize", "int8",
                   "--calibration", str(bad), "--eval", str(good), "--max-drop", "1",
                   "--sign-key", str(signing_keys.secret), "--json")
    found = json.loads(as_json.stdout)  # one document: the report and why it was refused
    assert as_json.returncode == 1 and "exceeds the budget" in found["error"]["message"]
    assert found["attempts"] and not out.exists()


def test_convert_without_a_key_names_the_fix(digits_models: TrainedModels,
                                             tmp_path: Path) -> None:
    result = _run("convert", str(digits_models.keras), "-o", str(tmp_path / "x.efb"),
                  "--sign-key", str(tmp_path / "missing.key"))
    assert result.returncode == 2
    assert "cannot read signing key" in result.stderr and "keys generate" in result.stderr


def test_device_list_and_show(tmp_path: Path) -> None:
    listed = json.loads(_run("device", "list", "--json").stdout)
    names = {p["name"] for p in listed}
    assert {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "coral-edgetpu",
            "generic-x86_64", "generic-arm64"} <= names
    coral = json.loads(_run("device", "show", "coral-edgetpu", "--json").stdout)
    assert coral["full_int8_only"] is True and coral["dtypes"] == ["int8", "uint8", "int32"]
    missing = _run("device", "show", "toaster")
    assert missing.returncode == 2 and "no device profile 'toaster'" in missing.stderr


def test_device_check_reports_violations_per_target(digits_bundles: dict[str, Path]) -> None:
    result = _run("device", "check", str(digits_bundles["tflite"]), "--target",
                  "raspberry-pi-4", "--target", "coral-edgetpu", "--json")
    assert result.returncode == 1
    found = json.loads(result.stdout)
    assert found["raspberry-pi-4"] == []
    kinds = {v["kind"] for v in found["coral-edgetpu"]}
    assert {"dtype", "op"} <= kinds


def test_convert_refuses_a_malformed_input_size_or_shape(digits_models: TrainedModels,
                                                        signing_keys: Keys,
                                                        tmp_path: Path) -> None:
    common = ("convert", str(digits_models.keras), "-o", str(tmp_path / "x.efb"),
              "--sign-key", str(signing_keys.secret))
    size = _run(*common, "--input-size", "320")
    assert size.returncode == 2 and "expected HEIGHTxWIDTH" in size.stderr
    shape = _run(*common, "--input-shape", "1x3x8x8")
    assert shape.returncode == 2 and "expected NAME=1x3x320x320" in shape.stderr
    assert not (tmp_path / "x.efb").exists()


def test_a_recipe_for_tflite_sources_only_is_refused_for_keras_with_what_works(
        digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path) -> None:
    result = _run("convert", str(digits_models.keras), "-o", str(tmp_path / "x.efb"),
                  "--quantize", "weight-only", "--sign-key", str(signing_keys.secret))
    assert result.returncode == 2
    assert "for float .tflite sources" in result.stderr and "auto" in result.stderr


def test_only_the_chosen_attempts_warnings_reach_the_top_level(
        capsys: pytest.CaptureFixture[str]) -> None:
    from edgefleet.cli.convert import _show
    from edgefleet.converter.report import Attempt, ConversionReport

    report = ConversionReport("m.tflite", "tflite", "tflite", "auto", 1000, chosen="weight-only")
    report.attempts = [
        Attempt("dynamic", "dynamic", size_bytes=500, reason="over budget",
                warnings=["converted model is slower than its source (2.7x)"]),
        Attempt("weight-only", "weight-only", size_bytes=510, accepted=True,
                warnings=["converted model is slower than its source (1.1x)"])]
    _show(report.as_dict(), as_json=False)
    shown = capsys.readouterr().out
    assert "(1.1x)" in shown and "(2.7x)" not in shown


def test_an_output_kind_is_name_equals_class_or_regression() -> None:
    import typer

    from edgefleet.cli.convert import _kind

    assert _kind("output_iris=regression") == ("output_iris", "regression")
    with pytest.raises(typer.BadParameter, match="NAME=class or NAME=regression"):
        _kind("output_iris=landmarks")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-MatMul float ONNX model: the options below are refused before it is read."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(np.ones((8, 2), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("tiny-onnx") / "tiny.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(("options", "says"), [
    (("--input-size", "320"), "--input-size '320': expected HEIGHTxWIDTH"),
    (("--input-shape", "x=1xa"), "dims are integers joined by x"),
    (("--input-shape", "x=1x8", "--input-size", "8x8"),
     "--input-shape and --input-size both given"),
    (("--quantize", "int4"), "quantize must be one of"),
    (("--int8-io",), "--int8-io makes a TFLite model's inputs and outputs int8"),
    (("--output-kind", "y=landmarks"), "expected NAME=class or NAME=regression"),
    (("--max-drop", "250"), "max_drop is in accuracy points"),
    (("--version", "one"), "is not a semantic version"),
])
def test_an_option_refused_under_json_is_one_json_object_with_the_same_exit_code(
        tiny_onnx: Path, signing_keys: Keys, tmp_path: Path, options: tuple[str, ...],
        says: str) -> None:
    """Was typer's usage text on stderr and nothing on stdout, under --json too."""
    common = ("convert", str(tiny_onnx), "-o", str(tmp_path / "x.efb"), "--format", "onnx",
              "--sign-key", str(signing_keys.secret), *options)
    text = _run(*common)
    assert text.returncode == 2 and says in " ".join(text.stderr.split())
    as_json = _run(*common, "--json")
    assert as_json.returncode == text.returncode, as_json.stderr
    error = json.loads(as_json.stdout)
    assert error["error"] == "OptionError" and says in error["message"]
    assert "edgefleet convert --help" in error["hint"]
    assert "Usage:" not in as_json.stderr
    assert not (tmp_path / "x.efb").exists()


@pytest.mark.parametrize(("options", "says"), [
    (("--max-drop", "abc"), "Invalid value for '--max-drop'"),
    (("--bogus",), "No such option: --bogus"),
    (("--search-budget", "x"), "Invalid value for '--search-budget'"),
])
def test_a_usage_error_under_json_is_one_json_object_too(
        tiny_onnx: Path, signing_keys: Keys, tmp_path: Path, options: tuple[str, ...],
        says: str) -> None:
    """What typer refuses before the command runs (a value it cannot parse, an unknown
    option) was usage text on stderr under --json (outside test 14c, F29)."""
    common = ("convert", str(tiny_onnx), "-o", str(tmp_path / "x.efb"), "--format", "onnx",
              "--sign-key", str(signing_keys.secret), *options)
    text = _run(*common)
    assert text.returncode == 2 and says in " ".join(text.stderr.split())
    as_json = _run(*common, "--json")
    assert as_json.returncode == 2, as_json.stderr
    error = json.loads(as_json.stdout)
    assert error == {"error": "UsageError", "message": error["message"],
                     "hint": "see edgefleet convert --help"} and says in error["message"]
    missing = _run("convert", str(tiny_onnx), "--json")  # no -o
    assert missing.returncode == 2
    assert json.loads(missing.stdout)["message"] == "Missing option '--output' / '-o'."
