"""The root of edgefleet's error tree, :class:`EdgefleetError`, and the errors of the device
contract: bundles, keys, documents, payloads, and HTTP requests refused with a status.

The whole tree, with the module of each error, is drawn in docs/architecture.md
("Error tree"); a test renders it from the classes and compares, so it cannot drift.

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
    "RequestError",
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


class SchemaVersionError(EdgefleetError):
    """A document (manifest, profile, payload, telemetry) carries a schema_version this build
    cannot read."""


class KeyFileError(EdgefleetError):
    """A signing or public key file cannot be read or written."""


class PayloadError(EdgefleetError):
    """An MQTT payload that is not valid JSON or fails its schema."""


class RequestError(EdgefleetError):
    """An HTTP request refused with an error ``status`` (400 unless told): by the device's
    inference server or by the controller's API, before it reaches the controller."""

    def __init__(self, message: str, status: int = 400, *, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status
