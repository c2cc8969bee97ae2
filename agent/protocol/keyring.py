"""The fleet keyring: the Ed25519 public keys a fleet trusts, numbered and signed.

Key rotation without touching devices (docs/keys.md). The controller publishes the
keyring retained on ``edgefleet/v1/{fleet}/_fleet/keyring``; a device accepts it only if

1. it parses: ``schema_version`` 1, 1 to 16 keys, each ``key_id`` the id of its key;
2. a key the device trusts *now* signed it, and every signature made with a key the
   device trusts verifies (one that does not means the document was altered);
3. it certifies itself: one of the keys it lists signed it too, so the stored copy
   verifies on its own after a restart;
4. its ``serial`` is greater than the serial the device holds: an older keyring
   replayed by someone with broker access is refused (the same one again is a no-op).

Then the device stores it (``DATA_DIR/keyring.json``, atomically) and trusts exactly
its keys from then on, across restarts. The root of trust is the key installed at
provisioning: it signs the first keyring. A stolen broker credential cannot add a key.

The document::

    {"schema_version": 1,
     "keyring": {"serial": 2, "issued": "2025-05-01T12:00:00Z",
                 "keys": [{"key_id": "<16 hex>", "public_key": "<base64, raw 32 bytes>",
                           "name": "signing-2"}, ...]},
     "signatures": [{"alg": "ed25519", "key_id": "<16 hex>", "sig": "<base64>"}, ...]}

Signatures cover the canonical bytes of ``keyring`` (JSON with sorted keys, no
whitespace, ASCII): the layout of the file does not matter, every field does.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.agent.protocol.errors import PayloadError
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.protocol.schema import Document, _summarise, decode_json, validate_document
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, key_id_of

__all__ = [
    "KEYRING_FILE",
    "KeyEntry",
    "KeyringError",
    "SignedKeyring",
    "StaleKeyringError",
    "accept_keyring",
    "build_keyring",
    "load_keyring",
    "parse_keyring",
    "save_keyring",
    "trust_at_start",
]

KEYRING_FILE = "keyring.json"
MAX_KEYRING_BYTES = 64 * 1024
MAX_KEYS = 16
MAX_SERIAL = 2**53 - 1  # exact in every JSON reader
_KEY_ID = r"^[0-9a-f]{16}$"
_HINT = "see docs/keys.md; write keyrings with 'edgefleet keys rotate' or 'keys retire'"


class KeyringError(PayloadError):
    """A keyring that is malformed, not signed by a trusted key, or altered."""


class StaleKeyringError(KeyringError):
    """A keyring whose serial is not newer than the one held: a replay, or a mistake."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)


class KeyEntry(_Strict):
    """One trusted public key: its id, the raw 32 bytes in base64, and a name for people."""

    key_id: str = Field(pattern=_KEY_ID)
    public_key: str = Field(min_length=1, max_length=64)
    name: str = Field(default="", max_length=64)


class _Body(_Strict):
    serial: int = Field(ge=1, le=MAX_SERIAL)
    issued: str = Field(min_length=1, max_length=64)
    keys: list[KeyEntry] = Field(min_length=1, max_length=MAX_KEYS)


class _Signature(_Strict):
    alg: Literal["ed25519"]
    key_id: str = Field(pattern=_KEY_ID)
    sig: str = Field(min_length=1, max_length=128)


class _Envelope(Document):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    schema_version: int
    keyring: dict[str, Any]
    signatures: list[_Signature] = Field(min_length=1, max_length=MAX_KEYS)


@dataclass(frozen=True)
class SignedKeyring:
    """A parsed keyring that certifies itself; ``raw`` is the document as stored."""

    serial: int
    issued: str
    keys: tuple[KeyEntry, ...]
    signatures: tuple[tuple[str, bytes], ...]  # (key id, signature) as in the document
    signed_bytes: bytes
    raw: bytes

    @property
    def key_ids(self) -> list[str]:
        return sorted(entry.key_id for entry in self.keys)

    @property
    def signed_by(self) -> list[str]:
        return [key_id for key_id, _ in self.signatures]

    def trusted(self) -> TrustedKeys:
        return TrustedKeys({entry.key_id: _public_key(entry) for entry in self.keys})

    def verify(self, trusted: TrustedKeys) -> list[str]:
        """The ids of the ``trusted`` keys that signed it; raise if none, or if one lies."""
        known = trusted.public_keys()
        good = []
        for key_id, signature in self.signatures:
            public_key = known.get(key_id)
            if public_key is None:
                continue  # a signer this side does not know: neither proof nor harm
            try:
                public_key.verify(signature, self.signed_bytes)
            except InvalidSignature as exc:
                raise KeyringError(
                    f"keyring serial {self.serial}: the signature of trusted key {key_id} "
                    "does not verify", hint="the keyring was altered after signing; "
                    "publish the file 'edgefleet keys' wrote") from exc
            good.append(key_id)
        if not good:
            raise KeyringError(
                f"keyring serial {self.serial} is signed by {', '.join(self.signed_by)}, "
                f"none of which is trusted here (trusted: {', '.join(trusted.key_ids) or 'none'})",
                hint="sign it with a key the devices trust now: 'edgefleet keys rotate' and "
                     "'keys retire' sign with the current keys")
        return good

    def summary(self) -> dict[str, Any]:
        return {"serial": self.serial, "issued": self.issued, "signed_by": self.signed_by,
                "keys": [{"key_id": k.key_id, "name": k.name} for k in self.keys]}


def build_keyring(keys: Iterable[tuple[str, Ed25519PublicKey]], serial: int,
                  signers: Iterable[SigningKey], issued: str | None = None) -> bytes:
    """The document bytes for ``keys`` (name, public key), signed by every one of ``signers``."""
    entries = {}
    for name, public_key in keys:
        key_id = key_id_of(public_key)
        entries[key_id] = {"key_id": key_id, "name": name,
                           "public_key": base64.b64encode(_raw(public_key)).decode("ascii")}
    body = {"serial": serial, "keys": sorted(entries.values(), key=lambda e: e["key_id"]),
            "issued": issued or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    signed = _canonical(body)
    signatures = [{"alg": "ed25519", "key_id": key.key_id,
                   "sig": base64.b64encode(key.private_key.sign(signed)).decode("ascii")}
                  for key in {s.key_id: s for s in signers}.values()]
    doc = {"schema_version": 1, "keyring": body, "signatures": signatures}
    raw = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    parse_keyring(raw)  # refuse to write what no device would accept
    return raw


def parse_keyring(raw: bytes) -> SignedKeyring:
    """Decode and check a keyring document, including that it certifies itself."""
    if len(raw) > MAX_KEYRING_BYTES:
        raise KeyringError(f"keyring is {len(raw)} bytes, more than {MAX_KEYRING_BYTES}",
                           hint=_HINT)
    envelope = validate_document(_Envelope, decode_json(raw, "keyring", KeyringError),
                                 "keyring", KeyringError)
    body = _body(envelope.keyring)
    keyring = SignedKeyring(body.serial, body.issued, tuple(body.keys),
                            _signatures(envelope.signatures), _canonical(envelope.keyring), raw)
    _check_entries(keyring.keys)
    if not set(keyring.signed_by) & set(keyring.key_ids):
        raise KeyringError(
            f"keyring serial {keyring.serial} is not signed by any key it lists, so a device "
            "could not check it again after a restart",
            hint="sign it with one of its own keys too ('keys retire' signs with the keys that "
                 "stay)")
    keyring.verify(keyring.trusted())
    return keyring


def accept_keyring(raw: bytes, trusted: TrustedKeys,
                   held: SignedKeyring | None) -> SignedKeyring | None:
    """The keyring to trust from now on, or None when it is the one already held.

    Raises :class:`KeyringError` when no key of ``trusted`` signed it and
    :class:`StaleKeyringError` when its serial is not newer than ``held``'s.
    """
    keyring = parse_keyring(raw)
    if held is not None and keyring.signed_bytes == held.signed_bytes:
        return None
    keyring.verify(trusted)
    if held is not None and keyring.serial <= held.serial:
        what = "is older than" if keyring.serial < held.serial else "differs from, with the " \
                                                                  "same serial,"
        raise StaleKeyringError(
            f"keyring serial {keyring.serial} {what} the keyring held here "
            f"(serial {held.serial}): refused as a replay",
            hint="a new keyring needs a higher serial: 'edgefleet keys rotate' or 'keys retire'")
    return keyring


def load_keyring(path: Path) -> SignedKeyring | None:
    """The keyring stored at ``path``; None when there is none."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyringError(f"cannot read the keyring {path}: {exc.strerror}",
                           hint="check the file's permissions") from exc
    try:
        return parse_keyring(raw)
    except KeyringError as exc:
        raise KeyringError(f"the stored keyring {path} is damaged: {exc.message}",
                           hint="remove it to fall back to the provisioned keys; the fleet "
                                "publishes its keyring again") from exc


def save_keyring(path: Path, keyring: SignedKeyring) -> None:
    atomic_write(Path(path), keyring.raw)


def trust_at_start(provisioned: TrustedKeys, data_dir: Path) -> TrustedKeys:
    """The keys to trust at start: the stored keyring's, else the provisioned ones."""
    stored = load_keyring(Path(data_dir) / KEYRING_FILE)
    return stored.trusted() if stored is not None else provisioned


def _body(data: dict[str, Any]) -> _Body:
    try:
        return _Body.model_validate(data)
    except ValidationError as exc:
        raise KeyringError(f"keyring is invalid: {_summarise(exc)}", hint=_HINT) from exc


def _signatures(signatures: list[_Signature]) -> tuple[tuple[str, bytes], ...]:
    seen: dict[str, bytes] = {}
    for signature in signatures:
        if signature.key_id in seen:
            raise KeyringError(f"key {signature.key_id} signed the keyring twice", hint=_HINT)
        try:
            seen[signature.key_id] = base64.b64decode(signature.sig, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyringError(f"signature of {signature.key_id} is not base64",
                               hint=_HINT) from exc
    return tuple(seen.items())


def _check_entries(entries: tuple[KeyEntry, ...]) -> None:
    seen = set()
    for entry in entries:
        actual = key_id_of(_public_key(entry))
        if actual != entry.key_id:
            raise KeyringError(f"key {entry.key_id} ({entry.name or 'unnamed'}) holds the "
                               f"public key of {actual}", hint=_HINT)
        if entry.key_id in seen:
            raise KeyringError(f"key {entry.key_id} is listed twice", hint=_HINT)
        seen.add(entry.key_id)


def _public_key(entry: KeyEntry) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(
            base64.b64decode(entry.public_key, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise KeyringError(f"key {entry.key_id}: public_key is not 32 bytes of base64",
                           hint=_HINT) from exc


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _canonical(body: Any) -> bytes:
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode()
    except ValueError as exc:  # NaN or Infinity: not JSON
        raise KeyringError(f"keyring holds a value JSON cannot carry: {exc}", hint=_HINT) from exc
