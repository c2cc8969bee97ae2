"""Lineage in the manifest, ``fleet models show``, and ``edgefleet diff`` of two bundles.

One real conversion (float digits .tflite -> int8, with calibration and evaluation files) is
made once for the module; its lineage hashes are recomputed here with hashlib, and the diff
against the float bundle is checked against op counts, sizes and an agreement measured
directly with the runtimes.
"""

from __future__ import annotations

import collections
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from edgefleet.agent.protocol.bundle import inspect_bundle, read_bundle
from edgefleet.agent.protocol.encryption import RecipientKey, generate_device_key
from edgefleet.agent.runtime import load_runtime
from edgefleet.cli import app
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.lineage import config_json, tree_sha256
from edgefleet.converter.pipeline import convert
from tests import tamper
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import TOKEN, Fleet
from tests.models import TrainedModels


@pytest.fixture(scope="module")
def converted(digits_models: TrainedModels, signing_keys: Keys,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lineage")
    digits = digits_models.digits
    calibration, evaluation = root / "calibration.npz", root / "eval.npz"
    np.savez(calibration, image=digits.x_train[:64])
    np.savez(evaluation, image=digits.x_test[:120], labels=digits.y_test[:120])
    config = ConvertConfig(model=digits_models.tflite, output=root / "digits-int8.efb",
                           sign_key=signing_keys.secret, quantize="int8", int8_io=True,
                           calibration=calibration, eval=evaluation, name="digits",
                           version="4.0.0", quiet=True)
    convert(config)
    return {"config": config, "bundle": config.output, "calibration": calibration,
            "eval": evaluation}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _diff(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["diff", *args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_lineage_names_the_source_tool_config_and_data(converted: dict[str, Any],
                                                       digits_models: TrainedModels) -> None:
    bundle = inspect_bundle(converted["bundle"])
    lineage = bundle.manifest.lineage
    assert lineage is not None and bundle.manifest.schema_version == 1
    assert lineage.source.sha256 == _sha(digits_models.tflite)
    assert lineage.source.kind == "tflite"
    assert lineage.source.size == digits_models.tflite.stat().st_size
    assert lineage.calibration is not None and lineage.eval is not None
    assert lineage.calibration.sha256 == _sha(converted["calibration"])
    assert lineage.eval.sha256 == _sha(converted["eval"])
    assert lineage.fine_tune is None
    assert lineage.tool == "edgefleet"
    assert lineage.tool_version == metadata.version("edgefleet")
    assert lineage.libraries["ai-edge-quantizer"] == metadata.version("ai-edge-quantizer")
    assert lineage.config == config_json(converted["config"])
    assert lineage.config["quantize"] == "int8" and lineage.config["version"] == "4.0.0"


def test_a_folder_is_hashed_by_relative_paths_and_contents(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "data").write_bytes(b"weights")
    expected = hashlib.sha256(
        f"saved_model.pb\0{hashlib.sha256(b'graph').hexdigest()}\n"
        f"variables/data\0{hashlib.sha256(b'weights').hexdigest()}\n".encode()).hexdigest()
    assert tree_sha256(folder) == expected
    moved = tmp_path / "elsewhere"
    folder.rename(moved)
    assert tree_sha256(moved) == expected, "where the folder lies does not matter"
    (moved / "variables" / "data").write_bytes(b"weights!")
    assert tree_sha256(moved) != expected


def test_bundles_without_lineage_still_load(digits_bundles: dict[str, Path],
                                            signing_keys: Keys) -> None:
    raw = tamper.members(digits_bundles["tflite"].read_bytes())["manifest.json"]
    assert "lineage" not in json.loads(raw) and "encryption" not in json.loads(raw)
    bundle = read_bundle(digits_bundles["tflite"], signing_keys.trusted)
    assert bundle.manifest.lineage is None and bundle.manifest.encryption is None


def _tflite_op_counts(model: bytes) -> dict[str, int]:
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_content=model)._get_ops_details()
    return dict(collections.Counter(op["op_name"] for op in details))


def test_diff_of_float_and_int8_bundles(converted: dict[str, Any],
                                        digits_bundles: dict[str, Path]) -> None:
    float_path, int8_path = digits_bundles["tflite"], converted["bundle"]
    result = _diff(str(float_path), str(int8_path), "--data", str(converted["eval"]))
    float_model = inspect_bundle(float_path).model_bytes
    int8_model = inspect_bundle(int8_path).model_bytes

    counts_a, counts_b = _tflite_op_counts(float_model), _tflite_op_counts(int8_model)
    rows = {r["op"]: r for r in result["ops"]["rows"]}
    assert {op: r["a"] for op, r in rows.items() if r["a"]} == counts_a
    assert {op: r["b"] for op, r in rows.items() if r["b"]} == counts_b
    added = {r["op"] for r in rows.values() if r["a"] == 0}
    assert added == set(counts_b) - set(counts_a) != set(), "int8 adds (de)quantize ops"
    assert result["ops"]["total"]["delta"] == sum(counts_b.values()) - sum(counts_a.values())

    sizes = {r["what"]: r for r in result["sizes"]}
    assert sizes["bundle file"]["a"] == float_path.stat().st_size
    assert sizes["bundle file"]["b"] == int8_path.stat().st_size
    assert (sizes["model"]["a"], sizes["model"]["b"]) == (len(float_model), len(int8_model))
    assert sizes["model"]["delta"] < 0

    quant = {r["field"]: r for r in result["quantization"]}
    assert (quant["mode"]["a"], quant["mode"]["b"]) == ("none", "int8")
    assert "int8" in quant["tensor dtypes"]["b"] and "int8" not in quant["tensor dtypes"]["a"]
    metrics = {r["metric"]: r for r in result["metrics"]}
    assert metrics["model_bytes"]["b"] == len(int8_model)

    with np.load(converted["eval"]) as data:
        x, labels = data["image"], data["labels"]
    runtime_a = load_runtime(float_model, "tflite")
    runtime_b = load_runtime(int8_model, "tflite")
    out_a = runtime_a.run({runtime_a.inputs[0].name: x})[runtime_a.outputs[0].name]
    spec_in, spec_out = runtime_b.inputs[0], runtime_b.outputs[0]  # int8 in and out
    assert spec_in.dtype == "int8" and spec_out.dtype == "int8"
    q = np.clip(np.round(x / spec_in.scales[0] + spec_in.zero_points[0]), -128, 127)
    raw = runtime_b.run({spec_in.name: q.astype(np.int8)})[spec_out.name]
    out_b = (raw.astype(np.float32) - spec_out.zero_points[0]) * spec_out.scales[0]
    top1 = float((out_a.argmax(1) == out_b.argmax(1)).mean())
    found = result["agreement"]
    assert found["samples"] == len(x) and 0.0 <= found["top1"] <= 1.0
    assert found["top1"] == pytest.approx(top1, abs=1e-6)
    assert found["max_abs_error"][0] == pytest.approx(float(np.abs(out_a - out_b).max()),
                                                      abs=1e-5)
    assert found["accuracy_a"] == pytest.approx(float((out_a.argmax(1) == labels).mean()))
    assert 0.9 < found["cosine"][0] <= 1.0

    lineage = result["lineage"]
    assert lineage["same_source"] is None and lineage["missing"] == [str(float_path)]


def test_diff_without_data_uses_the_health_inputs_and_prints_tables(
        digits_bundles: dict[str, Path]) -> None:
    result = _diff(str(digits_bundles["tflite"]), str(digits_bundles["onnx"]))
    assert result["agreement"]["data"] == "health inputs of the bundles"
    assert result["agreement"]["samples"] == 8 and result["agreement"]["top1"] == 1.0
    shown = CliRunner().invoke(app, ["diff", str(digits_bundles["tflite"]),
                                     str(digits_bundles["onnx"])], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    for title in ("sizes (bytes)", "op types and counts", "quantization", "inputs and outputs",
                  "output agreement on 8 samples", "CONV_2D", "Conv"):
        assert title in shown.stdout


def test_diff_names_what_it_cannot_read(digits_bundles: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["diff", str(digits_bundles["tflite"]), "nope:1.0",
                                      "--json"])
    assert result.exit_code == 2
    assert "neither a bundle file nor NAME:VERSION" in json.loads(result.stdout)["message"]


def _fleet_cli(fleet: Fleet, *args: str) -> Result:
    assert fleet.api is not None
    return CliRunner().invoke(app, list(args), env={
        "EDGEFLEET_CONTROLLER": fleet.api.url, "EDGEFLEET_TOKEN": TOKEN, "COLUMNS": "200"})


def test_registry_versions_show_lineage_and_diff(
        fleet: Fleet, converted: dict[str, Any], digits_models: TrainedModels,
        signing_keys: Keys, tmp_path: Path) -> None:
    client = fleet.start_controller()
    _, public = generate_device_key(tmp_path, "cam")
    sealed = make_bundle(digits_models.onnx, tmp_path / "sealed.efb", signing_keys, "5.0.0",
                         encrypt_for=(RecipientKey.load(public),))
    for bundle in (converted["bundle"], sealed):  # the controller accepts encrypted bundles
        client.upload("/api/v1/models", bundle.read_bytes())
    listed = _fleet_cli(fleet, "fleet", "models", "--json")
    assert listed.exit_code == 0, listed.output
    assert {m["version"] for m in json.loads(listed.stdout)} == {"4.0.0", "5.0.0"}

    shown = _fleet_cli(fleet, "fleet", "models", "show", "digits:4.0.0", "--json")
    assert shown.exit_code == 0, shown.output
    lineage = json.loads(shown.stdout)["manifest"]["lineage"]
    assert lineage["source"]["sha256"] == _sha(digits_models.tflite)
    assert lineage["calibration"]["sha256"] == _sha(converted["calibration"])
    table = _fleet_cli(fleet, "fleet", "models", "show", "digits:4.0.0")
    assert table.exit_code == 0, table.output
    for text in ("lineage", _sha(digits_models.tflite), "config.quantize", "inputs and outputs",
                 "metrics", "no (plain)"):
        assert text in table.stdout
    encrypted = _fleet_cli(fleet, "fleet", "models", "show", "digits:5.0.0")
    assert RecipientKey.load(public).key_id in encrypted.stdout
    missing = _fleet_cli(fleet, "fleet", "models", "show", "digits:9.9.9", "--json")
    assert missing.exit_code == 2 and "no model digits:9.9.9" in missing.stdout

    assert fleet.api is not None
    result = _diff("digits:4.0.0", str(converted["bundle"]),
                   env={"EDGEFLEET_CONTROLLER": fleet.api.url, "EDGEFLEET_TOKEN": TOKEN})
    assert result["a"]["sha256"] == result["b"]["sha256"]
    assert result["lineage"]["same_source"] is True and result["lineage"]["differences"] == []
    assert result["agreement"]["top1"] == 1.0 and result["agreement"]["max_abs_error"] == [0.0]
