"""The systemd units the wheel ships: written by the CLI, checked by systemd's own tools.

``systemd-analyze verify`` and ``systemd-analyze security --offline`` judge the units as
written by ``edgefleet agent service install`` / ``edgefleet fleet service install``.
``MemoryDenyWriteExecute=yes`` is proven the way the kernel applies it (``PR_SET_MDWE``,
which systemd sets where the kernel has it): the agent serves both runtimes under it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.errors import ServiceInstallError
from edgefleet.agent.systemd import HOST_NAME, Unit, exec_line, render
from tests.conftest import Keys
from tests.hostile import HOSTILE

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 3.0


def _install(part: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEFLEET, part, "service", "install", "--root", str(root),
                           "--json", "--", *args], capture_output=True, text=True, timeout=60)


def _unit(tmp_path: Path, part: str, *args: str) -> Path:
    done = _install(part, tmp_path, *args)
    assert done.returncode == 0, done.stderr
    written = Path(json.loads(done.stdout)["written"])
    assert written.parent == tmp_path / "etc/systemd/system"
    return written


AGENT_ARGS = ("--broker", "mqtt://broker.local:1883", "--fleet", "plant-a",
              "--http", "127.0.0.1:8080", "--profile", "raspberry-pi-4")
CONTROLLER_ARGS = ("--fleet", "plant-a", "--trusted-key", "/etc/edgefleet/signing.pub",
                   "--http", "0.0.0.0:8600")


@pytest.fixture(scope="module")
def analyze() -> str:
    assert ANALYZE, "systemd-analyze is missing: scripts/system-deps.sh installs systemd"
    return ANALYZE


@pytest.mark.parametrize(("part", "args"), [("agent", AGENT_ARGS),
                                            ("fleet", CONTROLLER_ARGS)])
def test_each_written_unit_verifies_and_is_rated_at_most_3(
        tmp_path: Path, analyze: str, part: str, args: tuple[str, ...]) -> None:
    unit = _unit(tmp_path, part, *args)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run([analyze, "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", security.stdout)
    assert found, security.stdout[-2000:]
    assert float(found.group(1)) <= MAX_EXPOSURE, security.stdout


def test_the_agent_unit_runs_this_install_with_the_given_options_and_the_host_name(
        tmp_path: Path) -> None:
    text = _unit(tmp_path, "agent", *AGENT_ARGS).read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start == "ExecStart=" + exec_line(
        [EDGEFLEET, "agent", "run", "--data-dir", "/var/lib/edgefleet", "--device-id",
         HOST_NAME, *AGENT_ARGS])
    assert "ReadWritePaths=/var/lib/edgefleet" in text and "@" not in text.replace(
        "@system-service", "").replace("@privileged", "").replace("@resources", "")


def test_a_value_is_never_read_as_a_systemd_specifier_or_variable() -> None:
    line = exec_line(["/opt/e dge/bin/edgefleet", "--fleet", "50%$HOME", 'a"b\\c', HOST_NAME])
    assert line == '"/opt/e dge/bin/edgefleet" --fleet "50%%$$HOME" "a\\"b\\\\c" %H'


def test_options_the_service_command_does_not_take_are_refused_before_writing(
        tmp_path: Path) -> None:
    done = _install("fleet", tmp_path, "--fleet", "plant-a")  # --trusted-key is required
    assert done.returncode == 2
    assert "--trusted-key" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "etc").exists()
    typo = _install("agent", tmp_path, "--brokr", "mqtt://x:1883")
    assert typo.returncode == 2 and "--brokr" in typo.stdout


def test_an_unwritable_root_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = _install("agent", blocker)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--root" in json.loads(done.stdout)["hint"]


_UNDER_MDWE = r"""
import ctypes, json, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(65, 1, 0, 0, 0) == 0, "PR_SET_MDWE refused"   # PR_MDWE_REFUSE_EXEC_GAIN
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("a writable and executable page was still allowed")
except PermissionError:
    pass
import numpy as np
from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.signing import TrustedKeys
agent = Agent(TrustedKeys.from_paths([sys.argv[1]]))
agent.load(sys.argv[2])
x = np.load(sys.argv[3])
out = agent.predict(x)
print(json.dumps({k: v.tolist() for k, v in out.items()}))
"""


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_the_agent_serves_both_runtimes_with_no_writable_executable_memory(
        tmp_path: Path, signing_keys: Keys, digits_bundles: dict[str, Path], fmt: str) -> None:
    from edgefleet.agent.core import Agent
    from tests.models import load_digits

    x = load_digits().x_test[:16]
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, "-c", _UNDER_MDWE, str(signing_keys.public),
                           str(digits_bundles[fmt]), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles[fmt])
    expected = agent.predict(x)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[name]), value, rtol=1e-5, atol=1e-6)


# --- hostile values: nothing an option says can add a line to the unit ------------------

def _directives(text: str) -> list[str]:
    return [line.split("=", 1)[0] for line in text.splitlines()
            if line and not line.startswith(("#", "["))]


_TEMPLATE = Unit("edgefleet.agent", "edgefleet-agent.service").template()
_ARGS = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@HOSTILE
@given(user=st.one_of(st.just("edgefleet"), _ARGS),
       data_dir=st.one_of(st.just("/var/lib/edgefleet"),
                          st.builds(lambda t: "/" + t, _ARGS), _ARGS),
       argv=st.lists(_ARGS, max_size=4))
def test_any_value_is_refused_or_written_as_one_argument_never_as_a_line(
        user: str, data_dir: str, argv: list[str]) -> None:
    try:
        text = render(_TEMPLATE, user=user, data_dir=Path(data_dir),
                      argv=["/opt/edgefleet/bin/edgefleet", "agent", "run", *argv])
    except ServiceInstallError as exc:
        assert exc.message and exc.hint
        return
    assert _directives(text) == _directives(_TEMPLATE)
    assert "\n" not in user + data_dir + "".join(argv)
    assert data_dir.startswith("/") and data_dir.rstrip("/") not in ("", "/var", "/etc", "/usr")


@pytest.mark.parametrize("options", [
    ("--user", "edgefleet\nExecStartPre=/bin/sh -c id"),
    ("--data-dir", "/var/lib/e f\nExecStartPre=/bin/id"),
    ("--data-dir", "relative/dir"), ("--data-dir", "/"), ("--data-dir", "/etc"),
    ("--user", "a b"),
    ("--", "--device-id", "x\nExecStartPre=/bin/id"),
])
def test_the_injections_found_outside_are_refused_and_nothing_is_written(
        tmp_path: Path, options: tuple[str, ...]) -> None:
    argv = [EDGEFLEET, "agent", "service", "install", "--root", str(tmp_path), *options]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "etc").exists()


def test_a_token_on_the_controllers_command_line_is_refused_with_the_env_file(
        tmp_path: Path) -> None:
    done = _install("fleet", tmp_path, *CONTROLLER_ARGS, "--token", "ops=supersecret1")
    assert done.returncode == 2 and "controller.env" in json.loads(done.stdout)["hint"]
    assert not (tmp_path / "etc").exists()
