"""Reading PEM key files into the one key type a caller wants, with errors that say which."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization

from edgefleet.agent.protocol.errors import KeyFileError

__all__ = ["load_key"]

K = TypeVar("K")


def load_key(path: Path, kind: type[K], *, private: bool, what: str, kind_name: str,
             hint: str) -> K:
    """The ``kind`` key in the PEM file at ``path``; :class:`KeyFileError` naming ``what``
    (e.g. "signing key") when it cannot be read and ``kind_name`` when it is another type."""
    try:
        raw = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(raw, password=None) if private
               else serialization.load_pem_public_key(raw))
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc}", hint=hint) from exc
    if not isinstance(key, kind):
        raise KeyFileError(f"{path} is not an {kind_name}", hint=hint)
    return key
