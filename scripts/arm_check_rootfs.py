"""The arm64 Debian root filesystem that ``make arm-check`` runs the agent in.

Host tools come from Debian (``debootstrap``, ``qemu-user-static``, ``binfmt-support``),
installed with apt-get when missing, as ``scripts/system-deps.sh`` does. The kernel runs
arm64 programs through binfmt_misc: the ``qemu-aarch64`` entry is registered (and the
binfmt_misc file system mounted) when it is not, and its ``F`` flag lets programs inside
a chroot find the emulator. The root filesystem is built once from the release and
mirror of this machine's own apt sources and cached under
``~/.cache/edgefleet/arm64-rootfs``; it is rebuilt only when missing or when its recipe
(release, mirror, packages) changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["HOST_CA", "ArmCheckError", "Recipe", "chroot_command", "ensure_binfmt",
           "ensure_host_tools", "ensure_rootfs", "host_recipe", "mounted", "remove_tree",
           "unmount_under"]

CACHE = Path(os.environ.get("EDGEFLEET_ARM_CACHE", Path.home() / ".cache/edgefleet"))
BINFMT = Path("/proc/sys/fs/binfmt_misc")
PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_TOOLS = {"debootstrap": "debootstrap", "qemu-aarch64-static": "qemu-user-static",
              "update-binfmts": "binfmt-support"}
NICE = ("nice", "-n", "10")
HOST_CA = "/etc/ssl/certs/edgefleet-host-ca.crt"
_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


class ArmCheckError(EdgefleetError):
    """A step of the arm64 check cannot run or did not hold; the hint says what to do."""


@dataclass(frozen=True)
class Recipe:
    """What the cached root filesystem is built from; any change rebuilds it."""

    release: str
    mirror: str
    arch: str = "arm64"
    variant: str = "minbase"
    packages: tuple[str, ...] = PACKAGES

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def host_recipe() -> Recipe:
    """The release and Debian mirror this machine's apt sources use."""
    release = _os_release().get("VERSION_CODENAME", "")
    mirror = next((uri for uri, suite in _apt_sources() if suite == release), "")
    if not release or not mirror:
        raise ArmCheckError("cannot find this machine's Debian release and mirror in "
                            "/etc/os-release and /etc/apt/sources*",
                            hint="set EDGEFLEET_ARM_MIRROR and EDGEFLEET_ARM_RELEASE")
    return Recipe(release=os.environ.get("EDGEFLEET_ARM_RELEASE", release),
                  mirror=os.environ.get("EDGEFLEET_ARM_MIRROR", mirror))


def _os_release() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines()
             if "=" in line)
    return {key: value.strip('"') for key, value in pairs}


def _apt_sources() -> Iterator[tuple[str, str]]:
    """(URI, suite) pairs of Debian sources, deb822 stanzas and one-line entries."""
    for path in _SOURCES:
        if path.exists():
            yield from _parse_sources(path.read_text())


def _parse_sources(text: str) -> Iterator[tuple[str, str]]:
    for stanza in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in stanza.splitlines()
                      if ":" in line and not line.startswith(("#", " ", "deb ")))
        for uri in fields.get("URIs", "").split():
            yield from ((uri, suite) for suite in fields.get("Suites", "").split())
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line).split()  # drop "[arch=… signed-by=…]"
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], words[2]


def ensure_host_tools() -> list[str]:
    """Install the Debian packages that are missing; the names of those installed."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not _have(tool)})
    if not missing:
        return []
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ArmCheckError(f"missing: {' '.join(missing)}",
                            hint=f"run: sudo apt-get install -y {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    return missing


def _have(tool: str) -> bool:
    return bool(shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin"))


def ensure_binfmt() -> str:
    """Make the kernel run arm64 binaries through qemu; the entry's flags."""
    if not (BINFMT / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
             hint="binfmt_misc cannot be mounted here (a container without "
                  "CAP_SYS_ADMIN?): run the check on a host or a privileged container")
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        _run(["update-binfmts", "--enable", "qemu-aarch64"])
    lines = entry.read_text().splitlines() if entry.exists() else []
    flags = next((line.split()[1] for line in lines if line.startswith("flags:")), "")
    if "enabled" not in lines or "F" not in flags:
        raise ArmCheckError(f"binfmt entry qemu-aarch64 is not enabled with flag F ({flags!r})",
                            hint="run: update-binfmts --enable qemu-aarch64")
    return flags


def ensure_rootfs(recipe: Recipe) -> tuple[Path, bool]:
    """The cached root filesystem for ``recipe``, and whether it was (re)built now."""
    root = CACHE / "arm64-rootfs"
    stamp = root / ".edgefleet-recipe"
    if stamp.exists() and stamp.read_text().strip() == recipe.digest():
        return root, False
    building = root.with_name(root.name + ".building")
    remove_tree(building)
    _debootstrap(recipe, building)
    (building / ".edgefleet-recipe").write_text(recipe.digest() + "\n")
    remove_tree(root)
    building.rename(root)
    return root, True


def remove_tree(root: Path) -> None:
    """Delete a root filesystem, never what is mounted inside it (the host's /dev, /proc)."""
    unmount_under(root)
    if root.exists():
        _run(["rm", "-rf", "--one-file-system", str(root)])


def unmount_under(root: Path) -> None:
    """Unmount whatever a run (or an interrupted one) left mounted inside ``root``."""
    prefix = str(root.resolve()) + "/"
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False)


def _debootstrap(recipe: Recipe, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    _run([*NICE, "debootstrap", f"--arch={recipe.arch}", f"--variant={recipe.variant}",
          f"--include={','.join(recipe.packages)}", recipe.release, str(target),
          recipe.mirror],
         hint=f"see {target}/debootstrap/debootstrap.log")


@contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc, /dev, the host's resolv.conf and CA bundle inside ``root`` for the duration.

    The root shares the host's network, so it trusts what the host trusts (a site's own
    CA included): the bundle goes to ``HOST_CA`` and the chroot's env points pip there.
    """
    unmount_under(root)
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    shutil.copyfile(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
                    root / HOST_CA.lstrip("/"))
    done: list[Path] = []
    try:
        for source, target, kind in (("proc", "proc", "proc"), ("/dev", "dev", "bind")):
            point = root / target
            args = ["--bind", source] if kind == "bind" else ["-t", "proc", "proc"]
            _run(["mount", *args, str(point)])
            done.append(point)
        yield
    finally:
        for point in reversed(done):
            subprocess.run(["umount", "--lazy", str(point)], check=False)


def chroot_command(root: Path, argv: Sequence[str], env: dict[str, str]) -> list[str]:
    """``argv`` run as arm64 inside ``root`` with only ``env`` in its environment."""
    pairs = [f"{key}={value}" for key, value in sorted(env.items())]
    return ["chroot", str(root), "/usr/bin/env", "-i", *pairs, *argv]


def _run(argv: Sequence[str], *, env: dict[str, str] | None = None, hint: str = "") -> None:
    done = subprocess.run(list(argv), env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ArmCheckError(f"{' '.join(argv[:4])} … failed ({done.returncode}): {tail}",
                            hint=hint)
