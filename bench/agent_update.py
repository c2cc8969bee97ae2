"""Update benchmark: the serving pause of a switch, and bytes re-sent after a cut download.

Switch pause: keep-alive HTTP clients send digits to the agent's KServe server
while the agent installs v2, v1, v2, ... through the whole update flow
(download, verify, stage, health check, switch, commit); the longest request of
those windows is set against the longest and the p99 of an equal steady window,
measured in the same run. Bytes re-sent: a download cut at a third, resumed
with Range; target: at most one chunk (64 KiB) sent twice.

    python bench/agent_update.py
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    markdown_table,
    print_table,
    update_section,
    write_results,
)
from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from edgefleet.agent.runtime import load_runtime
from edgefleet.agent.serving.http import InferenceServer
from edgefleet.agent.update import local
from edgefleet.agent.update.download import CHUNK, DownloadStats, fetch
from edgefleet.converter.package import PackageSpec, package_model
from tests.http_files import FileServer

ASSETS = ROOT / "edgefleet" / "demo_assets"


class Load:
    def __init__(self, port: int, body: str) -> None:
        self.samples: list[tuple[float, float]] = []  # (end time, latency s)
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(port, body), daemon=True)
        self._thread.start()

    def _run(self, port: int, body: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while not self._stop.is_set():
            started = time.perf_counter()
            conn.request("POST", "/v2/models/digits/infer", body)
            response = conn.getresponse()
            response.read()
            end = time.perf_counter()
            if response.status != 200:
                self.failures += 1
            self.samples.append((end, end - started))
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def bundles(work: Path, key: Path) -> dict[str, Path]:
    x = np.load(ASSETS / "digits-sample.npz")["x"][:8]
    model = ASSETS / "digits.tflite"
    name = load_runtime(model.read_bytes(), "tflite").inputs[0].name
    return {v: package_model(model, work / f"v{v}.efb", PackageSpec("digits", v, {name: x}),
                             SigningKey.load(key)) for v in ("1.0.0", "2.0.0")}


def switch_pause(work: Path, trusted: TrustedKeys, versions: dict[str, Path],
                 switches: int = 10) -> dict[str, float]:
    agent = Agent(trusted)
    data = work / "device"
    local.install(agent, data, versions["1.0.0"])
    server = InferenceServer(agent).start()
    assert agent.model is not None
    x = np.load(ASSETS / "digits-sample.npz")["x"][:1]
    body = json.dumps({"inputs": [{"name": agent.model.runtime.inputs[0].name,
                                   "shape": [1, 8, 8, 1], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]})
    load = Load(server.port, body)
    windows: list[tuple[str, float, float]] = []
    try:
        for i in range(switches):
            steady_start = time.perf_counter()
            time.sleep(0.3)
            windows.append(("steady", steady_start, time.perf_counter()))
            started = time.perf_counter()
            local.install(agent, data, versions["2.0.0" if i % 2 == 0 else "1.0.0"])
            windows.append(("update", started, time.perf_counter()))
    finally:
        load.stop()
        server.stop()
    return _summarise(load, windows)


def _summarise(load: Load, windows: list[tuple[str, float, float]]) -> dict[str, float]:
    def inside(kind: str) -> list[float]:
        return [lat for end, lat in load.samples for k, a, b in windows
                if k == kind and a <= end <= b + lat]

    steady, update = np.array(inside("steady")) * 1e3, np.array(inside("update")) * 1e3
    return {"steady_p50_ms": round(float(np.percentile(steady, 50)), 3),
            "steady_p99_ms": round(float(np.percentile(steady, 99)), 3),
            "steady_max_ms": round(float(steady.max()), 3),
            "update_p50_ms": round(float(np.percentile(update, 50)), 3),
            "update_max_ms": round(float(update.max()), 3),
            "pause_ratio_max": round(float(update.max() / steady.max()), 2),
            "requests": len(load.samples), "failures": load.failures}


def resent_bytes(work: Path, bundle: Path) -> dict[str, float]:
    big = work / "www"
    big.mkdir(exist_ok=True)
    data = bundle.read_bytes() * 20  # ~1 MB, so a cut lands mid-file
    (big / "blob.bin").write_bytes(data)
    server = FileServer(big)
    server.faults.cut_after, server.faults.cuts = len(data) // 3, 1
    stats = DownloadStats()
    try:
        fetch(server.url("blob.bin"), work / "blob.bin", len(data), stats=stats, backoff_s=0.01)
    finally:
        server.stop()
    resent = server.faults.sent - len(data)
    return {"size": len(data), "sent": server.faults.sent, "resent": resent,
            "resumed_from": stats.resumed_from, "chunk": CHUNK,
            "within_one_chunk": float(resent <= CHUNK)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        secret, public = generate_keypair(work / "keys", "bench")
        versions = bundles(work, secret)
        pause = switch_pause(work, TrustedKeys.from_paths([public]), versions)
        resend = resent_bytes(work, versions["1.0.0"])
    write_results("agent_update", [pause, resend], {"chunk_bytes": CHUNK})
    columns = ["measure", "value"]
    cells: list[list[Any]] = [["requests during the run", pause["requests"]],
             ["failed requests", pause["failures"]],
             ["steady p50 / p99 / max ms", f"{pause['steady_p50_ms']} / {pause['steady_p99_ms']}"
              f" / {pause['steady_max_ms']}"],
             ["during updates p50 / max ms", f"{pause['update_p50_ms']} / "
              f"{pause['update_max_ms']}"],
             ["longest request during updates ÷ longest steady", pause["pause_ratio_max"]],
             ["download cut at a third: bytes re-sent", f"{resend['resent']} of "
              f"{resend['size']} (target ≤ one chunk, {CHUNK})"]]
    print_table("update: switch pause and resumed download", columns, cells)
    note = ("Ten updates (v1 ↔ v2 through the whole flow) under steady keep-alive HTTP load "
            "against the in-process KServe server, each preceded by a 0.3 s steady window in "
            "the same run; and a ~1 MB download cut at a third, resumed with Range. Raw numbers: "
            "`bench/results/agent_update.json`.")
    update_section("agent_update", "## Updates (`bench/agent_update.py`)\n\n" + note + "\n\n" +
                   markdown_table(columns, cells))


if __name__ == "__main__":
    main()
