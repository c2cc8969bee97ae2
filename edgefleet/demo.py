"""``edgefleet demo``: the whole product on one machine, on the embedded digits model.

1. signing keys; v1 = the embedded float model, packaged; v2 = the Keras model converted
   to full-integer int8 by the converter, calibrated and measured on sample digits;
   v3 = the same conversion calibrated on data at the wrong scale (0-255 instead of 0-1)
   and shipped without an evaluation set: the kind of mistake a fleet must catch;
2. a broker (Mosquitto when installed, else the embedded one), a controller with its API,
   and a few devices (real agents) on v1, each serving a steady stream of digits;
3. v2 rolled out in waves with quality gates: it succeeds;
4. v3 rolled out with a canary: the agreement gate (the canary's new answers against its
   previous model's, on live requests) stops it and the canary rolls back by itself;
5. one command rolls the v2 rollout back: every device returns to v1;
6. the fleet state: devices with live telemetry, rollouts, models, history.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from edgefleet.agent.runtime import load_runtime
from edgefleet.converter.package import PackageSpec, package_model
from edgefleet.fleet.api_types import Device, Rollout
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.mosquitto import (
    MosquittoBroker,
    MosquittoMissingError,
    find_mosquitto,
    free_port,
)
from edgefleet.local_fleet import LocalFleet, wait_until

__all__ = ["DemoResult", "package_digits", "run_demo"]

ASSETS = Path(__file__).resolve().parent / "demo_assets"
FLEET = "demo"
GROUP = "demo-cameras"
Step = Callable[[str], None]


@dataclass(frozen=True)
class DemoResult:
    broker: str
    controller: str
    models: list[dict[str, Any]]
    rollouts: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    history: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"broker": self.broker, "controller": self.controller, "models": self.models,
                "rollouts": self.rollouts, "devices": self.devices, "history": self.history}


@contextmanager
def _broker(workdir: Path) -> Iterator[str]:
    try:
        find_mosquitto()
    except MosquittoMissingError:
        from edgefleet.agent.broker import EmbeddedBroker

        with EmbeddedBroker(port=free_port()) as embedded:
            yield embedded.url
        return
    with MosquittoBroker(workdir=workdir / "mosquitto") as mosquitto:
        yield mosquitto.url


def _sample() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    data = np.load(ASSETS / "digits-sample.npz")
    return data["x"], data["y"]


def package_digits(out: Path, version: str, key: Path) -> Path:
    """The embedded float digits model as a signed bundle (health vectors: 8 sample digits)."""
    model = ASSETS / "digits.tflite"
    name = load_runtime(model.read_bytes(), "tflite").inputs[0].name
    spec = PackageSpec("digits", version, {name: _sample()[0][:8]}, task="classification",
                       labels=tuple(str(i) for i in range(10)))
    return package_model(model, out, spec, SigningKey.load(key))


def _convert(work: Path, key: Path, version: str, scale: float, evaluate: bool) -> Path:
    from edgefleet.converter.config import ConvertConfig
    from edgefleet.converter.pipeline import convert

    x, y = _sample()
    calibration = work / f"calibration-{version}.npy"
    np.save(calibration, x[:100] * scale)
    eval_path = None
    if evaluate:
        eval_path = work / "eval.npz"
        np.savez(eval_path, image=x[100:], labels=y[100:])
    out = work / f"digits-{version}.efb"
    convert(ConvertConfig(model=ASSETS / "digits.keras", output=out, sign_key=key,
                          quantize="int8", calibration=calibration, eval=eval_path,
                          version=version, name="digits", quiet=True,
                          # v3's wrong calibration is for the fleet gate to stop: the
                          # converter's default 1-point budget would refuse it first
                          max_drop=None if evaluate else 100.0))
    return out


def run_demo(devices: int = 4, workdir: Path | None = None,
             step: Step = lambda text: None) -> DemoResult:
    """Run the demo and return what the fleet looked like at the end."""
    with ExitStack() as stack:
        work = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        step("signing keys and bundles: v1 float, v2 int8, v3 int8 with a bad calibration")
        secret, public = generate_keypair(work / "keys", "demo")
        v1 = package_digits(work / "digits-1.0.0.efb", "1.0.0", secret)
        v2 = _convert(work, secret, "2.0.0", 1.0, evaluate=True)
        v3 = _convert(work, secret, "3.0.0", 255.0, evaluate=False)
        step("broker, controller and devices")
        url = stack.enter_context(_broker(work))
        fleet = LocalFleet(FLEET, url, work, TrustedKeys.from_paths([public]), _sample()[0])
        stack.callback(fleet.stop)
        client = fleet.start_controller()
        ids = [f"camera-{i + 1}" for i in range(devices)]
        for device in ids:
            fleet.add_agent(device, v1)
        wait_until(lambda: _on(client, ids, "1.0.0"), 60, what="devices registered on v1")
        client.set_group(ids, GROUP)
        for bundle in (v1, v2, v3):
            client.push(bundle)
        step("rolling out v2 in waves (25%, 100%) behind quality gates")
        good = _rollout(client, "digits:2.0.0", waves=["25%", "100%"], soak_s=2)
        _finish(client, good, "SUCCEEDED")
        wait_until(lambda: _on(client, ids, "2.0.0"), 60, what="v2 everywhere")
        step("rolling out v3 to a canary: the agreement gate must stop it")
        bad = _rollout(client, "digits:3.0.0", waves=["1", "100%"], soak_s=60)
        _finish(client, bad, "ABORTED")
        wait_until(lambda: _on(client, ids, "2.0.0"), 60, what="the canary back on v2")
        step("one command rolls v2 back: every device returns to v1")
        client.rollback_rollout(good)
        wait_until(lambda: _on(client, ids, "1.0.0"), 60, what="v1 everywhere")
        wait_until(lambda: _telemetry_on(fleet, ids, "1.0.0"), 30, what="fresh telemetry")
        return _result(fleet, client, url)


def _rollout(client: FleetClient, model: str, waves: list[str], soak_s: float) -> str:
    return client.create_rollout(model, {
        "selectors": [f"group:{GROUP}"], "waves": waves, "soak_s": soak_s,
        "device_timeout_s": 120, "gates": {"min_agreement_pct": 90, "max_error_rate_pct": 1,
                                           "min_samples": 50}})["id"]


def _finish(client: FleetClient, rollout: str, expected: str) -> None:
    def ended() -> Rollout | None:
        data = client.rollout(rollout)
        return data if data["state"] in ("SUCCEEDED", "ABORTED", "ROLLED_BACK") else None

    data = wait_until(ended, 120, what=f"rollout {rollout} to end")
    if data["state"] != expected:
        raise RuntimeError(f"rollout {rollout} ended {data['state']} ({data['reason']}), "
                           f"the demo expected {expected}")


def _on(client: FleetClient, ids: list[str], version: str) -> bool:
    found = {d["id"]: d for d in client.devices()}
    return all(i in found and found[i]["online"] and _version(found[i]) == version
               and found[i]["update_state"] in ("COMMITTED", "ROLLED_BACK", "IDLE") for i in ids)


def _version(device: Device) -> str | None:
    active = device["active"]
    return None if active is None else active["version"]


def _telemetry_on(fleet: LocalFleet, ids: list[str], version: str) -> bool:
    assert fleet.controller is not None
    latest = fleet.controller.telemetry.latest
    return all(latest.get(i, {}).get("model_version") == version
               and latest[i].get("latency_p95_ms") is not None for i in ids)


def _result(fleet: LocalFleet, client: FleetClient, url: str) -> DemoResult:
    assert fleet.controller is not None and fleet.api is not None
    latest = fleet.controller.telemetry.latest
    devices = [_device_row(d, latest.get(d["id"], {})) for d in client.devices()]
    rollouts = [{"rollout": r["id"], "model": f"{r['spec']['model']['name']}:"
                 f"{r['spec']['model']['version']}", "state": r["state"],
                 "devices": r["total"], "reason": r["reason"]}
                for r in client.rollouts()]
    models = [{"model": f"{m['name']}:{m['version']}", "size": m["size"],
               "quantization": (m["manifest"].get("optimization") or {}).get("quantization"),
               "accuracy": (m["manifest"].get("metrics") or {}).get("accuracy")}
              for m in client.models()]
    history = [{"by": e["actor"], "action": f"{e['action']} {e['target']}",
                "outcome": e["outcome"], "what": e["detail"].get("summary", "")}
               for e in reversed(client.history(200))]
    return DemoResult(url, fleet.api.url, models, rollouts, devices, history)


def _device_row(device: Device, values: dict[str, Any]) -> dict[str, Any]:
    active: Mapping[str, Any] = device["active"] or {}
    return {"device": device["id"], "model": f"{active.get('name')}:{active.get('version')}",
            "update": device["update_state"], "inferences": values.get("inferences_total"),
            "p50 ms": values.get("latency_p50_ms"), "p95 ms": values.get("latency_p95_ms")}
