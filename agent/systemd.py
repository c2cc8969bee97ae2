"""systemd units shipped in the wheel: fill one in and write it where systemd reads it.

Each part ships its unit as package data (``agent/deploy/edgefleet-agent.service``,
``fleet/deploy/edgefleet-controller.service``). A template names four things:
``@USER@``, ``@DATA_DIR@`` and ``@EXEC_START@`` (the command line). Arguments are quoted
for systemd: ``%`` and ``$`` are doubled so that no value is read as a specifier or a
variable, except where the caller passes :data:`HOST_NAME` (systemd's ``%H``).
"""

from __future__ import annotations

import os
import pwd
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["HOST_NAME", "Unit", "exec_line", "render", "user_exists", "write_unit"]

HOST_NAME = "%H"  # systemd fills in the host name: each device gets its own id
UNIT_DIR = Path("etc/systemd/system")
_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


@dataclass(frozen=True)
class Unit:
    """A unit template shipped in ``package``'s ``deploy/`` folder."""

    package: str
    name: str

    def template(self) -> str:
        return (resources.files(self.package) / "deploy" / self.name).read_text("utf-8")


def _quote(arg: str) -> str:
    if arg == HOST_NAME:
        return arg
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: Sequence[str]) -> str:
    """``argv`` as one systemd ``ExecStart=`` value (each argument quoted when it must be)."""
    return " ".join(_quote(arg) for arg in argv)


def render(template: str, *, user: str, data_dir: Path, argv: Sequence[str]) -> str:
    return (template.replace("@USER@", user).replace("@DATA_DIR@", str(data_dir))
            .replace("@EXEC_START@", exec_line(argv)))


def write_unit(text: str, name: str, root: Path = Path("/")) -> Path:
    """Write ``name`` under ``root``'s systemd folder atomically (mode 0644); its path."""
    folder = root / UNIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / name)
    except BaseException:  # any failure: leave no temporary file behind, then re-raise
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / name


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
