"""The error tree of edgefleet, rooted in :class:`EdgefleetError`.

Every part of the project raises errors from this one tree; the device contract
defines the root and the errors of the contract itself, and the agent, the
converter and the fleet hang their own branches under it::

    EdgefleetError
    ├── BundleError                 a bundle that cannot be trusted or used
    │   ├── BundleFormatError       not a readable .efb archive
    │   ├── UnsafeMemberError       member path with "..", absolute, or a link
    │   ├── MissingFileError        a file the manifest needs is not in the archive
    │   ├── IntegrityError          a file's sha256 or size differs from the manifest
    │   ├── SignatureError          manifest.sig does not check out
    │   │   ├── BadSignatureError   signed by a trusted key id, but the bytes differ
    │   │   └── UnknownKeyError     signed by a key that is not trusted here
    │   ├── SchemaVersionError      a schema_version this build does not read
    │   ├── NoDecryptionKeyError    an encrypted model, and no recipient key here
    │   └── DecryptionError         a wrapped key or ciphertext that does not open
    │                               (both in agent.protocol.encryption)
    ├── KeyFileError                a key file that cannot be read or written
    ├── PayloadError                an MQTT payload that fails its schema
    │   └── KeyringError            a fleet keyring that does not verify (agent.protocol.keyring)
    │       └── StaleKeyringError   one older than the keyring held (a replay)
    └── (agent.errors, converter.errors, fleet.errors add their own branches)

Each error carries ``hint`` (what to do about it) and ``transient`` (whether a
retry may succeed), so callers can report or retry without parsing messages.
"""

from __future__ import annotations

__all__ = [
    "BadSignatureError",
    "BundleError",
    "BundleFormatError",
    "EdgefleetError",
    "IntegrityError",
    "KeyFileError",
    "MissingFileError",
    "PayloadError",
    "SchemaVersionError",
    "SignatureError",
    "UnknownKeyError",
    "UnsafeMemberError",
]


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""

    transient: bool = False

    def __init__(self, message: str, *, hint: str = "", transient: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if transient is not None:
            self.transient = transient

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BundleError(EdgefleetError):
    """A bundle that cannot be trusted or used; the device keeps what it runs."""


class BundleFormatError(BundleError):
    """The file is not a readable bundle archive."""


class UnsafeMemberError(BundleError):
    """A member path that could escape the bundle: absolute, with "..", or a link."""


class MissingFileError(BundleError):
    """A file that the manifest lists or the format needs is absent."""


class IntegrityError(BundleError):
    """A member's sha256 or size differs from the manifest."""


class SignatureError(BundleError):
    """The manifest signature does not verify."""


class BadSignatureError(SignatureError):
    """The signature names a trusted key but does not match the manifest bytes."""


class UnknownKeyError(SignatureError):
    """The bundle was signed with a key this device does not trust."""


class SchemaVersionError(BundleError):
    """A document carries a schema_version this build cannot read."""


class KeyFileError(EdgefleetError):
    """A signing or public key file cannot be read or written."""


class PayloadError(EdgefleetError):
    """An MQTT payload that is not valid JSON or fails its schema."""
