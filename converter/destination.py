"""Where the bundle goes: the folder of ``-o`` is tried before converting (a temp file made
and removed there, as the final write makes one), and the OS errors of the final write (a
full disk, no permission, a read-only file system) become one :class:`BundleWriteError` that
names the path and the cause."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgefleet.agent.protocol.files import temp_prefix
from edgefleet.converter.errors import BundleWriteError

__all__ = ["check_writable", "write_error", "writing"]

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM)


def check_writable(path: Path) -> None:
    """A file can be made in the folder of ``path`` and removed again; else
    :class:`BundleWriteError`."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise write_error(exc, path) from exc


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Translate an OSError raised inside (writing ``path``) into :class:`BundleWriteError`."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, path) from exc


def write_error(exc: OSError, path: Path) -> BundleWriteError:
    """The one-line error for ``exc``, met writing the bundle at ``path``."""
    folder = path.parent
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _FULL:
        return BundleWriteError(f"cannot write {path}: no room left in {folder} ({reason})",
                                     hint=f"free space in {folder} (or raise its quota or "
                                     "file-size limit), or write the bundle elsewhere with -o")
    if exc.errno in _DENIED:
        return BundleWriteError(f"cannot write {path}: this user may not write in {folder} "
                                f"({reason})",
                                hint="write the bundle to a folder of your own with -o, or "
                                     "change the folder's permissions")
    if exc.errno == errno.EROFS:
        return BundleWriteError(f"cannot write {path}: {folder} is on a read-only file "
                                f"system ({reason})", hint="write the bundle elsewhere with -o")
    if exc.errno == errno.ENAMETOOLONG:
        return BundleWriteError(f"cannot write {path}: its name is longer than {folder}'s "
                                f"file system takes ({reason})", hint="give -o a shorter name")
    return BundleWriteError(f"cannot write {path}: {folder} takes no new file ({reason})",
                            hint="write the bundle to an ordinary folder with -o")
