"""Models encrypted at rest: sealed in the bundle for X25519 recipients, opened in memory only.

The encrypted bundles hold the digits ONNX model, and the device starts on the plain TFLite
bundle, so the plain ONNX bytes must never show up under the agent's data directory: not
after installing, serving, restarting, updating away and rolling back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.bundle import build_bundle, read_bundle
from edgefleet.agent.protocol.encryption import (
    DecryptionError,
    DecryptionKeys,
    DeviceKey,
    NoDecryptionKeyError,
    RecipientKey,
    generate_device_key,
)
from edgefleet.agent.protocol.errors import BadSignatureError, IntegrityError, SchemaVersionError
from edgefleet.agent.protocol.manifest import Manifest, parse_manifest
from edgefleet.agent.protocol.schema import Document
from edgefleet.agent.protocol.update_state import UpdateState
from edgefleet.agent.update import local
from edgefleet.agent.update.device import DeviceEffects, UpdateSettings, load_journal
from edgefleet.agent.update.flow import Updater
from edgefleet.agent.update.target import UpdateTarget
from edgefleet.cli import app
from tests import tamper
from tests.conftest import Keys, make_bundle
from tests.models import TrainedModels, load_digits


@pytest.fixture(scope="module")
def device_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two devices' X25519 key pairs: (NAME.x25519, NAME.x25519pub)."""
    root = tmp_path_factory.mktemp("x25519")
    return {name: generate_device_key(root, name) for name in ("cam", "other")}


def _keys(paths: tuple[Path, Path]) -> DecryptionKeys:
    return DecryptionKeys.from_paths([paths[0]])


@pytest.fixture(scope="module")
def bundles(digits_models: TrainedModels, signing_keys: Keys,
            device_keys: dict[str, tuple[Path, Path]],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("sealed")
    cam = RecipientKey.load(device_keys["cam"][1])
    return {
        "v1-plain": make_bundle(digits_models.tflite, out / "v1.efb", signing_keys, "1.0.0"),
        "v2-sealed": make_bundle(digits_models.onnx, out / "v2.efb", signing_keys, "2.0.0",
                                 encrypt_for=(cam,)),
        "v2-plain": make_bundle(digits_models.onnx, out / "v2-plain.efb", signing_keys, "2.0.0"),
        "v3-plain": make_bundle(digits_models.tflite, out / "v3.efb", signing_keys, "3.0.0"),
    }


def _manifest(bundle: Path) -> Manifest:
    return parse_manifest(tamper.members(bundle.read_bytes())["manifest.json"])


def _pieces(plain: bytes) -> list[bytes]:
    """The whole model and 256-byte windows from its start, middle (weights) and end."""
    middle = len(plain) // 2
    return [plain, plain[:256], plain[middle:middle + 256], plain[-256:]]


def _files_holding(root: Path, plain: bytes) -> list[str]:
    found = []
    for path in (p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if any(piece in data for piece in _pieces(plain)):
            found.append(str(path.relative_to(root)))
    return found


def test_sealed_bundle_opens_in_memory_to_the_exact_model(
        bundles: dict[str, Path], digits_models: TrainedModels, signing_keys: Keys,
        device_keys: dict[str, tuple[Path, Path]]) -> None:
    plain = digits_models.onnx.read_bytes()
    raw = bundles["v2-sealed"].read_bytes()
    assert not any(piece in raw for piece in _pieces(plain)), "no plain model in the archive"
    manifest = _manifest(bundles["v2-sealed"])
    assert manifest.schema_version == 2 and manifest.encryption is not None
    assert set(manifest.files) == {"model.onnx.enc", "health.npz", "labels.txt"}
    cipher = tamper.members(raw)["model.onnx.enc"]
    assert manifest.files["model.onnx.enc"].sha256 == hashlib.sha256(cipher).hexdigest()
    assert manifest.encryption.plain_sha256 == hashlib.sha256(plain).hexdigest()
    assert manifest.encryption.plain_size == len(plain) == manifest.model_size
    cam_id = DeviceKey.load(device_keys["cam"][0]).key_id
    assert manifest.encryption.key_ids == [cam_id] == [RecipientKey.load(
        device_keys["cam"][1]).key_id]
    opened = read_bundle(bundles["v2-sealed"], signing_keys.trusted, _keys(device_keys["cam"]))
    assert opened.model_bytes == plain


def test_a_relay_verifies_without_decrypting(bundles: dict[str, Path],
                                             signing_keys: Keys) -> None:
    relayed = read_bundle(bundles["v2-sealed"], signing_keys.trusted)  # controller, registry
    assert relayed.encrypted and relayed.plain_model is None
    with pytest.raises(NoDecryptionKeyError, match="encrypted for key ids"):
        _ = relayed.model_bytes


def test_a_reader_without_encryption_refuses_by_schema_version(
        bundles: dict[str, Path]) -> None:
    class OldManifest(Manifest):  # what an edgefleet before encryption reads
        SUPPORTED_VERSIONS = Document.SUPPORTED_VERSIONS

    from edgefleet.agent.protocol.schema import decode_json, validate_document

    raw = tamper.members(bundles["v2-sealed"].read_bytes())["manifest.json"]
    with pytest.raises(SchemaVersionError, match="schema_version 2"):
        validate_document(OldManifest, decode_json(raw, "manifest.json"), "manifest.json")
    plain = tamper.members(bundles["v1-plain"].read_bytes())["manifest.json"]
    assert json.loads(plain)["schema_version"] == 1, "plain bundles stay readable by old agents"


def test_the_wrong_key_is_refused_naming_the_key_ids(
        bundles: dict[str, Path], signing_keys: Keys,
        device_keys: dict[str, tuple[Path, Path]]) -> None:
    cam_id = DeviceKey.load(device_keys["cam"][0]).key_id
    other_id = DeviceKey.load(device_keys["other"][0]).key_id
    with pytest.raises(NoDecryptionKeyError) as caught:
        read_bundle(bundles["v2-sealed"], signing_keys.trusted, _keys(device_keys["other"]))
    text = str(caught.value)
    assert text.startswith(f"no key for this bundle: it is encrypted for key ids {cam_id}")
    assert other_id in text and "--decrypt-key" in text


def test_a_changed_wrapped_key_breaks_the_signature(
        bundles: dict[str, Path], signing_keys: Keys,
        device_keys: dict[str, tuple[Path, Path]]) -> None:
    members = tamper.members(bundles["v2-sealed"].read_bytes())
    doc = json.loads(members["manifest.json"])
    assert json.dumps(doc, sort_keys=True, indent=1).encode() == members["manifest.json"]
    wrapped = bytearray(doc["encryption"]["recipients"][0]["wrapped_key"].encode())
    wrapped[4] = ord("A") if wrapped[4] != ord("A") else ord("B")
    doc["encryption"]["recipients"][0]["wrapped_key"] = wrapped.decode()
    members["manifest.json"] = json.dumps(doc, sort_keys=True, indent=1).encode()
    with pytest.raises(BadSignatureError):
        read_bundle(tamper.pack(members), signing_keys.trusted, _keys(device_keys["cam"]))


def test_a_changed_ciphertext_is_refused(bundles: dict[str, Path], signing_keys: Keys,
                                         device_keys: dict[str, tuple[Path, Path]]) -> None:
    members = tamper.members(bundles["v2-sealed"].read_bytes())
    cipher = bytearray(members["model.onnx.enc"])
    cipher[100] ^= 0x01
    members["model.onnx.enc"] = bytes(cipher)
    with pytest.raises(IntegrityError, match="model.onnx.enc"):
        read_bundle(tamper.pack(members), signing_keys.trusted, _keys(device_keys["cam"]))


def test_a_ciphertext_signed_anew_still_fails_authentication(
        bundles: dict[str, Path], signing_keys: Keys,
        device_keys: dict[str, tuple[Path, Path]]) -> None:
    """Even a signer that re-signs altered ciphertext cannot get it decrypted: AES-GCM's tag."""
    members = tamper.members(bundles["v2-sealed"].read_bytes())
    manifest = parse_manifest(members["manifest.json"])
    cipher = bytearray(members["model.onnx.enc"])
    cipher[100] ^= 0x01
    files = {"model.onnx.enc": bytes(cipher), "health.npz": members["health.npz"],
             "labels.txt": members["labels.txt"]}
    resigned = build_bundle(manifest, files, signing_keys.signer)
    with pytest.raises(DecryptionError, match="does not authenticate"):
        read_bundle(resigned, signing_keys.trusted, _keys(device_keys["cam"]))


def test_an_agent_with_the_key_serves_it_and_never_writes_the_plain_model(
        bundles: dict[str, Path], digits_models: TrainedModels, signing_keys: Keys,
        device_keys: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    data = tmp_path / "device"
    x = load_digits().x_test[:32]
    agent = Agent(signing_keys.trusted, keys=_keys(device_keys["cam"]))
    assert local.install(agent, data, bundles["v1-plain"]).state == UpdateState.COMMITTED
    assert local.install(agent, data, bundles["v2-sealed"]).state == UpdateState.COMMITTED  # update
    assert agent.model is not None and agent.model.version == "2.0.0"
    sealed_answers = agent.predict(x)
    reference = Agent(signing_keys.trusted)
    reference.load(bundles["v2-plain"])
    expected = reference.predict(x)
    for name, value in expected.items():
        np.testing.assert_array_equal(sealed_answers[name], value)

    restarted = Agent(signing_keys.trusted, keys=_keys(device_keys["cam"]))
    local.serve_active(restarted, data)  # reads the encrypted slot again
    assert restarted.model is not None and restarted.model.version == "2.0.0"
    assert local.install(restarted, data, bundles["v3-plain"]).state == UpdateState.COMMITTED
    assert local.rollback(restarted, data).state == UpdateState.ROLLED_BACK  # to the sealed one
    assert restarted.model.version == "2.0.0"
    restarted.predict(x)

    plain = digits_models.onnx.read_bytes()
    assert _files_holding(data, plain) == []
    assert any(p.read_bytes() == bundles["v2-sealed"].read_bytes()
               for p in data.rglob("bundle.efb")), "the slot keeps the encrypted bundle"


def test_an_agent_without_the_key_refuses_and_keeps_serving(
        bundles: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, bundles["v1-plain"])
    with pytest.raises(NoDecryptionKeyError, match="no key for this bundle"):
        local.install(agent, tmp_path, bundles["v2-sealed"])
    # the over-the-air path: refused in VERIFYING, before anything is staged or switched
    effects = DeviceEffects(tmp_path, agent, UpdateSettings(probation_s=0, auto_commit=True))
    manifest = _manifest(bundles["v2-sealed"])
    sha = hashlib.sha256(tamper.members(bundles["v2-sealed"].read_bytes())["manifest.json"])
    target = UpdateTarget(name=manifest.name, version=manifest.version, sha256=sha.hexdigest(),
                          url=str(bundles["v2-sealed"]), size=bundles["v2-sealed"].stat().st_size)
    updater = Updater(effects)
    journal = updater.run(updater.start(load_journal(effects.journal_path), target))
    assert journal.state == UpdateState.FAILED
    assert "no key for this bundle" in journal.detail and "--decrypt-key" in journal.detail
    assert agent.model is not None and agent.model.version == "1.0.0"
    assert agent.predict(load_digits().x_test[:4])
    assert {s["version"] for s in local.status(tmp_path)["slots"]} == {"1.0.0", None}


def test_cli_keys_convert_install_and_inspect(
        digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path) -> None:
    """One real conversion: keys generate-encryption, convert --encrypt-for, agent install with
    and without --decrypt-key, and device check / diff saying they need the key."""
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "generate-encryption", "--out", str(tmp_path / "k"),
                               "--name", "cam-7", "--json"])
    assert made.exit_code == 0, made.output
    key = json.loads(made.output)
    assert (tmp_path / "k" / "cam-7.x25519").stat().st_mode & 0o777 == 0o600
    out = tmp_path / "sealed.efb"
    converted = runner.invoke(app, [
        "convert", str(digits_models.tflite), "-o", str(out), "--sign-key",
        str(signing_keys.secret), "--encrypt-for", key["public_key"], "--version", "5.0.0",
        "--json"])
    assert converted.exit_code == 0, converted.output
    assert json.loads(converted.output)["encrypted_for"] == [key["key_id"]]
    assert _manifest(out).encryption is not None and _manifest(out).lineage is not None

    trusted = ["--trusted-key", str(signing_keys.public)]
    refused = runner.invoke(app, ["agent", "install", str(out), "--data-dir",
                                  str(tmp_path / "d1"), *trusted, "--json"])
    assert refused.exit_code == 2
    assert key["key_id"] in json.loads(refused.output)["message"]
    installed = runner.invoke(app, ["agent", "install", str(out), "--data-dir",
                                    str(tmp_path / "d2"), *trusted, "--decrypt-key",
                                    key["private_key"], "--json"])
    assert installed.exit_code == 0, installed.output
    assert json.loads(installed.output)["update"]["state"] == "COMMITTED"
    assert _files_holding(tmp_path / "d2", digits_models.tflite.read_bytes()) == []

    check = runner.invoke(app, ["device", "check", str(out), "--target", "generic-x86_64"])
    assert check.exit_code == 2 and "--decrypt-key" in check.output
    check = runner.invoke(app, ["device", "check", str(out), "--target", "generic-x86_64",
                                "--decrypt-key", key["private_key"], "--json"])
    assert check.exit_code == 0 and json.loads(check.output) == {"generic-x86_64": []}
    sealed = runner.invoke(app, ["diff", str(out), str(out), "--json"])
    assert sealed.exit_code == 0, sealed.output
    result = json.loads(sealed.output)
    assert "--decrypt-key" in result["ops"]["skipped"] and result["ops"]["rows"] == []
    assert "--decrypt-key" in result["agreement"]["skipped"]


def test_the_fleet_sends_a_sealed_model_only_to_devices_reporting_a_recipient_key(
        bundles: dict[str, Path], signing_keys: Keys,
        device_keys: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    from edgefleet.agent.protocol.payloads import ReportedState, decode, encode
    from edgefleet.agent.service import AgentService, ServiceConfig
    from edgefleet.fleet.compat import incompatibility
    from edgefleet.fleet.domain import Device, ModelVersion
    from edgefleet.fleet.registry import apply_reported

    agent = Agent(signing_keys.trusted, keys=_keys(device_keys["cam"]))
    service = AgentService(ServiceConfig(fleet="f", device_id="cam-1", data_dir=tmp_path),
                           agent)
    reported = decode(ReportedState, encode(service.reported_state()))  # as the fleet reads it
    cam_id = DeviceKey.load(device_keys["cam"][0]).key_id
    assert reported.decryption_keys == [cam_id]
    cam = apply_reported(Device(id="cam-1", fleet="f"), reported, 0)
    bare = Device(id="old", fleet="f", runtimes=dict(cam.runtimes))  # reports no keys
    other = bare.with_changes(id="other", decryption_keys=(
        DeviceKey.load(device_keys["other"][0]).key_id,))

    def version(bundle: Path) -> ModelVersion:
        m = _manifest(bundle)
        return ModelVersion(name=m.name, version=m.version, sha256="0" * 64,
                            size=bundle.stat().st_size, format=m.format,
                            runtime=m.runtime.name, min_runtime_version=m.runtime.min_version,
                            manifest=m.model_dump(mode="json"), path=str(bundle),
                            pushed_ms=0, pushed_by="t")

    sealed, plain = version(bundles["v2-sealed"]), version(bundles["v2-plain"])
    assert incompatibility(cam, sealed, None) is None
    assert "reports no decryption keys" in str(incompatibility(bare, sealed, None))
    assert f"encrypted for key ids {cam_id}" in str(incompatibility(other, sealed, None))
    assert incompatibility(bare, plain, None) is None
    assert incompatibility(other, plain, None) is None
