"""Crash-safe file writes: temp file in the same folder, fsync, rename, fsync folder."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "read_int", "read_small", "sha256_bytes", "sha256_file",
           "temp_prefix"]


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_small(path: Path, limit: int) -> bytes:
    """A regular file of at most ``limit`` bytes, whole (a key, a certificate, a profile).
    A FIFO would block the open, a device never end the read: both are an OSError, as a
    file above ``limit`` is, whose ``strerror`` says which."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a folder, pipe or device)",
                      str(path))
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
    return data


def temp_prefix(path: Path) -> str:
    """The prefix of ``path``'s temporary file in its folder: its name cut to 100
    characters, so that the temporary name fits where the name itself fits (a file system
    takes 255 bytes a name; ``.NAME.XXXXXXXX.tmp`` adds 14)."""
    return f".{path.name[:100]}."


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_int(path: Path, default: int = 0) -> int:
    """A counter kept in a small text file; ``default`` when absent or unreadable."""
    try:
        return int(Path(path).read_text().strip() or default)
    except (OSError, ValueError):
        return default
