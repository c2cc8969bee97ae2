"""Models encrypted at rest: AES-256-GCM under a random data key wrapped per X25519 recipient.

Sealing (on the converter's host)::

    data_key  = 32 random bytes;  nonce = 12 random bytes
    aad       = "edgefleet-model-v1" NUL name NUL version NUL format NUL plain_sha256
    model.<format>.enc = AES-256-GCM(data_key, nonce, plain model, aad)   (tag appended)
    for each recipient public key R (a device's, or one shared by a fleet):
        E         = a fresh ephemeral X25519 key pair
        kek       = HKDF-SHA256(E.private x R, salt = E.public || R, info = WRAP_INFO)
        wrapped   = AES-256-GCM(kek, 12 random bytes, data_key, aad || key_id(R))

The manifest's ``encryption`` section records the nonce, the plain model's sha256 and
size, and per recipient its key id (the first 16 hex digits of the sha256 of the raw
public key), E.public, the wrap nonce and the wrapped key; ``files`` lists the
ciphertext's sha256. The manifest is signed as before, so altering a wrapped key,
a nonce or the recipient list breaks the signature.

Opening (on the device) finds a recipient whose key id this device holds, unwraps the
data key, decrypts in memory and checks the plain sha256: nothing here writes to disk
except key files. Key files: ``NAME.x25519`` (private, PEM PKCS#8, mode 0600) and
``NAME.x25519pub`` (public, PEM). The public suffix is not ``.pub`` on purpose: folders
of ``.pub`` files are trusted Ed25519 signing keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgefleet.agent.protocol.errors import BundleError, KeyFileError
from edgefleet.agent.protocol.files import atomic_write, sha256_bytes
from edgefleet.agent.protocol.manifest import Encryption, Manifest, Recipient
from edgefleet.agent.protocol.pem import load_key

__all__ = [
    "PRIVATE_SUFFIX",
    "PUBLIC_SUFFIX",
    "DecryptionError",
    "DecryptionKeys",
    "DeviceKey",
    "NoDecryptionKeyError",
    "RecipientKey",
    "decrypt_model",
    "encrypt_model",
    "generate_device_key",
    "model_aad",
]

PRIVATE_SUFFIX = ".x25519"
PUBLIC_SUFFIX = ".x25519pub"
WRAP_INFO = b"edgefleet model key wrap v1"
_AAD_PREFIX = b"edgefleet-model-v1"


class NoDecryptionKeyError(BundleError):
    """The bundle's model is encrypted for keys this device does not hold."""


class DecryptionError(BundleError):
    """A matching key was found but the wrapped key or the ciphertext does not open."""


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(public: X25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


@dataclass(frozen=True)
class RecipientKey:
    """A public X25519 key a model is encrypted for (``NAME.x25519pub``)."""

    public_key: X25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    @classmethod
    def load(cls, path: Path) -> RecipientKey:
        return cls(load_key(path, X25519PublicKey, private=False,  # type: ignore[type-abstract]
                            what="encryption public key", kind_name="X25519 public key",
                            hint="pass a NAME.x25519pub file written by "
                                 "'edgefleet keys generate-encryption'"))


@dataclass(frozen=True)
class DeviceKey:
    """A private X25519 key that opens models encrypted for its public key (``NAME.x25519``)."""

    private_key: X25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id_of(self.private_key.public_key())

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        return cls(load_key(path, X25519PrivateKey, private=True, what="decryption key",  # type: ignore[type-abstract]
                            kind_name="X25519 private key",
                            hint="pass a NAME.x25519 file written by "
                                 "'edgefleet keys generate-encryption'"))


class DecryptionKeys:
    """The private keys a device opens encrypted models with, by key id."""

    def __init__(self, keys: Iterable[DeviceKey] = ()) -> None:
        self._keys = {k.key_id: k for k in keys}

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def get(self, key_id: str) -> DeviceKey | None:
        return self._keys.get(key_id)

    @classmethod
    def from_paths(cls, paths: Sequence[Path]) -> DecryptionKeys:
        """``NAME.x25519`` files, or folders of them (other files in a folder are skipped)."""
        keys = []
        for path in map(Path, paths):
            files = sorted(path.glob(f"*{PRIVATE_SUFFIX}")) if path.is_dir() else [path]
            keys += [DeviceKey.load(f) for f in files]
        return cls(keys)


def generate_device_key(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.x25519`` (mode 0600) and ``NAME.x25519pub`` into ``directory``."""
    directory = Path(directory)
    secret_path = directory / f"{name}{PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    if secret_path.exists():
        raise KeyFileError(f"{secret_path} already exists",
                           hint="choose another --name or remove the old key first")
    directory.mkdir(parents=True, exist_ok=True)
    private = X25519PrivateKey.generate()
    secret = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(secret_path, secret, mode=0o600)
    atomic_write(public_path, public, mode=0o644)
    return secret_path, public_path


def model_aad(name: str, version: str, fmt: str, plain_sha256: str) -> bytes:
    """What the ciphertext is bound to: a model cannot be moved into another bundle."""
    return b"\x00".join([_AAD_PREFIX, *(s.encode() for s in (name, version, fmt, plain_sha256))])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kek(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient,
                info=WRAP_INFO).derive(shared)


def _wrap(data_key: bytes, recipient: RecipientKey, aad: bytes) -> Recipient:
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = _raw(ephemeral.public_key())
    kek = _kek(ephemeral.exchange(recipient.public_key), ephemeral_raw,
               _raw(recipient.public_key))
    nonce = os.urandom(12)
    wrapped = AESGCM(kek).encrypt(nonce, data_key, aad + recipient.key_id.encode())
    return Recipient(key_id=recipient.key_id, ephemeral_key=_b64(ephemeral_raw),
                     nonce=_b64(nonce), wrapped_key=_b64(wrapped))


def encrypt_model(plain: bytes, recipients: Sequence[RecipientKey], name: str, version: str,
                  fmt: str) -> tuple[bytes, Encryption]:
    """The ciphertext and the manifest's ``encryption`` section, for every recipient."""
    if not recipients:
        raise KeyFileError("no recipient keys to encrypt for",
                           hint="pass --encrypt-for NAME.x25519pub")
    unique = list({r.key_id: r for r in recipients}.values())
    plain_sha256 = sha256_bytes(plain)
    aad = model_aad(name, version, fmt, plain_sha256)
    data_key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(12)
    ciphertext = AESGCM(data_key).encrypt(nonce, plain, aad)
    section = Encryption(nonce=_b64(nonce), plain_sha256=plain_sha256, plain_size=len(plain),
                         recipients=[_wrap(data_key, r, aad) for r in unique])
    return ciphertext, section


def decrypt_model(ciphertext: bytes, manifest: Manifest, keys: DecryptionKeys) -> bytes:
    """The plain model, checked against its recorded sha256; raise why it cannot be had."""
    section = manifest.encryption
    if section is None:
        return ciphertext
    recipient, key = _find(section, keys)
    aad = model_aad(manifest.name, manifest.version, manifest.format, section.plain_sha256)
    try:
        shared = key.private_key.exchange(
            X25519PublicKey.from_public_bytes(_unb64(recipient.ephemeral_key)))
        kek = _kek(shared, _unb64(recipient.ephemeral_key), _raw(key.private_key.public_key()))
        data_key = AESGCM(kek).decrypt(_unb64(recipient.nonce), _unb64(recipient.wrapped_key),
                                       aad + recipient.key_id.encode())
        plain = AESGCM(data_key).decrypt(_unb64(section.nonce), ciphertext, aad)
    except (InvalidTag, ValueError) as exc:
        raise DecryptionError(
            f"cannot decrypt {manifest.ref} with key {recipient.key_id}: the wrapped key or the "
            "model ciphertext does not authenticate",
            hint="the bundle was altered or re-encrypted wrongly; fetch or rebuild it") from exc
    if sha256_bytes(plain) != section.plain_sha256:
        raise DecryptionError(f"the decrypted model of {manifest.ref} differs from its "
                              "recorded sha256", hint="rebuild the bundle")
    return plain


def _find(section: Encryption, keys: DecryptionKeys) -> tuple[Recipient, DeviceKey]:
    for recipient in section.recipients:
        key = keys.get(recipient.key_id)
        if key is not None:
            return recipient, key
    held = ", ".join(keys.key_ids) or "none"
    raise NoDecryptionKeyError(
        f"no key for this bundle: it is encrypted for key ids {', '.join(section.key_ids)}; "
        f"this side holds {held}",
        hint="pass --decrypt-key NAME.x25519 (or put it in DATA_DIR/keys), or re-encrypt the "
             "bundle for this device's key")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecryptionError(f"malformed base64 in the encryption section: {exc}",
                              hint="rebuild the bundle") from exc
