"""README.md's walk-through, typed into one bash as a user would: keys, two conversions,
a controller and two agents on v1, a rollout of v2 that succeeds, a rollback to v1, and
everything stopped at the end.

Only the variables that the README's first walk-through block documents are changed: the
broker (this test's own Mosquitto), the controller's and the devices' HTTP addresses (free
ports) and the soak (3 s). The blocks are fed one at a time to the same shell, so the test
can look at the fleet between them, the way a user would glance at another terminal.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from edgefleet.cli import app
from edgefleet.cli.example_data import example_data
from edgefleet.cli.output import visible
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port
from tests.hostile import HOSTILE, MiB, peak_traced_bytes

README = Path(__file__).resolve().parent.parent / "README.md"
REGION = re.compile(r"<!-- walkthrough:start -->(.*?)<!-- walkthrough:end -->", re.S)
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)
DOCUMENTED = ("BROKER", "CONTROLLER_HTTP", "CAM1_HTTP", "CAM2_HTTP", "SOAK")
BLOCK_TIMEOUT_S = 300.0  # a hang, not slowness: two conversions took 132 s at load 14 on 2 cores
TEST_SOAK = "3s"
WALKTHROUGH_TIMEOUT_S = 600  # 54-57 s of CPU; 170-230 s of wall time at load 12-14 on 2 cores


def walkthrough_blocks(text: str) -> list[str]:
    """Every ``sh`` block between walkthrough markers, in order."""
    return [block for region in REGION.findall(text) for block in BLOCK.findall(region)]


def python_example(text: str) -> str:
    """README's "In Python" block, which loads a bundle that the walk-through wrote."""
    found: str
    (found,) = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
                if "agent.load(" in b]
    return found


def substitute(block: str, values: dict[str, str]) -> str:
    """The variables block with each documented assignment's value replaced."""
    found = set(re.findall(r"^([A-Z0-9_]+)=", block, re.M))
    assert found == set(DOCUMENTED), f"README's variables block sets {sorted(found)}"
    for name, value in values.items():
        block = re.sub(rf"^{name}=\S+", f"{name}={value}", block, flags=re.M)
    return block


@dataclass
class Shell:
    """One bash reading commands from a pipe, in its own session, in ``workdir``."""

    workdir: Path
    process: subprocess.Popen[str]
    blocks_done: int = 0
    timings: list[tuple[str, float]] = field(default_factory=list)

    @classmethod
    def start(cls, workdir: Path) -> Shell:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        with (workdir / "shell.log").open("w") as log:  # the shell keeps its own copy
            process = subprocess.Popen(["bash", "-s"], stdin=subprocess.PIPE, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=workdir, env=env,
                                       text=True, start_new_session=True)
        shell = cls(workdir, process)
        shell.type("set -euo pipefail")
        return shell

    def type(self, commands: str, timeout: float = BLOCK_TIMEOUT_S) -> None:
        """Send ``commands`` and wait until the shell has run them (it stops on a failure)."""
        assert self.process.stdin is not None
        self.blocks_done += 1
        marker = self.workdir / f".done-{self.blocks_done}"
        self.process.stdin.write(f"{commands}\ntouch {marker}\n")
        self.process.stdin.flush()
        started = time.monotonic()
        deadline = started + timeout
        while not marker.exists():
            assert self.process.poll() is None, f"the shell stopped:\n{self.log()}"
            assert time.monotonic() < deadline, f"{commands!r} still runs:\n{self.log()}"
            time.sleep(0.2)
        self.timings.append((commands.split("\n", 1)[0][:60], time.monotonic() - started))

    def json(self, command: str) -> Any:
        out = self.workdir / f".out-{self.blocks_done}.json"
        self.type(f"{command} > {out}")
        return json.loads(out.read_text())

    def exit(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(timeout=30)

    def log(self) -> str:
        logs = [self.workdir / name for name in ("shell.log", "controller.log", "cam-1.log",
                                                 "cam-2.log")]
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())

    def session_pids(self) -> list[int]:
        """Processes still in the shell's session (the shell started it)."""
        return [pid for pid in _pids() if _session_of(pid) == self.process.pid]


def _pids() -> Iterator[int]:
    return (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # it ended between the listing and the read
        return None
    return int(stat.rsplit(")", 1)[1].split()[4])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # no such process any more
        return False
    return state != "Z"


@pytest.fixture()
def shell(tmp_path: Path) -> Iterator[Shell]:
    started = Shell.start(tmp_path)
    yield started
    for pid in [started.process.pid, *started.session_pids()]:
        if _alive(pid):  # only after a failure: stop what the walk-through started
            os.kill(pid, 15)


def _versions(devices: list[dict[str, Any]]) -> dict[str, str | None]:
    return {d["id"]: (d["active"] or {}).get("version") for d in devices if d["online"]}


def _settled_on(shell: Shell, version: str, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        devices: list[dict[str, Any]] = shell.json("edgefleet fleet devices --json")
        states = {d["update_state"] for d in devices}
        if _versions(devices) == {"cam-1": version, "cam-2": version} and states <= {
                "COMMITTED", "ROLLED_BACK", "IDLE"}:
            return devices
        assert time.monotonic() < deadline, f"devices: {devices}\n{shell.log()}"
        time.sleep(1)


@pytest.mark.timeout(WALKTHROUGH_TIMEOUT_S)
def test_the_readme_walkthrough_runs_from_keys_to_rollback(mosquitto: MosquittoBroker,
                                                           shell: Shell) -> None:
    blocks = walkthrough_blocks(README.read_text())
    assert len(blocks) >= 5 and "rollout status" in blocks[3] and "kill" in blocks[-1]
    values = {"BROKER": mosquitto.url, "CONTROLLER_HTTP": f"127.0.0.1:{free_port()}",
              "CAM1_HTTP": f"127.0.0.1:{free_port()}", "CAM2_HTTP": f"127.0.0.1:{free_port()}",
              "SOAK": TEST_SOAK}
    shell.type(substitute(blocks[0], values))
    for block in blocks[1:4]:  # keys and conversions; controller and agents; the rollout
        shell.type(block)
    check = "assert [v.shape[0] for v in outputs.values()] == [len(images)]"
    shell.type(f"python3 - <<'EOF'\n{python_example(README.read_text())}{check}\nEOF")
    rollout = shell.json("edgefleet fleet rollout status r1 --json")
    assert rollout["state"] == "SUCCEEDED", rollout
    assert rollout["spec"]["soak_s"] == 3
    assert _versions(shell.json("edgefleet fleet devices --json")) == {
        "cam-1": "2.0.0", "cam-2": "2.0.0"}
    for block in blocks[4:-1]:  # the rollback
        shell.type(block)
    _settled_on(shell, "1.0.0")
    pids = shell.json("echo [$CONTROLLER_PID, $CAM1_PID, $CAM2_PID]")
    shell.type(blocks[-1])  # stop everything
    assert shell.exit() == 0, shell.log()
    assert not [pid for pid in pids if _alive(pid)]
    assert shell.session_pids() == []
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"walk-through: {sum(t for _, t in shell.timings):.0f} s, children's CPU "
          f"{cpu.ru_utime + cpu.ru_stime:.0f} s", *(f"{t:6.1f} s  {c}" for c, t in shell.timings),
          sep="\n")


def test_example_data_writes_a_model_calibration_and_labelled_eval_set(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["example-data", str(tmp_path / "new"), "--json"])
    assert result.exit_code == 0, result.output
    written = {Path(row["file"]).name for row in json.loads(result.output)["written"]}
    assert written == {"digits.keras", "calibration.npy", "eval.npz"}
    calibration = np.load(tmp_path / "new" / "calibration.npy")
    with np.load(tmp_path / "new" / "eval.npz") as evaluation:
        images, labels = evaluation["image"], evaluation["labels"]
    assert calibration.shape == (100, 8, 8, 1) and images.shape == (200, 8, 8, 1)
    assert calibration.min() >= 0.0 and calibration.max() <= 1.0  # scaled 0-1, as trained
    assert sorted(set(labels.tolist())) == list(range(10))


def test_example_data_refuses_to_overwrite_and_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "eval.npz").write_bytes(b"mine")
    result = CliRunner().invoke(app, ["example-data", str(tmp_path)])
    assert result.exit_code == 2
    assert "not overwriting" in result.output and "eval.npz" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.npz"]
    assert (tmp_path / "eval.npz").read_bytes() == b"mine"


# any name a Linux folder can have, decoded as argv is (undecodable bytes as surrogates)
FOLDER_NAMES = st.one_of(st.binary(min_size=1, max_size=60).map(os.fsdecode),
                         st.text(min_size=1, max_size=40).map(os.fsencode).map(os.fsdecode)
                         ).filter(lambda name: "/" not in name and "\x00" not in name
                                  and name not in (".", "..") and len(os.fsencode(name)) < 256)
EXAMPLE_DATA_PEAK_CAP = 8 * MiB  # two small arrays and a 150 KB copy; far below it
EXAMPLE_DATA = typer.Typer()  # the command alone: building the whole CLI per example costs 0.4 s
EXAMPLE_DATA.command()(example_data)


@HOSTILE
@given(name=FOLDER_NAMES)
def test_example_data_prints_any_folder_name_literally_and_never_overwrites(name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        runner = CliRunner()
        first, peak = peak_traced_bytes(lambda: runner.invoke(EXAMPLE_DATA,
                                                              [str(folder), "--json"]))
        assert isinstance(first, Result) and first.exit_code == 0, first
        assert peak < EXAMPLE_DATA_PEAK_CAP
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        assert sorted(before) == ["calibration.npy", "digits.keras", "eval.npz"]
        again = runner.invoke(EXAMPLE_DATA, [str(folder)])
        assert again.exit_code == 2 and "Traceback" not in again.output
        shown = visible(str(folder / "digits.keras")).encode("utf-8", "backslashreplace")
        assert shown.decode() in again.output  # literally: no markup, controls escaped
        assert len(again.output.strip().splitlines()) == 1
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
