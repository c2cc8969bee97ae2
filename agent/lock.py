"""The data dir's advisory lock: ``agent run`` holds it while it runs, and ``agent install``,
``remove`` and ``rollback`` while they change the data dir, so none of them changes a data
dir another one works on (a running agent's models, runners and reported state would no
longer match the files; two installs would race for one free slot), and a second agent
refuses to run on it.

An advisory ``flock`` on ``DATA_DIR/agent.lock``: the kernel releases it when the process
ends, however it ends, so a crashed agent never leaves a stale lock behind. The file is
opened without following a symlink and is written (the holder's process id and command, for
the message of whoever is refused) only once the lock is held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from edgefleet.agent.errors import AgentError
from edgefleet.agent.update.disk import guarded

__all__ = ["LOCK_FILE", "DataDirInUseError", "hold", "holding"]

LOCK_FILE = "agent.lock"
RUN = "run"
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class DataDirInUseError(AgentError):
    """A running agent, or another command changing it, holds the data dir: it is not
    changed under it."""


def hold(data_dir: Path, command: str = RUN, doing: str = "run another agent on it"
         ) -> IO[bytes]:
    """Take the lock for as long as the returned file stays open (``agent run``: the
    process's life); refused, naming the holder, when another process holds it."""
    data = Path(data_dir)
    with guarded(data / LOCK_FILE):  # a data dir that cannot be written: one line
        data.mkdir(parents=True, exist_ok=True)
        handle = _open(data, _FLAGS)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise _in_use(data, doing) from exc
    with contextlib.suppress(OSError):  # the holder is for the message only
        handle.truncate(0)
        handle.write(f"{os.getpid()} {command}".encode())
        handle.flush()
    return handle


@contextlib.contextmanager
def holding(data_dir: Path, command: str, doing: str) -> Iterator[None]:
    """Hold the lock while ``agent <command>`` changes ``data_dir`` (one that does not exist
    yet is made: what the command writes goes there).

    A command that fails on a data dir it made (an unreadable bundle installed on a fresh
    device) takes back what it made: the lock file and the folders that hold nothing else,
    so a device is left as it was, with no data dir that looks set up."""
    made = _missing(Path(data_dir))
    handle = hold(data_dir, command, doing)
    try:
        yield
    except BaseException:
        if made:
            _unmake(Path(data_dir), made)
        raise
    finally:
        handle.close()


def _missing(data: Path) -> list[Path]:
    """The folders of ``data`` that do not exist yet, innermost first."""
    missing: list[Path] = []
    for folder in (data, *data.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing.append(folder)
    return missing


def _unmake(data: Path, made: list[Path]) -> None:
    """Remove the lock file, then each folder of ``made`` that is empty (one another
    process wrote to stays, and so do the folders above it)."""
    with contextlib.suppress(OSError):  # best effort: the command's own error is what counts
        (data / LOCK_FILE).unlink()
        for folder in made:
            folder.rmdir()


def _open(data: Path, flags: int) -> IO[bytes]:
    """The lock file, never through a symlink (refused: it would lock, and the holder write
    over, whatever file it points at)."""
    path = data / LOCK_FILE
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unusable(data, exc) from exc
        raise
    return os.fdopen(fd, "r+b" if flags & os.O_RDWR else "rb")


def _unusable(data: Path, exc: OSError) -> AgentError:
    path = data / LOCK_FILE
    if exc.errno == errno.ELOOP or path.is_symlink():
        return AgentError(f"{path} is a symlink: the data dir's lock file is not followed "
                          "anywhere else",
                          hint=f"remove it ('rm {path}'); the agent makes it again")
    return AgentError(f"cannot open {path}: {exc.strerror or exc}",
                      hint="check the data dir's permissions")


def _in_use(data_dir: Path, doing: str) -> DataDirInUseError:
    holder = ""
    with contextlib.suppress(OSError, AgentError), \
            _open(data_dir, os.O_RDONLY | os.O_NOFOLLOW) as handle:
        holder = handle.read(200).decode(errors="replace").strip()
    pid, _, command = holder.partition(" ")
    who = f" (process {pid})" if pid.isdigit() else ""
    if command and command != RUN:
        return DataDirInUseError(
            f"'edgefleet agent {command}'{who} is changing {data_dir}: cannot {doing} "
            "until it ends",
            hint="wait for it to finish, then run this again")
    return DataDirInUseError(
        f"an agent runs on {data_dir}{who}: cannot {doing} while it does",
        hint="stop the agent first (e.g. 'systemctl stop edgefleet-agent'), then run this "
             "again; a device managed by a fleet is changed by a rollout instead")
