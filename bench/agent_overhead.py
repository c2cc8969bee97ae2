"""Overhead of serving: Agent.predict and the KServe v2 HTTP endpoint vs the bare runtime call.

For each model and runtime, calls are interleaved on the same input in one run
(the order rotating every round), so machine noise hits them alike: first the
bare call against ``Agent.predict``, then the bare call against HTTP with JSON
tensors and with binary tensors. Each ratio compares calls of the same rounds.
The HTTP server is a separate ``edgefleet agent run`` process, as on a device;
the client is a keep-alive ``http.client`` connection.

Targets: in-process p50 <= 1.03x the bare call; HTTP adds <= 0.3 ms at p50.

    python bench/agent_overhead.py [--iterations N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.core import Agent
from agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from agent.runtime import load_runtime
from bench.common import (
    ROOT,
    markdown_table,
    percentiles_us,
    print_table,
    update_section,
    write_results,
)
from converter.package import PackageSpec, package_model
from fleet.mosquitto import free_port, wait_for_port

ASSETS = ROOT / "edgefleet" / "demo_assets"
Call = Callable[[], object]


def edge_cnn(out: Path) -> dict[str, Path]:
    """A MobileNet-sized block stack on 96x96x3 (random weights: latency, not accuracy)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    layers = [keras.Input((96, 96, 3), name="image")]
    for filters in (16, 32, 64, 96):
        layers += [keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu"),
                   keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")]
    model = keras.Sequential(layers)
    model(np.zeros((1, 96, 96, 3), np.float32))
    (out / "edge.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    model.export(str(out / "edge.onnx"), format="onnx", verbose=False)
    return {"tflite": out / "edge.tflite", "onnx": out / "edge.onnx"}


def bare_call(model: Path, fmt: str, x: np.ndarray) -> Call:
    data = model.read_bytes()
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_content=data, num_threads=1)
        interp.allocate_tensors()
        i = interp.get_input_details()[0]["index"]
        o = interp.get_output_details()[0]["index"]

        def tflite() -> object:
            interp.set_tensor(i, x)
            interp.invoke()
            return interp.get_tensor(o)

        return tflite
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


@contextmanager
def http_agent(bundle: Path, public: Path, workdir: Path) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "agent", "run", "--bundle", str(bundle),
         "--trusted-key", str(public), "--http", f"127.0.0.1:{port}",
         "--data-dir", str(workdir / f"agent-{port}"), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for_port("127.0.0.1", port, 60):
            raise RuntimeError("agent did not start")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def http_call(port: int, input_name: str, x: np.ndarray) -> Call:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
    return _poster(conn, body.encode(), {"Content-Type": "application/json"})


def _poster(conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> Call:
    def call() -> object:
        conn.request("POST", "/v2/models/bench/infer", body, headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(payload.decode())
        return payload

    return call


def binary_call(port: int, input_name: str, x: np.ndarray) -> Call:
    """The same request with the binary tensor extension (what tritonclient sends)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    raw = np.ascontiguousarray(x).tobytes()
    header = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape),
                                     "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    headers = {"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": str(len(header))}
    return _poster(conn, header + raw, headers)


def interleave(calls: dict[str, Call], iterations: int, warmup: int) -> dict[str, list[int]]:
    """Run the calls round-robin, rotating which goes first so none always follows another."""
    from rich.progress import Progress

    samples: dict[str, list[int]] = {name: [] for name in calls}
    clock = time.perf_counter_ns
    order = list(calls.items())
    with Progress(transient=True) as progress:
        task = progress.add_task("interleaved calls", total=iterations + warmup)
        for i in range(iterations + warmup):
            shift = i % len(order)
            for name, call in order[shift:] + order[:shift]:
                started = clock()
                call()
                if i >= warmup:
                    samples[name].append(clock() - started)
            if i % 200 == 0:
                progress.update(task, completed=i)
    return samples


def measure(label: str, model: Path, fmt: str, x: np.ndarray, keys: tuple[Path, Path],
            workdir: Path, iterations: int) -> dict[str, Any]:
    runtime = load_runtime(model.read_bytes(), fmt)
    input_name = runtime.inputs[0].name
    spec = PackageSpec("bench", "1.0.0", {input_name: x}, atol=1e-3)
    bundle = package_model(model, workdir / f"{label}-{fmt}.efb", spec, SigningKey.load(keys[0]))
    agent = Agent(TrustedKeys.from_paths([keys[1]]), threads=1)
    agent.load(bundle)
    bare = bare_call(model, fmt, x)
    warmup = max(200, iterations // 10)
    # In-process pair alone, so no network call sits between them and skews caches.
    local = interleave({"bare": bare, "agent": lambda: agent.predict(x)}, iterations, warmup)
    with http_agent(bundle, keys[1], workdir) as port:
        remote = interleave({"bare": bare, "http": http_call(port, input_name, x),
                             "http_binary": binary_call(port, input_name, x)},
                            iterations, warmup)
    (b50, b99), (a50, a99) = percentiles_us(local["bare"]), percentiles_us(local["agent"])
    (r50, _), (h50, h99), (y50, y99) = (percentiles_us(remote[k])
                                        for k in ("bare", "http", "http_binary"))
    return {"model": label, "runtime": runtime.name, "iterations": iterations,
            "bare_p50_us": b50, "bare_p99_us": b99, "agent_p50_us": a50, "agent_p99_us": a99,
            "agent_ratio_p50": round(a50 / b50, 3), "agent_added_p50_us": round(a50 - b50, 2),
            "http_p50_us": h50, "http_p99_us": h99,
            "http_added_p50_ms": round((h50 - r50) / 1e3, 3),
            "http_binary_p50_us": y50, "http_binary_p99_us": y99,
            "http_binary_added_p50_ms": round((y50 - r50) / 1e3, 3)}


def report(rows: list[dict[str, Any]]) -> None:
    columns = ["model", "runtime", "bare p50/p99 µs", "Agent.predict p50/p99 µs",
               "in-process ratio p50", "added µs p50", "HTTP JSON p50/p99 µs", "JSON adds ms",
               "HTTP binary p50/p99 µs", "binary adds ms", "in-process ≤1.03×",
               "HTTP ≤0.3 ms (best encoding)"]
    cells = [[r["model"], r["runtime"], f"{r['bare_p50_us']}/{r['bare_p99_us']}",
              f"{r['agent_p50_us']}/{r['agent_p99_us']}", f"{r['agent_ratio_p50']}×",
              r["agent_added_p50_us"], f"{r['http_p50_us']}/{r['http_p99_us']}",
              r["http_added_p50_ms"], f"{r['http_binary_p50_us']}/{r['http_binary_p99_us']}",
              r["http_binary_added_p50_ms"], "yes" if r["agent_ratio_p50"] <= 1.03 else "no",
              "yes" if min(r["http_added_p50_ms"], r["http_binary_added_p50_ms"]) <= 0.3
              else "no"] for r in rows]
    print_table("serving overhead (interleaved, batch 1, 1 thread)", columns, cells)
    note = ("Interleaved, order rotating each round: the bare runtime call against "
            "`Agent.predict`, then the bare call against a keep-alive HTTP client POSTing "
            "JSON tensors, or binary tensors, to `edgefleet agent run` in its own process. "
            "`digits` is the 8×8 test CNN (a bare call is a few µs, so the ratio shows the fixed "
            "cost of the in-process path); `edge-cnn` is a 96×96×3 MobileNet-sized CNN. "
            "Targets: in-process p50 ≤ 1.03× bare; HTTP adds ≤ 0.3 ms at p50. "
            "Raw numbers: `bench/results/agent_overhead.json`.")
    update_section("agent_overhead", "## Serving overhead (`bench/agent_overhead.py`)\n\n" +
                   note + "\n\n" + markdown_table(columns, cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        keys = generate_keypair(workdir / "keys", "bench")
        digit = np.load(ASSETS / "digits-sample.npz")["x"][:1]
        image = np.random.default_rng(0).random((1, 96, 96, 3), dtype=np.float32)
        edge = edge_cnn(workdir)
        rows = []
        for fmt in ("tflite", "onnx"):
            rows.append(measure("digits", ASSETS / f"digits.{fmt}", fmt, digit, keys, workdir,
                                args.iterations))
            rows.append(measure("edge-cnn", edge[fmt], fmt, image, keys, workdir,
                                max(300, args.iterations // 5)))
    path = write_results("agent_overhead", rows, {"targets": {"agent_ratio_p50": 1.03,
                                                              "http_added_p50_ms": 0.3}})
    report(rows)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
