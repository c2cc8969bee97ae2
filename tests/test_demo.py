"""The demo that the README's first command runs: convert, roll out, stop a bad version,
roll back, show the fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_the_demo_rolls_out_stops_a_bad_version_and_rolls_back() -> None:
    result = subprocess.run([sys.executable, "-m", "edgefleet", "demo", "--devices", "3",
                             "--json"], capture_output=True, text=True, timeout=600,
                            check=False, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert data["broker"].startswith("mqtt://127.0.0.1:")
    rollouts = {r["model"]: r for r in data["rollouts"]}
    assert rollouts["digits:2.0.0"]["state"] == "ROLLED_BACK"
    assert rollouts["digits:3.0.0"]["state"] == "ABORTED"
    assert "agreement" in rollouts["digits:3.0.0"]["reason"]
    models = {m["model"]: m for m in data["models"]}
    assert models["digits:2.0.0"]["quantization"] == "int8"
    assert models["digits:2.0.0"]["accuracy"] >= 0.95  # measured by the converter
    assert [d["model"] for d in data["devices"]] == ["digits:1.0.0"] * 3
    assert all(d["inferences"] and d["p95 ms"] is not None for d in data["devices"])
    actions = [e["action"] for e in data["history"]]
    for action in ("model.push", "rollout.create", "rollout.rollback"):
        assert any(a.startswith(action) for a in actions)
