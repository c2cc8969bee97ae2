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
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from edgefleet.agent.errors import ServiceInstallError

__all__ = ["HOST_NAME", "Unit", "check_argv", "check_data_dir", "check_user", "exec_line",
           "render", "user_exists", "write_unit"]

HOST_NAME = "%H"  # systemd fills in the host name: each device gets its own id
UNIT_DIR = Path("etc/systemd/system")
_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_DATA_DIR = re.compile(r"^/[A-Za-z0-9._/@+-]+$")
# folders whose whole tree a service must never be let write (ReadWritePaths= undoes
# ProtectSystem=strict for the folder it names)
_SYSTEM = {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc",
           "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib"}


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


def check_user(name: str) -> str:
    """A system user name (``useradd``'s rule): nothing else can stand on ``User=``."""
    if not _USER.match(name):
        raise ServiceInstallError(
            f"{name!r} is not a system user name",
            hint="use 1-32 lower-case letters, digits, '_' or '-', starting with a letter")
    return name


def check_data_dir(path: Path) -> Path:
    """An absolute, plain folder of the service's own: never a system folder, never relative."""
    text = str(path)
    normal = str(PurePosixPath(os.path.normpath(text))) if text.startswith("/") else text
    if not _DATA_DIR.match(text) or normal != text or ".." in text.split("/"):
        raise ServiceInstallError(
            f"--data-dir {text!r} is not a plain absolute folder",
            hint="give an absolute path of letters, digits and . _ - / (no spaces), "
                 "e.g. /var/lib/edgefleet")
    if text.rstrip("/") in _SYSTEM or text == "/":
        raise ServiceInstallError(
            f"--data-dir {text} would let the service write a system folder",
            hint="give a folder of its own, e.g. /var/lib/edgefleet")
    return path


def check_argv(argv: Sequence[str]) -> None:
    """No argument may hold a line break, a control or a format (bidi) character: in a
    unit file a line break starts a directive of its own."""
    for arg in argv:
        if any(unicodedata.category(ch).startswith("C") for ch in arg):
            raise ServiceInstallError(
                f"the option value {arg!r} holds a control character",
                hint="give the value without line breaks or control characters")


def exec_line(argv: Sequence[str]) -> str:
    """``argv`` as one systemd ``ExecStart=`` value (each argument quoted when it must be)."""
    return " ".join(_quote(arg) for arg in argv)


def render(template: str, *, user: str, data_dir: Path, argv: Sequence[str]) -> str:
    """The unit, once every value that goes into it is checked (see ``check_*``)."""
    check_user(user)
    check_data_dir(data_dir)
    check_argv(argv)
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
