"""A new user's rough edges, as real processes: a port already taken, an agent-only install,
a runtime's banner on stderr, and log lines for machines (``--log-format json``)."""

from __future__ import annotations

import calendar
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.core import Agent
from edgefleet.agent.ports import BindError
from edgefleet.agent.serving.http import InferenceServer
from edgefleet.cli.logs import JsonFormatter
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.events_log import DETAIL_MAX, FIELD_MAX, log_event
from edgefleet.fleet.mosquitto import (
    MosquittoBroker,
    MosquittoMissingError,
    find_mosquitto,
    free_port,
    wait_for_port,
)
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, wait_until
from tests.hostile import HOSTILE, peak_traced_bytes

ROOT = Path(__file__).resolve().parents[1]
EDGEFLEET = [sys.executable, "-m", "edgefleet"]
DIGITS = ROOT / "edgefleet" / "demo_assets" / "digits.tflite"  # a real trained model
TOKEN = "rough-edges-token"
BANNER = "XNNPACK"


@pytest.fixture(scope="module")
def bundles(signing_keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rough-bundles")
    return {v: make_bundle(DIGITS, out / f"digits-{v}.efb", signing_keys, version=v)
            for v in ("1.0.0", "2.0.0")}


@pytest.fixture()
def taken_port() -> Iterator[int]:
    """A port this test process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """No COLUMNS: stderr is a pipe, so a wrapped error would show as two lines."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=ROOT)


def _one_line_about(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2, no traceback, and exactly one line of stderr that holds all ``words``."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if words[0] in line]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- 1. a port already taken --------------------------------------------------------------

def test_agent_run_on_a_taken_port_names_its_holder_and_the_option(
        taken_port: int, bundles: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    result = _run([*EDGEFLEET, "agent", "run", "--bundle", str(bundles["1.0.0"]),
                   "--trusted-key", str(signing_keys.public), "--data-dir",
                   str(tmp_path / "data"), "--http", f"127.0.0.1:{taken_port}"])
    _one_line_about(result, f"127.0.0.1:{taken_port}", "in use by",
                    f"(pid {os.getpid()})", "--http HOST:PORT")
    assert not (tmp_path / "data").exists()  # refused before installing anything


def test_fleet_serve_on_a_taken_port_names_its_holder_and_the_option(
        taken_port: int, signing_keys: Keys, tmp_path: Path) -> None:
    result = _run([*EDGEFLEET, "fleet", "serve", "--fleet", "rough", "--trusted-key",
                   str(signing_keys.public), "--token", f"ops={TOKEN}", "--data-dir",
                   str(tmp_path), "--broker", "mqtt://127.0.0.1:9", "--http",
                   f"127.0.0.1:{taken_port}"])
    _one_line_about(result, f"127.0.0.1:{taken_port}", "in use by",
                    f"(pid {os.getpid()})", "--http HOST:PORT")
    assert "MQTT" not in result.stderr  # refused before it connected anywhere


def test_broker_on_a_taken_port_names_its_holder_and_the_option(taken_port: int) -> None:
    result = _run([*EDGEFLEET, "broker", "--port", str(taken_port)])
    line = _one_line_about(result, f"127.0.0.1:{taken_port}", "in use by",
                           f"(pid {os.getpid()})", "--port PORT")
    assert len(result.stderr.strip().splitlines()) == 1, line  # amqtt's 93 lines are gone


def test_both_http_servers_refuse_a_taken_port_at_bind_with_the_option(
        taken_port: int, fleet: Fleet, signing_keys: Keys) -> None:
    """The bind sites themselves (a port taken between the CLI's check and the bind)."""
    with pytest.raises(BindError, match=rf"127.0.0.1:{taken_port}: in use by .*--http"):
        InferenceServer(Agent(signing_keys.trusted), "127.0.0.1", taken_port)
    fleet.start_controller()
    assert fleet.controller is not None
    with pytest.raises(BindError, match=rf"127.0.0.1:{taken_port}: in use by .*--http"):
        ApiServer(fleet.controller, {TOKEN: "ops"}, "127.0.0.1", taken_port)


# --- 2. the device install: pip install 'edgefleet[agent]' -------------------------------

def _agent_only_venv() -> Path:
    """A venv (no system site packages) with only ``.[agent]`` from this checkout, editable,
    cached under ~/.cache/edgefleet by the agent's dependencies, constraints, checkout path
    and Python (about 40 s of CPU to build; seconds once cached)."""
    import tomllib  # Python 3.11+, as this test run

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    what = [project["dependencies"], project["optional-dependencies"]["agent"],
            (ROOT / "constraints.txt").read_text(), str(ROOT), sys.version]
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
    cache = Path.home() / ".cache" / "edgefleet"
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / f"agent-only-venv-{key}"
    with open(cache / f"agent-only-venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        if not (venv / ".complete").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                            "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[agent]"],
                           check=True, timeout=600, capture_output=True)
            (venv / ".complete").touch()
    return venv


@pytest.fixture(scope="module")
def agent_only() -> Path:
    """The ``edgefleet`` console script of the agent-only venv."""
    return _agent_only_venv() / "bin" / "edgefleet"


def test_the_agent_only_venv_has_no_extra_beyond_agent(agent_only: Path) -> None:
    config = (agent_only.parents[1] / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config
    probe = ("import importlib.util as u; print([m for m in ('prometheus_client', 'tensorflow', "
             "'amqtt', 'psycopg', 'keras', 'ai_edge_litert', 'onnxruntime') if u.find_spec(m)])")
    found = _run([str(agent_only.parent / "python"), "-c", probe]).stdout.strip()
    assert found == "['ai_edge_litert', 'onnxruntime']"


def _demo_extras() -> str:
    try:
        find_mosquitto()
        return "converter,fleet"
    except MosquittoMissingError:
        return "converter,fleet,broker"


@pytest.mark.parametrize(("command", "extra"), [
    (["fleet", "serve", "--fleet", "f", "--trusted-key", "k.pub"], "fleet"),
    (["demo"], _demo_extras()),
    (["convert", "model.keras", "-o", "out.efb"], "converter"),
    (["broker"], "broker"),
])
def test_a_command_that_needs_an_extra_names_it_in_one_line(
        agent_only: Path, command: list[str], extra: str) -> None:
    result = _run([str(agent_only), *command], timeout=60)
    line = _one_line_about(result, "pip install", f"pip install 'edgefleet[{extra}]'")
    assert line.startswith("error: ") and result.stdout == ""


def test_a_module_of_an_extra_missed_later_still_gives_the_one_line(agent_only: Path) -> None:
    """The console script's last resort, for a command that imports an extra's module late."""
    code = ("import sys; from edgefleet import cli; "
            "cli.app.command('late')(lambda: __import__('prometheus_client.core')); "
            "sys.argv = ['edgefleet', 'late']; cli.main()")
    result = _run([str(agent_only.parent / "python"), "-c", code])
    line = _one_line_about(result, "pip install", "prometheus_client is not installed",
                           "pip install 'edgefleet[fleet]'")
    assert line.startswith("error: this command needs the [fleet] extra")


def test_agent_commands_work_on_the_agent_only_install(
        agent_only: Path, bundles: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    assert _run([str(agent_only), "agent", "--help"]).returncode == 0
    keys = _run([str(agent_only), "keys", "generate", "--out", str(tmp_path), "--json"])
    assert keys.returncode == 0, keys.stderr
    assert len(json.loads(keys.stdout)["key_id"]) == 16
    assert (tmp_path / "signing.pub").exists()
    flashed = _run([str(agent_only), "agent", "install", str(bundles["1.0.0"]), "--json",
                    "--trusted-key", str(signing_keys.public), "--data-dir", str(tmp_path)])
    assert flashed.returncode == 0, flashed.stderr
    assert json.loads(flashed.stdout)["update"]["state"] == "COMMITTED"
    assert BANNER not in flashed.stderr


# --- 4. LiteRT's banner ----------------------------------------------------------------------

def test_agent_install_prints_no_runtime_banner(
        bundles: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    result = _run([*EDGEFLEET, "agent", "install", str(bundles["1.0.0"]), "--trusted-key",
                   str(signing_keys.public), "--data-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert BANNER not in result.stderr + result.stdout


def test_the_banner_goes_to_the_debug_log() -> None:
    code = ("import logging, sys; logging.basicConfig(level=logging.DEBUG, stream=sys.stdout);"
            "from edgefleet.agent.runtime import load_runtime;"
            f"load_runtime(open({str(DIGITS)!r}, 'rb').read(), 'tflite')")
    result = _run([sys.executable, "-c", code])
    assert result.returncode == 0 and BANNER not in result.stderr
    assert f"DEBUG:edgefleet.agent.runtime.tflite:Created TensorFlow Lite {BANNER}" in result.stdout


# --- 11. JSON log lines -------------------------------------------------------------------

REQUIRED = ("ts", "level", "logger", "message")


def _records(text: str) -> list[dict[str, Any]]:
    """Every stderr line is one JSON object with the required fields."""
    records = [json.loads(line) for line in text.splitlines()]
    for record in records:
        assert all(isinstance(record[k], str) for k in REQUIRED), record
    return records


class _Process:
    """A long-running command with stderr in a file, stopped by its PID."""

    def __init__(self, args: list[str], stderr: Path) -> None:
        self.path = stderr
        with open(stderr, "wb") as err:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err,
                                            cwd=ROOT)

    def records(self) -> list[dict[str, Any]]:
        return _records(self.path.read_text())

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.path.read_text()


def _logged(process: _Process, **fields: str) -> dict[str, Any]:
    """Wait for a record that has ``fields`` (a value ending in * matches a prefix)."""
    def match(record: dict[str, Any]) -> bool:
        return all(str(record.get(k, "")).startswith(v[:-1]) if v.endswith("*")
                   else record.get(k) == v for k, v in fields.items())

    found: dict[str, Any] = wait_until(
        lambda: next((r for r in process.records() if match(r)), None), 90,
        what=f"a log record with {fields} in {process.path}")
    return found


@pytest.fixture()
def controller(mosquitto: MosquittoBroker, signing_keys: Keys,
               tmp_path: Path) -> Iterator[tuple[_Process, FleetClient]]:
    port = free_port()
    process = _Process([*EDGEFLEET, "fleet", "serve", "--fleet", "rough", "--log-format", "json",
                        "--trusted-key", str(signing_keys.public), "--token", f"ops={TOKEN}",
                        "--broker", mosquitto.url, "--data-dir", str(tmp_path / "fleet"),
                        "--http", f"127.0.0.1:{port}", "--tick", "0.2"],
                       tmp_path / "controller.err")
    try:
        assert wait_for_port("127.0.0.1", port, 60), process.path.read_text()
        yield process, FleetClient(f"http://127.0.0.1:{port}", TOKEN)
    finally:
        process.stop()


def test_agent_and_controller_log_one_json_object_a_line_with_the_fields_to_grep(
        controller: tuple[_Process, FleetClient], mosquitto: MosquittoBroker,
        bundles: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    fleet, client = controller
    port = free_port()
    agent = _Process([*EDGEFLEET, "agent", "run", "--log-format", "json", "--bundle",
                      str(bundles["1.0.0"]), "--trusted-key", str(signing_keys.public),
                      "--broker", mosquitto.url, "--fleet", "rough", "--device-id", "pi-9",
                      "--http", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "agent"),
                      "--probation", "0.5"], tmp_path / "agent.err")
    try:
        serving = _logged(agent, message="serving*")
        assert serving | {"device": "pi-9", "fleet": "rough", "model": "digits",
                          "version": "1.0.0", "level": "INFO"} == serving
        assert "state" in serving
        wait_until(lambda: any(d["id"] == "pi-9" for d in client.get("/api/v1/devices")),
                   60, what="pi-9 registered")
        client.upload("/api/v1/models", bundles["2.0.0"].read_bytes())
        created = client.post("/api/v1/rollouts", {"model": "digits:2.0.0",
                                                    "selectors": ["device:pi-9"],
                                                    "waves": ["100%"], "soak_s": 0.5})
        done = _logged(fleet, rollout=created["id"], state="SUCCEEDED")
        assert done | {"model": "digits", "version": "2.0.0", "fleet": "rough",
                       "logger": "edgefleet.fleet.events"} == done
        seen = _logged(fleet, device="pi-9", state="COMMITTED")
        assert seen["version"] == "2.0.0" and seen["model"] == "digits"
        switched = _logged(agent, state="COMMITTED", version="2.0.0")
        assert switched["device"] == "pi-9"
    finally:
        agent_err = agent.stop()
    assert BANNER not in agent_err
    _records(agent_err)  # to the last line, after SIGTERM too
    assert _records(fleet.stop())[0]["fleet"] == "rough"


def test_broker_logs_json_lines(tmp_path: Path) -> None:
    port = free_port()
    broker = _Process([*EDGEFLEET, "broker", "--port", str(port), "--log-format", "json"],
                      tmp_path / "broker.err")
    try:
        listening = _logged(broker, message="edgefleet broker*")
        assert f"127.0.0.1:{port}" in listening["message"]
        assert wait_for_port("127.0.0.1", port, 10)
    finally:
        broker.stop()
    assert broker.process.returncode == 0
    _records(broker.path.read_text())


def test_a_refusal_in_json_mode_is_a_json_record(taken_port: int) -> None:
    result = _run([*EDGEFLEET, "broker", "--port", str(taken_port), "--log-format", "json"])
    assert result.returncode == 2
    [record] = _records(result.stderr)
    assert record["level"] == "ERROR" and "--port PORT" in record["message"]


@HOSTILE
@given(message=st.text(), device=st.text(), args=st.lists(st.text(), max_size=3))
def test_any_text_logged_stays_one_json_line(message: str, device: str, args: list[str]) -> None:
    formatter = JsonFormatter(lambda: {"fleet": "f", "device": "from-context"})
    text = message.replace("%", "%%") + " %s" * len(args)  # outside text goes in args
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, text, tuple(args), None)
    record.__dict__["device"] = device  # as logging's extra= sets it
    line = formatter.format(record)
    assert "\n" not in line and "\r" not in line
    parsed = json.loads(line)
    assert parsed["message"] == record.getMessage() and parsed["device"] == device
    assert parsed["fleet"] == "f" and parsed["ts"].endswith("Z")


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_EVENTS = st.one_of(
    st.text(max_size=5000),  # not JSON at all, or any text
    st.builds(json.dumps, _JSON),
    st.builds(lambda kind, detail, state, bundle: json.dumps(
        {"kind": kind, "detail": detail, "state": state, "bundle": bundle}),
        _JSON, st.text(max_size=20000) | _JSON, _JSON, _JSON | st.fixed_dictionaries(
            {"name": st.text(max_size=5000), "version": st.text(max_size=5000)})))


class _Lines(logging.Handler):
    """The JSON lines a logger writes, kept in a list."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter(lambda: {"fleet": "f"}))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@HOSTILE
@given(payload=_EVENTS)
def test_a_device_event_of_any_shape_is_one_bounded_json_line(payload: str) -> None:
    """Whatever a device publishes on its events topic, the controller logs one JSON line,
    its own text cut to DETAIL_MAX and FIELD_MAX, within 1 MiB of memory."""
    handler, events = _Lines(), logging.getLogger("edgefleet.fleet.events")
    events.addHandler(handler)
    level, events.level = events.level, logging.INFO
    try:
        result, peak = peak_traced_bytes(lambda: log_event("event",
                                                           {"device": "cam-1", "event": payload}))
    finally:
        events.removeHandler(handler)
        events.setLevel(level)
    assert not isinstance(result, BaseException), result
    assert peak < 1024 * 1024
    [line] = handler.lines
    record = json.loads(line)
    assert record["device"] == "cam-1" and record["fleet"] == "f"
    assert len(record["message"]) <= len("device cam-1 : ") + FIELD_MAX + DETAIL_MAX
    for key in ("state", "model", "version"):
        assert len(record.get(key, "")) <= FIELD_MAX


def test_json_timestamps_are_utc_with_milliseconds() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.created = calendar.timegm((2026, 12, 7, 1, 2, 3, 0, 0, 0)) + 0.4567
    assert json.loads(JsonFormatter().format(record))["ts"] == "2026-12-07T01:02:03.456Z"
