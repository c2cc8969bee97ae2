"""The demo that the README's first command runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edgefleet.demo import run_demo


def test_demo_serves_requests_and_shows_every_devices_telemetry(tmp_path: Path) -> None:
    result = run_demo(devices=2, requests=30, workdir=tmp_path)
    assert result.accuracy >= 0.9
    assert [d["device"] for d in result.devices] == ["device-1", "device-2"]
    assert [d["inferences_total"] for d in result.devices] == [15, 15]
    assert all(d["model"] == "digits" and d["model_version"] == "1.0.0" for d in result.devices)


def test_demo_command_prints_json() -> None:
    result = subprocess.run([sys.executable, "-m", "edgefleet", "demo", "--devices", "2",
                             "--requests", "10", "--json"], capture_output=True, text=True,
                            timeout=300, check=False, env={**os.environ})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["devices"]) == 2 and data["broker"].startswith("mqtt://127.0.0.1:")
