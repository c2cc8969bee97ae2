"""Bytes the controller serves for a rollout to 1,000 simulated devices, with and without
deltas, side by side in one run.

The bundle pairs are edge_cnn's (the MobileNet-sized model of bench/common.py), made as
bench/deltas.py makes them: ``fine-tuned`` (2 more epochs: every float weight moves) and
``re-quantized`` (int8 with another calibration set). For each pair, two rollouts, each
with a fresh Mosquitto and a fresh controller in its own process (``edgefleet fleet
serve``, as bench/fleet_scale.py starts it) holding both bundles:

- deltas on: N simulated devices on v1 that use the delta the controller offers, as the
  agent does (:mod:`edgefleet.fleet.simulate.delta`: the delta downloaded over HTTP from
  ``/deltas/{from}-{to}``, applied by the agent's code, the rebuilt bundle checked);
- deltas off: the same devices with ``SimOptions(deltas=False)`` (an agent that predates
  deltas): the controller still builds and offers the delta, the devices download the
  full bundle.

Every device downloads for itself (``share_downloads`` off). The rollout sends v2 in
waves 1%, 10%, 50%, 100%, soak 0. Measured: the rise of the controller's
``edgefleet_bytes_served_total{kind}`` (its ``/metrics``) over the rollout, the bytes
the devices received (their own count, which must match), how many rebuilt the bundle
from a delta, and the rollout's wall time (create request to SUCCEEDED).

    python bench/fleet_deltas.py [--devices 1000] [--pairs fine-tuned,re-quantized]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import edge_cnn, markdown_table, print_table, update_section, write_results
from bench.deltas import Family, bundle
from bench.fleet_scale import WAVES, BenchError, Kit, controller, wait_for
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from edgefleet.fleet.mosquitto import MosquittoBroker

PAIRS = ("fine-tuned", "re-quantized")
KINDS = ("bundle", "delta")


def edge_family(work: Path) -> Family:
    rng = np.random.default_rng(0)
    images = rng.random((256, 96, 96, 3), dtype=np.float32)
    return Family("edge_cnn (MobileNet-sized)", "edge", edge_cnn(work), images,
                  rng.integers(0, 10, 256))


def make_pair(family: Family, name: str, key: SigningKey, folder: Path) -> tuple[Path, Path]:
    """v1 and v2 of ``name`` as signed bundle files (the pairs of bench/deltas.py)."""
    if name == "fine-tuned":
        old_model, new_model = family.float_tflite(), family.fine_tuned()
    elif name == "re-quantized":
        old_model, new_model = family.int8(slice(0, 100)), family.int8(slice(100, 200))
    else:
        raise SystemExit(f"unknown pair {name!r}: one of {', '.join(PAIRS)}")
    folder.mkdir(parents=True)
    v1, v2 = folder / "v1.efb", folder / "v2.efb"
    bundle(old_model, family, "1.0.0", key, v1, "first")
    bundle(new_model, family, "1.1.0", key, v2, f"{name}, again")
    return v1, v2


def served(url: str) -> dict[str, int]:
    """The controller's ``edgefleet_bytes_served_total`` by kind."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    found = {s.labels["kind"]: int(s.value) for family in text_string_to_metric_families(text)
             for s in family.samples if s.name == "edgefleet_bytes_served_total"}
    return {kind: found.get(kind, 0) for kind in KINDS}


def one_rollout(kit: Kit, n: int, deltas: bool, fleet: str) -> dict[str, Any]:
    from edgefleet.fleet.simulate import SimOptions, SimulatedFleet

    with ExitStack() as stack:
        broker = MosquittoBroker(workdir=kit.work / f"mqtt-{fleet}").start()
        stack.callback(broker.stop)
        ctl = stack.enter_context(controller(kit, broker, fleet))
        for path in (kit.v1, kit.v2):
            ctl.client.upload("/api/v1/models", path.read_bytes())
        options = SimOptions(telemetry_interval_s=5.0, request_rate=0.2, connect_rate=1000.0,
                             workers=4, share_downloads=False, deltas=deltas)
        sim = SimulatedFleet(broker.url, fleet, n, kit.trusted, options, kit.v1)
        stack.callback(sim.stop)
        sim.start()
        wait_for(lambda: ctl.health()["online"] == n, 60 + n / 50, f"{n} devices online")
        ctl.client.post("/api/v1/devices/group", {"devices": list(sim.devices),
                                                  "group": "all"})
        before = served(ctl.client.url)
        started = time.monotonic()
        rollout = ctl.client.post("/api/v1/rollouts", {
            "model": "edge:1.1.0", "selectors": ["group:all"], "waves": WAVES, "soak_s": 0,
            "device_timeout_s": 3600})
        create_s = time.monotonic() - started
        state = finish(ctl.client, str(rollout["id"]), n)
        seconds = time.monotonic() - started
        received = sim.downloads.received
        after = settled(ctl.client.url, before, received)
        stats = sim.deltas.stats
        return {"deltas": deltas, "devices": n, "state": state,
                "bytes_served": sum(after.values()),
                **{f"served_{kind}": after[kind] for kind in KINDS},
                **{f"received_{kind}": received[kind] for kind in KINDS},
                "rebuilt_from_delta": stats.used, "delta_fallbacks": stats.fallbacks,
                "fallback_reasons": dict(stats.reasons), "rollout_s": round(seconds, 2),
                "create_request_s": round(create_s, 2),
                "v1_bytes": kit.v1.stat().st_size, "v2_bytes": kit.v2.stat().st_size}


def finish(client: Any, rollout_id: str, n: int) -> str:
    """Wait for the rollout's end; its final state."""
    seen: dict[str, Any] = {}

    def ended() -> bool:
        seen.update(client.get(f"/api/v1/rollouts/{rollout_id}"))
        return seen["state"] in ("SUCCEEDED", "ABORTED", "ROLLED_BACK")

    wait_for(ended, 300 + n, f"rollout {rollout_id} to end", poll_s=0.5)
    if seen["state"] != "SUCCEEDED":
        raise BenchError(f"rollout {rollout_id} is {seen['state']}: {seen.get('reason')}")
    return str(seen["state"])


def settled(url: str, before: dict[str, int], received: dict[str, int]) -> dict[str, int]:
    """The bytes served over the rollout, once the controller has counted what the devices
    received (it counts a response once it is sent)."""
    rise: dict[str, int] = {}

    def counted() -> bool:
        now = served(url)
        rise.update({kind: now[kind] - before[kind] for kind in KINDS})
        return all(rise[kind] >= received[kind] for kind in KINDS)

    wait_for(counted, 30, f"bytes served to reach the devices' count {received}")
    return rise


def measure(work: Path, devices: int, names: list[str]) -> list[dict[str, Any]]:
    secret, public = generate_keypair(work / "keys", "bench")
    key, trusted = SigningKey.load(secret), TrustedKeys.from_paths([public])
    family = edge_family(work)
    rows: list[dict[str, Any]] = []
    for name in names:
        v1, v2 = make_pair(family, name, key, work / name)
        kit = Kit(work, v1, v2, public, trusted)
        for deltas in (False, True):
            fleet = f"d{len(rows)}"
            row = {"pair": name, **one_rollout(kit, devices, deltas, fleet)}
            print(row, flush=True)
            rows.append(row)
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    by_pair: dict[str, dict[bool, dict[str, Any]]] = {}
    for row in rows:
        by_pair.setdefault(row["pair"], {})[row["deltas"]] = row
    sides = [(name, by[False], by[True]) for name, by in by_pair.items() if len(by) == 2]
    table = markdown_table(
        ["pair", "devices", "full bundle", "bytes served, deltas off (bundle / delta)",
         "bytes served, deltas on (bundle / delta)", "on ÷ off", "rebuilt from a delta",
         "rollout s (off / on)", "of which the create request, s (off / on)"],
        [[name, on["devices"], f"{on['v2_bytes']:,} B",
          f"{off['bytes_served']:,} ({off['served_bundle']:,} / {off['served_delta']:,})",
          f"{on['bytes_served']:,} ({on['served_bundle']:,} / {on['served_delta']:,})",
          f"{on['bytes_served'] / off['bytes_served']:.4f}",
          f"{on['rebuilt_from_delta']} of {on['devices']}",
          f"{off['rollout_s']} / {on['rollout_s']}",
          f"{off['create_request_s']} / {on['create_request_s']}"] for name, off, on in sides])
    return "\n\n".join([
        "### A rollout to 1,000 simulated devices, with and without deltas "
        "(`bench/fleet_deltas.py`)",
        "Measured, not scaled: one run, a fresh Mosquitto and controller (its own process, "
        "SQLite) per rollout, both bundles pushed, the devices simulated "
        "(`fleet.simulate`, the agent's update flow) on v1; v2 sent in waves 1%, 10%, "
        "50%, 100%, soak 0. Every device downloads for itself over HTTP from the "
        "controller: with deltas on, the delta the desired state offers, applied by the "
        "agent's code (`agent/protocol/delta.py`) to the device's v1 and checked as the "
        "agent checks it (`fleet/simulate/delta.py`); with deltas off, the same devices "
        "as agents that predate deltas (`SimOptions(deltas=False)`: the delta is still "
        "built and offered, the full bundle is downloaded). Bytes served: the rise of the "
        "controller's `edgefleet_bytes_served_total{kind}` over the rollout (equal to what "
        "the devices counted). Rollout time includes the delta's build on the create "
        "request (bundle pairs and build times: the table above). Raw numbers: "
        "`bench/results/fleet_deltas.json`.",
        table,
        reading(sides),
    ])


def reading(sides: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> str:
    said = [f"{name}: {_size(off['bytes_served'])} without deltas, "
            f"{_size(on['bytes_served'])} with them "
            f"({on['served_delta'] // on['devices']:,} B a device)" for name, off, on in sides]
    fallbacks = sum(on["delta_fallbacks"] for _, _, on in sides)
    every = all(on["rebuilt_from_delta"] == on["devices"] for _, _, on in sides)
    outcome = ("every device rebuilt v2 from the delta, so the bytes served are the delta's "
               "size times the devices, as the 4-device rollout above had them per device"
               if every and not fallbacks else
               f"{fallbacks} delta(s) fell back to the full bundle (reasons in the JSON)")
    return ("Reading. For " + "; ".join(said) + f". With deltas on, {outcome}. The pairs are "
            "made again in this run (the fine-tuned one is trained again, not bit for bit "
            "the same), so their delta sizes differ slightly from the table above. Times "
            "are from a shared machine (other sessions' jobs on its 2 cores): the create "
            "request builds the delta in both runs (the controller offers it either way), "
            "and with deltas on every device's rebuild runs in the one simulator process; "
            "read them as upper bounds, not as the cost of deltas.")


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--report-only", action="store_true",
                        help="write BENCHMARKS.md again from bench/results/fleet_deltas.json")
    parser.add_argument("--quick", action="store_true",
                        help="20 devices, one pair; prints the table, writes nothing")
    args = parser.parse_args()
    if args.report_only:
        import json

        from bench.common import RESULTS

        saved = json.loads((RESULTS / "fleet_deltas.json").read_text())
        update_section("fleet_deltas", report(saved["rows"]))
        return
    devices = 20 if args.quick else args.devices
    names = [p.strip() for p in args.pairs.split(",") if p.strip()][:1 if args.quick else None]
    with tempfile.TemporaryDirectory(prefix="edgefleet-fleet-deltas-") as folder:
        rows = measure(Path(folder), devices, names)
    print_table("bytes served", list(rows[0]), [list(r.values()) for r in rows])
    if args.quick:
        print(report(rows))
        return
    write_results("fleet_deltas", rows, {"devices": devices})
    update_section("fleet_deltas", report(rows))


if __name__ == "__main__":
    main()
