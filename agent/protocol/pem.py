"""Reading PEM key files into the one key type a caller wants, with errors that say which."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from edgefleet.agent.protocol.errors import KeyFileError
from edgefleet.agent.protocol.files import read_small

__all__ = ["load_key"]

K = TypeVar("K")
MAX_KEY_BYTES = 64 * 1024  # read at most: a PEM key is a few hundred bytes


def load_key(path: Path, kind: type[K], *, private: bool, what: str, kind_name: str,
             hint: str) -> K:
    """The ``kind`` key in the PEM file at ``path``; :class:`KeyFileError` naming ``what``
    (e.g. "signing key") when it cannot be read and ``kind_name`` when it is another type."""
    _regular(Path(path), what, hint)
    try:
        raw = read_small(Path(path), MAX_KEY_BYTES)
        key = (serialization.load_pem_private_key(raw, password=None) if private
               else serialization.load_pem_public_key(raw))
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc}", hint=hint) from exc
    if not isinstance(key, kind):
        raise KeyFileError(f"{path} is not an {kind_name}", hint=hint)
    return key


def _regular(path: Path, what: str, hint: str) -> None:
    """A key is a regular file: reading a pipe blocks until a writer comes, a device never
    ends. A path that does not exist is left to the read, which says so."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else \
            "not a regular file (a pipe, device or socket)"
        raise KeyFileError(f"{what} {path} is {kind}: a key is read from a file", hint=hint)
