"""The bundle contract: a good bundle verifies; every kind of bad one is refused by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol import errors
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from edgefleet.agent.runtime import RuntimeLoadError
from tests import tamper
from tests.conftest import Keys


def test_good_bundle_verifies_and_names_its_key(digits_bundles: dict[str, Path],
                                                signing_keys: Keys) -> None:
    bundle = read_bundle(digits_bundles["tflite"], signing_keys.trusted)
    assert bundle.manifest.name == "digits" and bundle.manifest.format == "tflite"
    assert bundle.key_id == signing_keys.signer.key_id
    assert set(bundle.files) == {"model.tflite", "health.npz", "labels.txt"}
    assert bundle.labels == [str(i) for i in range(10)]


def test_altered_manifest_is_a_bad_signature(digits_bundles: dict[str, Path],
                                             signing_keys: Keys) -> None:
    files = tamper.members(digits_bundles["tflite"].read_bytes())
    files["manifest.json"] = files["manifest.json"].replace(b'"1.0.0"', b'"9.0.0"')
    with pytest.raises(errors.BadSignatureError, match="does not verify"):
        read_bundle(tamper.pack(files), signing_keys.trusted)


def test_bundle_signed_by_an_untrusted_key_is_refused(
        digits_bundles: dict[str, Path], tmp_path: Path, signing_keys: Keys) -> None:
    other, _ = generate_keypair(tmp_path, "other")
    raw = tamper.resigned(digits_bundles["tflite"], SigningKey.load(other), lambda m: None)
    with pytest.raises(errors.UnknownKeyError, match="unknown key"):
        read_bundle(raw, signing_keys.trusted)


def test_no_trusted_keys_refuses_everything(digits_bundles: dict[str, Path]) -> None:
    with pytest.raises(errors.UnknownKeyError, match="trusted: none"):
        read_bundle(digits_bundles["onnx"], TrustedKeys())


def test_changed_model_bytes_fail_the_hash(digits_bundles: dict[str, Path],
                                           signing_keys: Keys) -> None:
    data = bytearray(tamper.members(digits_bundles["tflite"].read_bytes())["model.tflite"])
    data[len(data) // 2] ^= 0x01
    raw = tamper.with_member(digits_bundles["tflite"], "model.tflite", bytes(data))
    with pytest.raises(errors.IntegrityError, match="model.tflite: sha256 differs"):
        read_bundle(raw, signing_keys.trusted)


def test_truncated_model_fails_the_size(digits_bundles: dict[str, Path],
                                        signing_keys: Keys) -> None:
    data = tamper.members(digits_bundles["onnx"].read_bytes())["model.onnx"]
    raw = tamper.with_member(digits_bundles["onnx"], "model.onnx", data[:-10])
    with pytest.raises(errors.IntegrityError, match=r"model.onnx: size \d+ bytes, manifest says"):
        read_bundle(raw, signing_keys.trusted)


def test_missing_health_file_is_named(digits_bundles: dict[str, Path],
                                      signing_keys: Keys) -> None:
    raw = tamper.without_member(digits_bundles["tflite"], "health.npz")
    with pytest.raises(errors.MissingFileError, match="health.npz"):
        read_bundle(raw, signing_keys.trusted)


def test_missing_signature_is_named(digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    raw = tamper.without_member(digits_bundles["tflite"], "manifest.sig")
    with pytest.raises(errors.MissingFileError, match="manifest.sig"):
        read_bundle(raw, signing_keys.trusted)


@pytest.mark.parametrize("name", ["../evil.txt", "sub/../../evil.txt"])
def test_member_with_dotdot_is_unsafe(digits_bundles: dict[str, Path], signing_keys: Keys,
                                      name: str) -> None:
    raw = tamper.with_member(digits_bundles["tflite"], name, b"x")
    with pytest.raises(errors.UnsafeMemberError, match=r"contains '\.\.'"):
        read_bundle(raw, signing_keys.trusted)


def test_member_with_absolute_path_is_unsafe(digits_bundles: dict[str, Path],
                                             signing_keys: Keys) -> None:
    raw = tamper.with_member(digits_bundles["tflite"], "/etc/evil", b"x")
    with pytest.raises(errors.UnsafeMemberError, match="absolute path"):
        read_bundle(raw, signing_keys.trusted)


@pytest.mark.parametrize("hard", [False, True])
def test_member_that_is_a_link_is_unsafe(digits_bundles: dict[str, Path], signing_keys: Keys,
                                         hard: bool) -> None:
    raw = tamper.with_link(digits_bundles["tflite"], "labels2.txt", "/etc/passwd", hard)
    with pytest.raises(errors.UnsafeMemberError, match="is a link to '/etc/passwd'"):
        read_bundle(raw, signing_keys.trusted)


def test_unlisted_member_is_refused(digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    raw = tamper.with_member(digits_bundles["tflite"], "model.onnx", b"payload")
    with pytest.raises(errors.IntegrityError, match="not listed in the manifest"):
        read_bundle(raw, signing_keys.trusted)


def test_a_member_that_is_no_bundle_file_is_refused_by_its_name(
        digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    raw = tamper.with_member(digits_bundles["tflite"], "extra.bin", b"payload")
    with pytest.raises(errors.UnsafeMemberError, match="'extra.bin' is not a bundle file"):
        read_bundle(raw, signing_keys.trusted)


def test_unknown_schema_version_is_named(digits_bundles: dict[str, Path],
                                         signing_keys: Keys) -> None:
    raw = tamper.resigned(digits_bundles["tflite"], signing_keys.signer,
                          lambda m: m.update(schema_version=99))
    with pytest.raises(errors.SchemaVersionError, match="schema_version 99"):
        read_bundle(raw, signing_keys.trusted)


def test_invalid_manifest_field_is_named(digits_bundles: dict[str, Path],
                                         signing_keys: Keys) -> None:
    raw = tamper.resigned(digits_bundles["tflite"], signing_keys.signer,
                          lambda m: m.update(version="not-semver"))
    with pytest.raises(errors.BundleFormatError, match="version"):
        read_bundle(raw, signing_keys.trusted)


def test_not_a_tar_is_a_format_error(signing_keys: Keys) -> None:
    with pytest.raises(errors.BundleFormatError, match="not a bundle archive"):
        read_bundle(b"\x00garbage" * 100, signing_keys.trusted)


def test_truncated_archive_is_refused(digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    raw = digits_bundles["tflite"].read_bytes()
    with pytest.raises(errors.BundleError):
        read_bundle(raw[: len(raw) // 3], signing_keys.trusted)


def _signed_with_model(bundle: Path, keys: Keys, name: str, data: bytes) -> bytes:
    digest = hashlib.sha256(data).hexdigest()

    def edit(manifest: dict[str, object]) -> None:
        manifest["files"][name] = {"sha256": digest, "size": len(data)}  # type: ignore[index]

    files = tamper.members(tamper.resigned(bundle, keys.signer, edit))
    files[name] = data
    return tamper.pack(files)


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_model_the_runtime_cannot_load_is_named(digits_bundles: dict[str, Path],
                                                signing_keys: Keys, fmt: str) -> None:
    raw = _signed_with_model(digits_bundles[fmt], signing_keys, f"model.{fmt}", b"not a model" * 9)
    agent = Agent(signing_keys.trusted)
    with pytest.raises(RuntimeLoadError, match="cannot load the model"):
        agent.load(raw)
    assert not agent.ready


def test_failed_load_keeps_serving_the_old_model(digits_bundles: dict[str, Path],
                                                 signing_keys: Keys) -> None:
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles["tflite"])
    before = agent.model
    raw = tamper.without_member(digits_bundles["onnx"], "health.npz")
    with pytest.raises(errors.MissingFileError):
        agent.load(raw)
    assert agent.model is before
    probs = next(iter(agent.predict(_one_digit()).values()))
    assert probs.shape == (1, 10)


def _one_digit() -> np.ndarray:
    from tests.models import load_digits

    return load_digits().x_test[:1]


def test_manifest_bytes_are_canonical_json(digits_bundles: dict[str, Path],
                                           signing_keys: Keys) -> None:
    bundle = read_bundle(digits_bundles["onnx"], signing_keys.trusted)
    parsed = json.loads(bundle.manifest_bytes)
    assert parsed["schema_version"] == 1
    assert parsed["runtime"]["name"] == "onnxruntime"
    assert parsed["files"]["model.onnx"]["size"] == len(bundle.model_bytes)
