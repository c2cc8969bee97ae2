"""The data dir's advisory lock: ``agent run`` holds it while it runs, so ``agent install``,
``remove`` and ``rollback`` refuse to change a data dir a running agent works on (its models,
runners and reported state would no longer match the files), and a second agent refuses to
run on it.

An advisory ``flock`` on ``DATA_DIR/agent.lock``: the kernel releases it when the process
ends, however it ends, so a crashed agent never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from edgefleet.agent.errors import AgentError
from edgefleet.agent.update.disk import guarded

__all__ = ["LOCK_FILE", "DataDirInUseError", "check_unlocked", "hold"]

LOCK_FILE = "agent.lock"


class DataDirInUseError(AgentError):
    """A running agent holds the data dir: it is not changed under it."""


def hold(data_dir: Path) -> IO[bytes]:
    """Take the lock for as long as the returned file stays open (the process's life);
    refused when another process holds it."""
    with guarded(Path(data_dir) / LOCK_FILE):  # a data dir that cannot be written: one line
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        handle = open(Path(data_dir) / LOCK_FILE, "a+b")  # noqa: SIM115 - held on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise _in_use(data_dir, "run another agent on it") from exc
    with contextlib.suppress(OSError):  # the process id is for the message only
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())
        handle.flush()
    return handle


def check_unlocked(data_dir: Path, doing: str) -> None:
    """Refuse ``doing`` while a running agent holds ``data_dir`` (a data dir that does not
    exist, or has no lock file, is held by nobody)."""
    path = Path(data_dir) / LOCK_FILE
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except OSError:
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            raise _in_use(data_dir, doing) from exc
        fcntl.flock(handle, fcntl.LOCK_UN)


def _in_use(data_dir: Path, doing: str) -> DataDirInUseError:
    pid = ""
    with contextlib.suppress(OSError):
        pid = (Path(data_dir) / LOCK_FILE).read_text().strip()
    who = f" (process {pid})" if pid.isdigit() else ""
    return DataDirInUseError(
        f"an agent runs on {data_dir}{who}: cannot {doing} while it does",
        hint="stop the agent first (e.g. 'systemctl stop edgefleet-agent'), then run this "
             "again; a device managed by a fleet is changed by a rollout instead")
