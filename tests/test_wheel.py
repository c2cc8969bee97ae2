"""The wheel installs one top-level name, ``edgefleet``, and its console script runs.

The repository keeps the parts at its top level (``agent/``, ``converter/``, ``fleet/``,
``devices/``); ``edgefleet/`` links them in, so the wheel holds them as ``edgefleet.agent``
and so on, and never a generic ``agent`` or ``fleet`` that another distribution could ship.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("agent", "converter", "fleet", "devices")
# The fresh venv sees only what the wheel installed: no PYTHONPATH into a checkout.
CLEAN = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _copy_of_the_checkout(into: Path) -> Path:
    """The checkout's files (tracked or new, not ignored; links kept as links): a build in
    the checkout itself would leave build/ behind, whose stale modules a later wheel takes."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, into / name
        if not source.is_symlink() and not source.is_file():
            continue  # deleted, not yet staged
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        else:
            shutil.copy2(source, target)
    return into


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = _copy_of_the_checkout(tmp_path_factory.mktemp("source"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(source)],
                   check=True, timeout=300, capture_output=True, cwd=out, env=CLEAN)
    (found,) = out.glob("edgefleet-*.whl")
    return found


def test_the_wheel_has_edgefleet_as_its_only_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = archive.read(top_level).decode().split()
    tops = {n.split("/", 1)[0] for n in names if ".dist-info/" not in n}
    assert tops == {"edgefleet"} and declared == ["edgefleet"]
    for part in PARTS:  # the parts are inside, with their data
        assert f"edgefleet/{part}/__init__.py" in names
    assert "edgefleet/devices/profiles/generic-arm64.json" in names
    assert "edgefleet/agent/deploy/edgefleet-agent.service" in names
    assert "edgefleet/fleet/dashboard/static/index.html" in names
    assert "edgefleet/fleet/openapi.json" in names  # the API's contract, served by the controller
    assert not [n for n in names if "/tests/" in n or n.endswith(".pyc")]


def test_the_wheel_installed_in_a_fresh_venv_runs_edgefleet_help(
        wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=CLEAN)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c",
                    str(ROOT / "constraints.txt"), str(wheel)],
                   check=True, timeout=600, capture_output=True, env=CLEAN)
    result = subprocess.run([str(venv / "bin" / "edgefleet"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, env=CLEAN)
    assert result.returncode == 0, result.stderr
    for command in ("agent", "convert", "fleet", "demo"):
        assert command in result.stdout
    probe = ("import importlib.util as u; "
             f"print([m for m in {PARTS!r} if u.find_spec(m)], "
             "u.find_spec('edgefleet.agent.protocol') is not None)")
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, check=True, env=CLEAN).stdout.split()
    assert found == ["[]", "True"]
    run = subprocess.run([str(venv / "bin" / "edgefleet"), "agent", "run", "--fleet", "f",
                          "--device-id", "d"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=CLEAN)
    assert run.returncode == 2 and "pip install 'edgefleet[agent]'" in run.stderr, run.stderr


def test_a_checkout_without_links_refuses_to_build_a_wheel_without_the_parts(
        tmp_path: Path) -> None:
    source = _copy_of_the_checkout(tmp_path / "source")
    (source / "edgefleet" / "agent").unlink()
    (source / "edgefleet" / "agent").write_text("../agent")  # what core.symlinks=false leaves
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                             str(tmp_path / "out"), str(source)], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=CLEAN)
    assert result.returncode != 0
    assert "edgefleet/agent is not the folder agent/" in result.stdout + result.stderr
    assert "core.symlinks=true" in result.stdout + result.stderr
    assert not list(tmp_path.glob("out/*.whl"))
