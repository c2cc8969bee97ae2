"""The data dir's disk: the free-space check, disk-full errors, and the orphan sweep.

Every OS error an update meets while writing the data dir is translated here, once, into
a :class:`StorageError` (``DiskFullError`` for ENOSPC, EFBIG and EDQUOT), so the update
flow records a one-line reason and the CLI prints it without a traceback.

A process killed while writing leaves the temp file of ``atomic_write``
(``.NAME.XXXXXXXX.tmp``) or a download nobody will resume; :func:`sweep` removes them
when the update machinery starts on a data dir.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgefleet.agent.errors import AgentError

__all__ = ["DISK_FULL", "DISK_MARGIN", "DiskFullError", "StorageError", "check_free",
           "discard", "guarded", "storage_error", "sweep"]

DISK_MARGIN = 16 * 1024 * 1024
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
# where the update machinery writes: the data dir itself (journal, pointer), the slots and
# the downloads; the spool sweeps its own folder
_SWEPT = (".", "slots/a", "slots/b", "downloads")


class StorageError(AgentError):
    """A file of the data dir could not be written or read; the model served is unchanged."""


class DiskFullError(StorageError):
    """No room left (ENOSPC), a file-size limit (EFBIG) or a quota (EDQUOT)."""


def storage_error(exc: OSError, where: Path) -> StorageError:
    """The project error for ``exc`` met while writing ``where``."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in DISK_FULL:
        return DiskFullError(f"the disk is full: cannot write {where} ({reason})",
                             hint="free space on the device (or raise its file-size limit "
                                  "or quota), then retry")
    return StorageError(f"cannot write {where}: {reason}",
                        hint="check the data dir's disk and permissions, then retry")


@contextmanager
def guarded(where: Path) -> Iterator[None]:
    """Translate an OSError raised inside into a :class:`StorageError` naming ``where``."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, where) from exc


def check_free(data_dir: Path, size: int) -> None:
    """The download and its staged copy must fit, with a margin for the rest of the agent."""
    free = shutil.disk_usage(data_dir).free
    needed = 2 * size + DISK_MARGIN
    if free < needed:
        raise DiskFullError(f"not enough free disk in {data_dir}: {free} bytes free, the "
                            f"update needs {needed} (twice the bundle and a margin)",
                            hint="free space on the device, or ship a smaller bundle")


def discard(*paths: Path) -> None:
    """Remove files that must not be used again (a download that failed verification)."""
    for path in paths:
        path.unlink(missing_ok=True)


def sweep(data_dir: Path, keep: str | None = None) -> list[Path]:
    """Remove what killed runs left: temp files, a bundle half rebuilt from a delta
    (``.rebuild``, never resumed), and downloads of another bundle than ``keep`` (the
    sha256 of the update in flight, whose partial file or delta a restart resumes; None
    when no update is in flight: every download goes)."""
    orphans = [p for sub in _SWEPT for p in _temps(Path(data_dir) / sub)]
    downloads = Path(data_dir) / "downloads"
    if downloads.is_dir():
        orphans += [p for p in downloads.iterdir()
                    if p.is_file() and (keep is None or not p.name.startswith(keep)
                                        or p.name.endswith(".rebuild"))]
    for path in orphans:
        path.unlink(missing_ok=True)
    return orphans


def _temps(folder: Path) -> Iterator[Path]:
    """``atomic_write``'s temp files in ``folder``: ``.NAME.RANDOM.tmp``."""
    if folder.is_dir():
        yield from (p for p in folder.glob(".*.tmp") if p.is_file())
