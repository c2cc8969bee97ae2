"""Ed25519 keys: generate, load, sign manifests and verify them against a trusted set.

A key is identified by ``key_id``: the first 16 hex digits of the sha256 of its
raw 32-byte public key. ``manifest.sig`` is a small JSON document naming the key
id and carrying the base64 signature over the exact ``manifest.json`` bytes.
Rotation is "add the new public key, re-sign, then remove the old one"; a fleet does
it with a signed keyring (:mod:`edgefleet.agent.protocol.keyring`, docs/keys.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edgefleet.agent.protocol.errors import BadSignatureError, KeyFileError, UnknownKeyError
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.protocol.pem import load_key

__all__ = [
    "PUBLIC_SUFFIX",
    "SECRET_SUFFIX",
    "SigningKey",
    "TrustedKeys",
    "generate_keypair",
    "key_id_of",
]

PUBLIC_SUFFIX = ".pub"
SECRET_SUFFIX = ".key"
SIGNATURE_ALG = "ed25519"


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key that signs bundle manifests."""

    private_key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id_of(self.private_key.public_key())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        return cls(load_key(path, Ed25519PrivateKey, private=True, what="signing key",  # type: ignore[type-abstract]
                            kind_name="Ed25519 private key",
                            hint="pass a key written by 'edgefleet keys generate' (the .key "
                                 "file)"))

    def sign(self, manifest_bytes: bytes) -> bytes:
        """Return the ``manifest.sig`` document for these exact manifest bytes."""
        signature = self.private_key.sign(manifest_bytes)
        doc = {"alg": SIGNATURE_ALG, "key_id": self.key_id,
               "sig": base64.b64encode(signature).decode("ascii")}
        return json.dumps(doc, sort_keys=True).encode()


class TrustedKeys:
    """The set of public keys a device or controller accepts bundles from."""

    def __init__(self, keys: dict[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = dict(keys or {})

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Key id -> public key (a copy: the set itself never changes behind a reader)."""
        return dict(self._keys)

    def add(self, public_key: Ed25519PublicKey) -> str:
        key_id = key_id_of(public_key)
        self._keys[key_id] = public_key
        return key_id

    @classmethod
    def from_paths(cls, paths: list[Path]) -> TrustedKeys:
        """Load public keys from ``.pub`` files or directories of them."""
        trusted = cls()
        for path in paths:
            files = sorted(Path(path).glob(f"*{PUBLIC_SUFFIX}")) if Path(path).is_dir() else [path]
            for file in files:
                trusted.add(_load_public(Path(file)))
        return trusted

    def verify(self, manifest_bytes: bytes, signature_doc: bytes) -> str:
        """Check ``manifest.sig`` against the manifest; return the signing key id."""
        key_id, signature = _parse_signature(signature_doc)
        public_key = self._keys.get(key_id)
        if public_key is None:
            trusted = ", ".join(self.key_ids) or "none"
            raise UnknownKeyError(
                f"bundle signed by unknown key {key_id} (trusted: {trusted})",
                hint="add the signer's public key to the trusted keys, or re-sign the bundle",
            )
        try:
            public_key.verify(signature, manifest_bytes)
        except InvalidSignature as exc:
            raise BadSignatureError(
                f"manifest signature does not verify with key {key_id}",
                hint="the bundle was altered after signing; rebuild and re-sign it",
            ) from exc
        return key_id


def _parse_signature(signature_doc: bytes) -> tuple[str, bytes]:
    try:
        doc = json.loads(signature_doc)
        if doc.get("alg") != SIGNATURE_ALG:
            raise ValueError(f"algorithm {doc.get('alg')!r} is not {SIGNATURE_ALG}")
        return str(doc["key_id"]), base64.b64decode(doc["sig"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise BadSignatureError(f"manifest.sig is malformed: {exc}",
                                hint="re-sign the bundle with 'edgefleet keys'") from exc


def _load_public(path: Path) -> Ed25519PublicKey:
    return load_key(path, Ed25519PublicKey, private=False, what="public key",  # type: ignore[type-abstract]
                    kind_name="Ed25519 public key",
                    hint="pass a .pub file written by 'edgefleet keys generate'")


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (mode 0600) and ``NAME.pub`` into ``directory``."""
    directory = Path(directory)
    secret_path = directory / f"{name}{SECRET_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    if secret_path.exists():
        raise KeyFileError(f"{secret_path} already exists",
                           hint="choose another --name or remove the old key first")
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    secret = private.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(secret_path, secret, mode=0o600)
    atomic_write(public_path, public, mode=0o644)
    return secret_path, public_path
