"""``edgefleet agent run`` and ``edgefleet keys`` as a user runs them (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.http as triton

from edgefleet.fleet.mosquitto import MosquittoBroker, free_port, wait_for_port
from tests import tamper
from tests.brokers import Subscriber
from tests.conftest import Keys
from tests.models import TrainedModels

EDGEFLEET = [sys.executable, "-m", "edgefleet"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEFLEET, *args], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "COLUMNS": "200"})


def test_keys_generate_writes_a_usable_pair(tmp_path: Path) -> None:
    result = _run("keys", "generate", "--out", str(tmp_path), "--name", "ops", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["key_id"]) == 16
    assert (tmp_path / "ops.key").stat().st_mode & 0o777 == 0o600
    listed = json.loads(_run("keys", "list", str(tmp_path), "--json").stdout)
    assert listed == [{"key_id": data["key_id"]}]
    again = _run("keys", "generate", "--out", str(tmp_path), "--name", "ops")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_agent_refuses_to_start_with_nothing_to_serve(
        tmp_path: Path, digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    bad = tmp_path / "bad.efb"
    bad.write_bytes(tamper.with_member(digits_bundles["tflite"], "../escape", b"x"))
    result = _run("agent", "run", "--bundle", str(bad), "--trusted-key",
                  str(signing_keys.public), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert "nothing to serve" in result.stderr and "contains '..'" in result.stderr


@pytest.mark.parametrize("command", [["rollback"], ["status"], ["status", "--json"]])
def test_rollback_and_status_on_a_missing_data_dir_are_refused_and_create_nothing(
        command: list[str], tmp_path: Path, signing_keys: Keys) -> None:
    missing = tmp_path / "nonexist"
    keys = ["--trusted-key", str(signing_keys.public)] if command == ["rollback"] else []
    result = _run("agent", *command, "--data-dir", str(missing), *keys)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"there is no data dir {missing}" in result.stdout + result.stderr
    if "--json" not in command:
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, \
            result.stderr
    assert list(tmp_path.iterdir()) == [], "a refused command creates nothing"


def test_agent_refuses_to_start_without_trusted_keys(
        tmp_path: Path, digits_bundles: dict[str, Path]) -> None:
    result = _run("agent", "run", "--bundle", str(digits_bundles["onnx"]),
                  "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2 and "no trusted public keys" in result.stderr
    assert "--trusted-key" in result.stderr


@pytest.fixture()
def running_agent(tmp_path: Path, mosquitto: MosquittoBroker, digits_bundles: dict[str, Path],
                  signing_keys: Keys) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    process = subprocess.Popen(
        [*EDGEFLEET, "agent", "run", "--bundle", str(digits_bundles["tflite"]),
         "--trusted-key", str(signing_keys.public), "--broker", mosquitto.url,
         "--fleet", "clitest", "--device-id", "pi-7", "--http", f"127.0.0.1:{port}",
         "--data-dir", str(tmp_path / "data"), "--telemetry-interval", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_port("127.0.0.1", port, 60), "agent HTTP server did not come up"
    yield process, port
    if process.poll() is None:
        process.kill()
        process.wait()


def test_agent_run_serves_http_and_reports_over_mqtt(
        running_agent: tuple[subprocess.Popen[bytes], int], mosquitto: MosquittoBroker,
        digits_models: TrainedModels) -> None:
    process, port = running_agent
    sub = Subscriber(mosquitto.url, ["edgefleet/v1/clitest/pi-7/#"])
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    meta = client.get_model_metadata("digits")
    x, y = digits_models.digits.x_test, digits_models.digits.y_test
    tensor = triton.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    probs = client.infer("digits", [tensor]).as_numpy(meta["outputs"][0]["name"])
    assert probs is not None and float((probs.argmax(1) == y).mean()) >= 0.95
    assert sub.wait_for(lambda ms: any(m.topic.endswith("/telemetry") and
                                       b'"inferences": 1' in m.payload for m in ms), 15)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert sub.wait_for(lambda ms: ms[-1].payload == b"offline", 10), "clean stop says offline"
    sub.close()


def test_killed_agent_goes_offline_by_its_last_will(
        running_agent: tuple[subprocess.Popen[bytes], int], mosquitto: MosquittoBroker) -> None:
    process, _ = running_agent
    sub = Subscriber(mosquitto.url, ["edgefleet/v1/clitest/pi-7/status"])
    assert sub.wait_for(lambda ms: any(m.payload == b"online" for m in ms), 15)
    process.kill()
    process.wait()
    started = time.monotonic()
    assert sub.wait_for(lambda ms: ms[-1].payload == b"offline", 10)
    assert time.monotonic() - started < 10
    sub.close()
