"""Delta updates benchmark: delta / full bundle for real version pairs, build and apply
time, and the bytes a controller serves for a rollout with and without deltas.

Pairs, each of two models (the digits CNN, trained here on scikit-learn's digits, and the
MobileNet-sized ``edge_cnn`` of bench/common.py) converted with edgefleet's converter and
packaged as signed bundles:

* ``new version``: the same model packaged again with a new version and other metadata;
* ``fine-tuned``: the float model after more training (every weight moves a little);
* ``re-quantized``: int8 with another calibration set (scales and most int8 weights move);
* ``pruned``: the float model with 50 % of its weights zeroed (magnitude pruning).

For each: the full bundle, the zstd delta (agent/protocol/delta.py: patch-from, level 19,
long-distance matching), the full bundle compressed alone with zstd 19 for reference, the
delta's build time on the controller and its apply time (the device's rebuild, measured on
this machine). Then a real rollout (a real Mosquitto, the controller, real agents) with and
without deltas, counting the bytes the agents received from the controller.

    python bench/deltas.py [--devices 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import edge_cnn, markdown_table, print_table, update_section, write_results
from edgefleet.agent.protocol.delta import MAX_SHARE, apply_delta, build_delta, worth_it
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from edgefleet.agent.runtime import load_runtime
from edgefleet.converter.data import Dataset
from edgefleet.converter.package import PackageSpec, package_bytes
from edgefleet.converter.prune import prune_keras
from edgefleet.converter.sources import SourceModel, keras_source, load_source
from edgefleet.converter.tflite_backend import to_tflite

Array = np.ndarray[Any, Any]


class Family:
    """One model, its training data, and what makes its versions."""

    def __init__(self, name: str, bundle_name: str, keras_path: Path, x: Array,
                 y: Array) -> None:
        self.name, self.bundle_name, self.path, self.x, self.y = name, bundle_name, keras_path, x, y
        self.source = load_source(keras_path)
        self.input = self.source.inputs[0].name

    def data(self, rows: slice) -> Dataset:
        return Dataset({self.input: self.x[rows]})

    def float_tflite(self, source: SourceModel | None = None) -> bytes:
        return to_tflite(source or self.source, "none")

    def int8(self, calibration: slice) -> bytes:
        return to_tflite(self.source, "int8", self.data(calibration))

    def fine_tuned(self) -> bytes:
        model = self.source.handle
        tuned = model.__class__.from_config(model.get_config())
        tuned.set_weights(model.get_weights())
        from edgefleet.converter._tf import keras

        tuned.compile(keras().optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
        tuned.fit(self.x, self.y, epochs=2, batch_size=32, verbose=0)
        return self.float_tflite(keras_source(self.path, self.source.inputs, tuned))

    def pruned(self) -> bytes:
        result = prune_keras(self.source.handle, 0.5)
        return self.float_tflite(keras_source(self.path, self.source.inputs, result.model))


def families(work: Path) -> list[Family]:
    from tests.models import load_digits, train_digits_cnn

    digits = load_digits()
    trained = train_digits_cnn(work / "digits")
    rng = np.random.default_rng(0)
    images = rng.random((256, 96, 96, 3), dtype=np.float32)
    labels = rng.integers(0, 10, 256)
    return [Family("digits CNN", "digits", trained.keras, digits.x_train, digits.y_train),
            Family("edge_cnn (MobileNet-sized)", "edge", edge_cnn(work), images, labels)]


def pairs(family: Family) -> dict[str, tuple[bytes, bytes, str, str]]:
    """name -> (old model, new model, old mode, new mode)."""
    base = family.float_tflite()
    return {"new version": (base, base, "float", "float"),
            "fine-tuned": (base, family.fine_tuned(), "float", "float"),
            "re-quantized": (family.int8(slice(0, 100)), family.int8(slice(100, 200)),
                             "int8", "int8"),
            "pruned": (base, family.pruned(), "float", "float")}


def bundle(model: bytes, family: Family, version: str, key: SigningKey, out: Path,
           note: str) -> bytes:
    name = load_runtime(model, "tflite").inputs[0].name  # the converted model's own name
    spec = PackageSpec(family.bundle_name, version, {name: family.x[:8]},
                       metrics={"note": note})
    return package_bytes(model, "tflite", out, spec, key).read_bytes()


def timed(call: Callable[[], Any], repeat: int = 3) -> tuple[Any, float]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - started)
    return result, best * 1000


def measure_pair(old: bytes, new: bytes) -> dict[str, Any]:
    import zstandard

    delta, build_ms = timed(lambda: build_delta(old, new), repeat=1)
    def rebuild() -> bytes:
        out = bytearray()
        apply_delta(old, delta, len(new), out.extend)
        return bytes(out)

    rebuilt, apply_ms = timed(rebuild)
    assert rebuilt == new
    alone = zstandard.ZstdCompressor(level=19).compress(new)
    return {"full": len(new), "delta": len(delta), "ratio": round(len(delta) / len(new), 5),
            "compressed_full_ratio": round(len(alone) / len(new), 3),
            "offered": worth_it(len(delta), len(new)), "build_ms": round(build_ms, 1),
            "apply_ms": round(apply_ms, 2)}


def pair_rows(work: Path, key: SigningKey) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    rows, kept = [], {}
    for family in families(work):
        for name, (old_model, new_model, _, _) in pairs(family).items():
            old = bundle(old_model, family, "1.0.0", key, work / "old.efb", "first")
            new = bundle(new_model, family, "1.1.0", key, work / "new.efb", f"{name}, again")
            rows.append({"model": family.name, "pair": name, **measure_pair(old, new)})
            kept[f"{family.name}|{name}"] = old + b"|||" + new  # for the rollout part
            print(rows[-1], flush=True)
    return rows, kept


def rollout_rows(work: Path, key: SigningKey, trusted: TrustedKeys, kept: dict[str, bytes],
                 devices: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for label in ("edge_cnn (MobileNet-sized)|new version",
                  "edge_cnn (MobileNet-sized)|re-quantized",
                  "edge_cnn (MobileNet-sized)|fine-tuned"):
        old, new = kept[label].split(b"|||")
        for deltas in (False, True):
            rows.append({"pair": label.split("|")[1], "deltas": deltas, "devices": devices,
                         **one_rollout(work / f"r{len(rows)}", trusted, old, new, devices,
                                       deltas)})
            print(rows[-1], flush=True)
    return rows


def one_rollout(root: Path, trusted: TrustedKeys, old: bytes, new: bytes, count: int,
                deltas: bool) -> dict[str, Any]:
    from edgefleet.fleet.mosquitto import MosquittoBroker
    from edgefleet.local_fleet import LocalFleet, wait_until

    root.mkdir(parents=True)
    (root / "old.efb").write_bytes(old)
    (root / "new.efb").write_bytes(new)
    broker = MosquittoBroker(workdir=root / "mosquitto").start()
    rng = np.random.default_rng(0)
    fleet = LocalFleet("bench", broker.url, root, trusted,
                       rng.random((16, 96, 96, 3), dtype=np.float32))
    try:
        client = fleet.start_controller()
        assert fleet.controller is not None
        if not deltas:
            fleet.controller.outbox.deltas = None
        ids = [f"d{i}" for i in range(count)]
        for device in ids:
            fleet.add_agent(device, root / "old.efb", traffic=False)
        wait_until(lambda: len([d for d in client.get("/api/v1/devices") if d["active"]])
                   == count, 60, what="devices registered")
        client.post("/api/v1/devices/group", {"devices": ids, "group": "all"})
        for name in ("old.efb", "new.efb"):
            client.upload("/api/v1/models", (root / name).read_bytes())
        started = time.perf_counter()
        rollout = client.post("/api/v1/rollouts", {"model": "edge:1.1.0",
                                                   "selectors": ["group:all"], "soak_s": 0,
                                                   "waves": ["100%"], "device_timeout_s": 120})
        create_ms = (time.perf_counter() - started) * 1000
        wait_until(lambda: client.get(f"/api/v1/rollouts/{rollout['id']}")["state"]
                   in ("SUCCEEDED", "ABORTED"), 300, what="rollout end")
        state = client.get(f"/api/v1/rollouts/{rollout['id']}")["state"]
        served = sum(s.updates.effects.stats.received for s in fleet.agents.values()
                     if s.updates is not None)
        used = sum(s.updates.effects.deltas.used for s in fleet.agents.values()
                   if s.updates is not None)
        return {"state": state, "bytes_served": served, "full_bundle": len(new),
                "per_device": round(served / count), "rebuilt_from_delta": used,
                "create_ms": round(create_ms)}  # 1,000 devices: bench/fleet_deltas.py
    finally:
        fleet.stop()
        broker.stop()


def report(rows: list[dict[str, Any]], rollouts: list[dict[str, Any]]) -> str:
    pair_table = markdown_table(
        ["model", "pair", "full bundle", "delta", "delta / full", "zstd -19 of full alone",
         f"offered (<= {MAX_SHARE:.0%})", "build (controller)", "apply (device)"],
        [[r["model"], r["pair"], f"{r['full']:,} B", f"{r['delta']:,} B",
          f"{r['delta'] / r['full']:.4f}",
          r["compressed_full_ratio"], "yes" if r["offered"] else "no, full",
          f"{r['build_ms']:.0f} ms", f"{r['apply_ms']:.1f} ms"] for r in rows])
    rollout_table = markdown_table(
        ["pair", "deltas", "devices", "state", "bytes served", "per device",
         "rebuilt from a delta", "create request"],
        [[r["pair"], "on" if r["deltas"] else "off", r["devices"], r["state"],
          f"{r['bytes_served']:,}", f"{r['per_device']:,}", r["rebuilt_from_delta"],
          f"{r['create_ms']} ms"] for r in rollouts])
    return "\n\n".join([
        "## Delta updates (bench/deltas.py)",
        "Delta / full bundle for real version pairs (each model converted by edgefleet's "
        "converter, packaged and signed as two bundles). The delta is zstd's patch-from "
        "(the old bundle as a raw-content dictionary, level 19, long-distance matching, "
        "window covering the old bundle). Build time is the controller's, once per pair; "
        "apply time the device's rebuild (base and delta in memory, output streamed), "
        "both on this machine (best of 3 for apply).",
        pair_table,
        "Bytes the controller served for a real rollout to real agents (real Mosquitto, "
        "controller, agents in one process), with and without deltas. At 1,000 devices "
        "they are measured with simulated devices, in the next table "
        "(bench/fleet_deltas.py). The create request includes the delta's build (it is "
        "built when the first wave's desired states are composed).",
        rollout_table,
        "Reading. The digits CNN is trained here (its fine-tuned version is 2 more epochs at "
        "a lower rate); edge_cnn has MobileNet's size but random weights (fine-tuned on "
        "random images), so its float bundles hardly compress alone (0.91) and its figures "
        "stand for a large model's bytes, not a trained one's. A new version number or "
        "metadata costs a few hundred bytes; re-quantizing with new calibration data changes "
        "only activation scales and zero points (per-channel weight scales come from the "
        "weights), so the int8 weights match and the delta is 0.3-2 % of the bundle; "
        "pruning half the weights gives 0.084 on both. Fine-tuned float weights are the hard "
        "case: every weight moves a little, the delta is 0.60-0.61 of the bundle, close to "
        "the digits bundle compressed alone (0.66), and still under the 80 % rule, so it is "
        "offered and saved 40 % of the bytes on the rollout above. Build time grows with "
        "the bundle and with how much changed (3.1 s for the fine-tuned 3.4 MB pair, when "
        "the rollout is created); the device's rebuild takes milliseconds. Timings were "
        "taken with the machine's 2 cores shared by other jobs (load average about 15): "
        "read them as upper bounds. An earlier session compared zstd with bsdiff "
        "(`bsdiff4`, not a dependency) on 7 bundle pairs: zstd as small or smaller on 6 "
        "of 7 (pruned: 0.087 against 0.313), the same build time, 10-100x faster to "
        "apply.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--report-only", action="store_true",
                        help="write BENCHMARKS.md again from bench/results/deltas.json")
    args = parser.parse_args()
    if args.report_only:
        import json

        from bench.common import RESULTS

        saved = json.loads((RESULTS / "deltas.json").read_text())
        update_section("deltas", report(saved["rows"], saved["rollouts"]))
        return
    with tempfile.TemporaryDirectory(prefix="edgefleet-deltas-") as folder:
        work = Path(folder)
        secret, public = generate_keypair(work / "keys", "bench")
        key, trusted = SigningKey.load(secret), TrustedKeys.from_paths([public])
        rows, kept = pair_rows(work, key)
        rollouts = rollout_rows(work, key, trusted, kept, args.devices)
    write_results("deltas", rows, {"rollouts": rollouts})
    print_table("delta / full", list(rows[0]), [list(r.values()) for r in rows])
    print_table("rollout bytes", list(rollouts[0]), [list(r.values()) for r in rollouts])
    update_section("deltas", report(rows, rollouts))


if __name__ == "__main__":
    main()
