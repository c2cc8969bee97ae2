"""Fleet at scale: rollout wall time, controller CPU and RSS, telemetry ingest vs the broker.

For each N (100, 1,000, 10,000 by default) one run starts a private Mosquitto, the
controller in its own process (``edgefleet fleet serve --tick 0.5``, SQLite store) and N
simulated devices in this process (:mod:`edgefleet.fleet.simulate`: the device contract and the
agent's update flow, one network thread for every connection), all on v1 of the digits
bundle. It measures:

- registration: from the fleet's start until ``/healthz`` shows all N online on v1;
- rollout: all N put in one group, v2 pushed, a rollout in waves 1%,10%,50%,100% with
  ``soak_s`` 0: wall time from the create request to SUCCEEDED (devices download v2
  once for the whole fleet, ``share_downloads``, so the bundle server is not what is
  measured);
- the controller's CPU (user + system, per phase) and its peak RSS (sampled every 0.2 s);
- ingest against the broker's raw rate, side by side: with the devices stopped (still
  registered), a burst of M telemetry points in the agent's exact shape (captured from
  the simulated devices, ``ts`` renewed) to the telemetry topics of registered devices,
  published at full speed over one QoS 1 connection while the controller and a bare paho
  subscriber (own process, ``on_message`` only counts; QoS 1 like the controller) both
  receive them. Raw rate = messages per second the bare subscriber got; ingest rate =
  the rise of the controller's ``telemetry_points`` per second until it has all M.

Targets: 10,000 devices on a 2-core machine, controller RSS <= 1 GB, ingest >= 0.5x the
raw rate, rollout time growing at most linearly in N.

    python bench/fleet_scale.py [--sizes 100,1000,10000] [--burst M] [--quick]

``--quick`` is a smoke run (N=50, a small burst) that prints the table and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    markdown_table,
    update_section,
    write_results,
)
from edgefleet.agent.protocol.signing import TrustedKeys, generate_keypair
from edgefleet.agent.protocol.topics import Leaf, device_topic, fleet_filter
from edgefleet.demo import package_digits
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port, stop_process, wait_for_port
from edgefleet.fleet.simulate import SimOptions, SimulatedFleet
from edgefleet.local_fleet import wait_until

SIZES, QUICK_SIZES = (100, 1000, 10_000), (50,)
BURST, QUICK_BURST = 50_000, 5_000
TICK_S, SAMPLE_S = 0.5, 0.2
TARGET_RSS_MB, TARGET_INGEST = 1024.0, 0.5
WAVES = ["1%", "10%", "50%", "100%"]
SIM = SimOptions(telemetry_interval_s=5.0, request_rate=0.2, share_downloads=True,
                 connect_rate=1000.0)
SIM_SHOWN = ("telemetry_interval_s", "request_rate", "share_downloads", "connect_rate", "workers")


class BenchError(RuntimeError):
    """A phase of the benchmark did not finish in its time."""


@dataclass(frozen=True)
class Kit:
    """What every size needs: the bundles, the keys and a scratch folder."""

    work: Path
    v1: Path
    v2: Path
    public: Path
    trusted: TrustedKeys


def make_kit(work: Path) -> Kit:
    secret, public = generate_keypair(work / "keys", "bench")
    paths = [package_digits(work / f"digits-{v}.efb", v, secret) for v in ("1.0.0", "2.0.0")]
    return Kit(work, paths[0], paths[1], public, TrustedKeys.from_paths([public]))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             poll_s: float = 0.2) -> None:
    try:
        wait_until(predicate, timeout, poll_s, what)
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None


# --- the controller in its own process ------------------------------------------------

class Sampler:
    """Peak RSS of a process, sampled on a thread; CPU seconds (user + system) on demand."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            except psutil.Error:
                return

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Controller:
    client: FleetClient
    sampler: Sampler

    def health(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client.get("/healthz")
        return data


@contextmanager
def controller(kit: Kit, broker: MosquittoBroker, fleet: str) -> Iterator[Controller]:
    """``edgefleet fleet serve`` on a free port with a fresh store; stopped by its PID."""
    port, token, data = free_port(), secrets.token_urlsafe(16), kit.work / f"controller-{fleet}"
    data.mkdir()
    log = (kit.work / f"controller-{fleet}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "fleet", "serve", "--fleet", fleet,
         "--trusted-key", str(kit.public), "--broker", broker.url, "--data-dir", str(data),
         "--http", f"127.0.0.1:{port}", "--token", f"bench={token}", "--tick", str(TICK_S)],
        stdout=log, stderr=subprocess.STDOUT, cwd=kit.work)
    sampler = Sampler(process.pid)
    try:
        if not wait_for_port("127.0.0.1", port, 60):
            raise BenchError(f"the controller did not start: see {log.name}")
        yield Controller(FleetClient(f"http://127.0.0.1:{port}", token, 120.0), sampler)
    finally:
        sampler.stop()
        stop_process(process, signal.SIGTERM)
        log.close()


# --- phases -----------------------------------------------------------------------------

class Capture:
    """The first telemetry payloads the simulated devices publish, kept to replay them."""

    def __init__(self, url: str, fleet: str, keep: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from edgefleet.agent.mqtt import parse_broker_url

        self.keep, self.payloads = keep, list[bytes]()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-capture-{fleet}",
                                   protocol=paho.MQTTv311)
        self._client.on_message = lambda _c, _u, message: self._take(bytes(message.payload))
        host, port = parse_broker_url(url)
        self._client.connect(host, port)
        self._client.subscribe(fleet_filter(fleet, Leaf.TELEMETRY), 1)
        self._client.loop_start()

    def _take(self, payload: bytes) -> None:
        if len(self.payloads) < self.keep:
            self.payloads.append(payload)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def register(sim: SimulatedFleet, ctl: Controller, n: int, show: Callable[[int], None]
             ) -> float:
    """Start the devices; seconds until the controller lists all of them online on v1."""
    started = time.monotonic()
    sim.start()

    def done() -> bool:
        health = ctl.health()
        show(int(health["online"]))
        return bool(health["devices"] == n and health["online"] == n
                    and health["versions"].get("digits:1.0.0") == n)

    wait_for(done, 60 + n / 50, f"registration of {n} devices", poll_s=0.5)
    return time.monotonic() - started


class CpuMeter:
    """CPU seconds of each named process over a phase, and the cores the rest of the machine
    kept busy meanwhile (other people's load: the noise of this run)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        times = psutil.cpu_times()
        busy = times.user + times.system + sum(getattr(times, name, 0.0)
                                               for name in ("nice", "irq", "softirq"))
        read = {name: float(sum(p.cpu_times()[:2])) for name, p in self.processes.items()}
        return {**read, "machine": busy, "wall": time.monotonic()}

    def stop(self, phase: str) -> dict[str, float]:
        end = self._read()
        delta = {k: end[k] - self._start[k] for k in end}
        ours = sum(delta[name] for name in self.processes)
        out = {f"{name}_cpu_{phase}_s": round(delta[name], 2) for name in self.processes}
        out[f"other_processes_cores_{phase}"] = round(max(0.0, delta["machine"] - ours)
                                                      / delta["wall"], 2)
        return out


def roll_out(sim: SimulatedFleet, ctl: Controller, n: int, pids: dict[str, int],
             show: Callable[[int], None]) -> dict[str, Any]:
    """Group everyone, create the rollout of v2; wall time until it SUCCEEDED."""
    ctl.client.post("/api/v1/devices/group", {"devices": list(sim.devices), "group": "scale"})
    body = {"model": "digits:2.0.0", "selectors": ["group:scale"], "waves": WAVES,
            "soak_s": 0, "device_timeout_s": 3600}
    meter = CpuMeter(pids)
    started = time.monotonic()
    rollout_id = str(ctl.client.post("/api/v1/rollouts", body)["id"])

    def devices_done() -> bool:  # read on the devices' side: costs the controller nothing
        done = sum(1 for v in sim.devices.values()
                   if v.update_state == "COMMITTED" and v.active_version == "2.0.0")
        show(done)
        return done == n

    # one poll reads every device (about 1 us each): poll less often in a bigger fleet, so
    # the bench does not take the CPU the simulated devices need (0.5 s at 10,000)
    wait_for(devices_done, 120 + n / 10, f"{n} devices on v2",
             poll_s=min(0.5, max(0.1, n / 20_000)))
    devices_done_s = time.monotonic() - started
    state: dict[str, Any] = {}

    def succeeded() -> bool:
        state.update(ctl.client.get(f"/api/v1/rollouts/{rollout_id}"))
        if state["state"] not in ("RUNNING", "SUCCEEDED"):
            raise BenchError(f"rollout {rollout_id} is {state['state']}: {state['reason']}")
        return bool(state["state"] == "SUCCEEDED")

    wait_for(succeeded, 60, f"rollout {rollout_id} SUCCEEDED", poll_s=0.1)
    seconds = time.monotonic() - started
    return {"rollout_s": round(seconds, 2), "rollout_ms_per_device": round(seconds * 1e3 / n, 3),
            "devices_on_v2_s": round(devices_done_s, 2), "rollout_counts": state["counts"],
            **wave_timings(state["devices"]),
            **meter.stop("rollout")}


def wave_timings(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """Per wave, first install sent to last success (s); per device, sent to success (s)."""
    waves: dict[int, list[dict[str, Any]]] = {}
    for device in (d for d in devices if d["targeted_ms"]):  # sent the bundle
        waves.setdefault(int(device["wave"]), []).append(device)
    spans = [(max(d["since_ms"] for d in members) - min(d["targeted_ms"] for d in members)) / 1e3
             for _, members in sorted(waves.items())]
    each = np.array([d["since_ms"] - d["targeted_ms"] for m in waves.values() for d in m],
                    dtype=np.float64) / 1e3
    return {"wave_sizes": [len(m) for _, m in sorted(waves.items())],
            "wave_s": [round(s, 2) for s in spans],
            "device_update_p50_s": round(float(np.percentile(each, 50)), 2),
            "device_update_max_s": round(float(each.max()), 2)}


def burst_payloads(captured: list[bytes], devices: list[str], fleet: str, m: int
                   ) -> list[tuple[str, bytes]]:
    """``m`` (topic, payload) pairs: captured agent points with a fresh ``ts``, round robin."""
    if not captured:
        raise BenchError("no telemetry was captured from the simulated devices")
    points = [json.loads(p) for p in captured]
    now = int(time.time() * 1000)
    out = []
    for i in range(m):
        point = points[i % len(points)]
        point["ts"] = now + i
        out.append((device_topic(fleet, devices[i % len(devices)], Leaf.TELEMETRY),
                    json.dumps(point).encode()))
    return out


def ingest(ctl: Controller, broker: MosquittoBroker, fleet: str,
           messages: list[tuple[str, bytes]], show: Callable[[int], None]) -> dict[str, Any]:
    """The burst, received by the controller and a bare subscriber at once."""
    m, url = len(messages), broker.url
    raw = subprocess.Popen([sys.executable, __file__, "--raw-subscriber", url,
                            fleet_filter(fleet, Leaf.TELEMETRY), str(m)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert raw.stdout is not None
        if raw.stdout.readline().strip() != b"ready":
            raise BenchError("the bare subscriber did not subscribe")
        flood, wire = Flood(url), Flood.encode(messages)
        before = int(ctl.health()["telemetry_points"])
        meter = CpuMeter({"controller": ctl.sampler.process.pid, "publisher": os.getpid(),
                          "broker": broker.pid or 0, "raw_subscriber": raw.pid})
        started = time.monotonic()
        try:
            published = flood.send(wire, m)
        finally:
            flood.close()
        reached = controller_reached(ctl, before, m, started, show)
        cpu = meter.stop("ingest")
        got = json.loads(raw.stdout.readline() or "{}")
        raw.wait(timeout=30)
    finally:
        stop_process(raw)
    if got.get("received") != m:
        raise BenchError(f"the bare subscriber got {got.get('received')} of {m} messages")
    raw_rate, ingest_rate = m / (got["last"] - started), m / (reached - started)
    return {"burst": m, "publish_msg_s": round(m / (published - started)),
            "raw_msg_s": round(raw_rate), "ingest_msg_s": round(ingest_rate),
            "ingest_ratio": round(ingest_rate / raw_rate, 3),
            **cpu}


class Flood:
    """A bare MQTT 3.1.1 publisher on a raw socket: QoS 1 PUBLISH packets encoded up front,
    written back to back, PUBACKs counted on a thread.

    paho-mqtt tops out near 6,000 QoS 1 publishes/s here (one core of Python per
    message), so with it the burst would measure the publisher; this one offers the
    broker more than either subscriber can take, and the broker's queue does the rest.
    """

    def __init__(self, url: str) -> None:
        from edgefleet.agent.mqtt import parse_broker_url

        self._sock = socket.create_connection(parse_broker_url(url), timeout=30)
        self._sock.sendall(_packet(0x10, _text("MQTT") + bytes([4, 0x02]) +
                                   (60).to_bytes(2, "big") + _text(f"bench-flood-{os.getpid()}")))
        if _read_exactly(self._sock, 4) != b"\x20\x02\x00\x00":
            raise BenchError("the broker refused the flood publisher's connection")

    @staticmethod
    def encode(messages: list[tuple[str, bytes]]) -> bytes:
        """The PUBLISH packets (QoS 1, packet ids 1, 2, ...) back to back."""
        if len(messages) > 65_535:
            raise BenchError("a burst is at most 65,535 messages (one packet id each)")
        return b"".join(_packet(0x32, _text(topic) + (i + 1).to_bytes(2, "big") + payload)
                        for i, (topic, payload) in enumerate(messages))

    def send(self, wire: bytes, count: int) -> float:
        """Write ``count`` encoded publishes; the time (monotonic) the last PUBACK came."""
        acks: list[float] = []
        reader = threading.Thread(target=self._count_acks, args=(count, acks))
        reader.start()
        view = memoryview(wire)
        for offset in range(0, len(wire), 1 << 18):
            self._sock.sendall(view[offset:offset + (1 << 18)])
        reader.join()
        if not acks:
            raise BenchError("the broker did not acknowledge the whole burst")
        return acks[0]

    def _count_acks(self, expect: int, done: list[float]) -> None:
        received = 0
        with contextlib.suppress(OSError):
            while received < 4 * expect:
                chunk = self._sock.recv(1 << 16)
                if not chunk:
                    return
                received += len(chunk)
            done.append(time.monotonic())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(b"\xe0\x00")
        self._sock.close()


def _packet(kind: int, body: bytes) -> bytes:
    size, length = len(body), bytearray()
    while True:
        size, digit = divmod(size, 128)
        length.append(digit | (0x80 if size else 0))
        if not size:
            return bytes([kind]) + bytes(length) + body


def _text(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


def controller_reached(ctl: Controller, before: int, m: int, started: float,
                       show: Callable[[int], None]) -> float:
    """When ``telemetry_points`` rose by ``m`` from ``before``: interpolated between polls.

    Polls every 0.25 s (a /healthz at 10,000 devices is not free); each reading is dated
    at the middle of its request.
    """
    target, last = before + m, None
    deadline = started + 300
    while time.monotonic() < deadline:
        sent = time.monotonic()
        points = int(ctl.health()["telemetry_points"])
        at = (sent + time.monotonic()) / 2
        show(points - before)
        if points >= target:
            if last is None:
                return at
            return last[0] + (at - last[0]) * (target - last[1]) / (points - last[1])
        last = (at, points)
        time.sleep(0.25)
    raise BenchError(f"the controller did not count {m} telemetry points in 300 s")


# --- the bare subscriber (its own process) ---------------------------------------------

def raw_subscriber(url: str, topic_filter: str, expect: int, timeout: float = 300.0) -> None:
    """Print "ready" once subscribed, then {"received", "first", "last"} (monotonic)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefleet.agent.mqtt import parse_broker_url

    got = {"received": 0, "first": 0.0, "last": 0.0}
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        now = time.monotonic()
        if not got["received"]:
            got["first"] = now
        got["received"] += 1
        got["last"] = now

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{os.getpid()}",
                         protocol=paho.MQTTv311)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    host, port = parse_broker_url(url)
    client.connect(host, port)
    client.subscribe(topic_filter, 1)
    client.loop_start()
    if subscribed.wait(10):
        print("ready", flush=True)
    deadline = time.monotonic() + timeout
    while got["received"] < expect and time.monotonic() < deadline:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
    print(json.dumps(got), flush=True)


# --- one size ---------------------------------------------------------------------------

def measure(kit: Kit, n: int, burst: int, progress: Any) -> dict[str, Any]:
    fleet = f"scale{n}"
    task = progress.add_task(f"N={n}: broker and controller", total=n)

    def show(what: str, total: int) -> Callable[[int], None]:
        progress.update(task, description=f"N={n}: {what}", total=total, completed=0)
        return lambda done: progress.update(task, completed=done)

    with ExitStack() as stack:
        broker = MosquittoBroker(workdir=kit.work / f"mqtt-{n}",
                                 extra_config=["max_connections -1"]).start()
        stack.callback(broker.stop)
        ctl = stack.enter_context(controller(kit, broker, fleet))
        for bundle in (kit.v1, kit.v2):
            ctl.client.upload("/api/v1/models", bundle.read_bytes())
        capture = Capture(broker.url, fleet, keep=50)
        stack.callback(capture.close)
        sim = SimulatedFleet(broker.url, fleet, n, kit.trusted, SIM, kit.v1)
        stack.callback(sim.stop)
        pids = {"controller": ctl.sampler.process.pid, "simulator": os.getpid(),
                "broker": broker.pid or 0}
        meter = CpuMeter(pids)
        registration = register(sim, ctl, n, show("registering", n))
        row = {"devices": n, "registration_s": round(registration, 2),
               **meter.stop("register"), **roll_out(sim, ctl, n, pids, show("rolling out v2", n))}
        devices = list(sim.devices)
        show("stopping the devices", n)
        sim.stop()
        wait_for(lambda: ctl.health()["online"] == 0, 60, "devices offline", poll_s=0.5)
        messages = burst_payloads(capture.payloads, devices, fleet, burst)
        row.update(ingest(ctl, broker, fleet, messages, show("telemetry burst", burst)))
        row["controller_peak_rss_mb"] = round(ctl.sampler.peak_rss / 2**20, 1)
        row["controller_cpu_total_s"] = round(ctl.sampler.cpu(), 2)
    progress.remove_task(task)
    return row


# --- report -----------------------------------------------------------------------------

COLUMNS = ["devices", "registration s", "rollout s", "rollout ms/device",
           "rollout ÷ linear from smallest / previous N", "controller peak RSS MB",
           "controller CPU s (register / rollout / burst)", "simulator CPU s (rollout)",
           "ingest msg/s", "raw broker msg/s", "ingest ÷ raw", "RSS ≤ 1 GB / ingest ≥ 0.5×",
           "other load, cores (rollout / burst)"]


def add_linearity(rows: list[dict[str, Any]]) -> None:
    """Rollout s against the smallest N's and the next smaller N's, scaled linearly."""
    ordered = sorted(rows, key=lambda r: r["devices"])
    for previous, row in zip([ordered[0], *ordered[:-1]], ordered, strict=True):
        for key, base in (("rollout_vs_linear", ordered[0]),
                          ("rollout_vs_linear_previous", previous)):
            linear = base["rollout_s"] * row["devices"] / base["devices"]
            row[key] = round(row["rollout_s"] / linear, 3)


def cells(r: dict[str, Any]) -> list[Any]:
    def met(ok: bool) -> str:
        return "yes" if ok else "no"

    return [r["devices"], r["registration_s"], r["rollout_s"], r["rollout_ms_per_device"],
            f"{r['rollout_vs_linear']} / {r['rollout_vs_linear_previous']}",
            r["controller_peak_rss_mb"],
            f"{r['controller_cpu_register_s']} / {r['controller_cpu_rollout_s']} / "
            f"{r['controller_cpu_ingest_s']}", r["simulator_cpu_rollout_s"],
            r["ingest_msg_s"], r["raw_msg_s"], f"{r['ingest_ratio']}×",
            f"{met(r['controller_peak_rss_mb'] <= TARGET_RSS_MB)} / "
            f"{met(r['ingest_ratio'] >= TARGET_INGEST)}",
            f"{r['other_processes_cores_rollout']} / {r['other_processes_cores_ingest']}"]


NOTE = ("One run per N on this machine: a private Mosquitto, the controller in its own "
        "process (`edgefleet fleet serve --tick 0.5`, SQLite) and N simulated devices in the "
        "bench process (`fleet.simulate`, the agent's update flow; telemetry every 5 s, 0.2 "
        "requests/s each, 1,000 connections/s). Registration: fleet start until `/healthz` "
        "shows all N online on v1. Rollout: v2 to a group of all N in waves 1%, 10%, 50%, "
        "100%, soak 0, from the create request to SUCCEEDED; the devices download v2 once for "
        "the whole fleet (`share_downloads`), so the bundle server is not measured. Rollout "
        "÷ linear: rollout s over the smallest (or the next smaller) N's rollout s times N / "
        "that N (≤ 1: no worse than linear). Controller CPU: user + system seconds per phase; "
        "RSS sampled every 0.2 s. Burst: with the devices stopped (still registered), M "
        "points in the agent's telemetry shape (captured from the devices, fresh `ts`) to "
        "their topics at QoS 1, at full speed from a raw-socket publisher (paho tops out near "
        "6,000 QoS 1 publishes/s here: it would measure the publisher), received at once by "
        "the controller and by a bare paho subscriber in its own process that only counts; "
        "raw = its messages/s, ingest = the controller's `telemetry_points` rise per second "
        "(interpolated between 0.25 s polls). Both receivers, the broker and the publisher "
        "share the 2 cores. Other load: cores kept busy by processes outside the benchmark "
        "meanwhile (this machine is shared; a run with other load is slower). Per-wave times, "
        "device update times and the CPU of the simulator, the broker and the bare "
        "subscriber are in the JSON.")


def print_wide(title: str, table: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = Table(title=title)
    for column in COLUMNS:
        shown.add_column(column, overflow="fold")
    for row in table:
        shown.add_row(*map(str, row))
    Console(width=max(Console().width, 200)).print(shown)


def report(rows: list[dict[str, Any]], burst: int, write: bool) -> None:
    add_linearity(rows)
    table = [cells(r) for r in rows]
    print_wide(f"fleet at scale (burst of {burst} telemetry points)", table)
    if not write:
        print(json.dumps(rows, indent=1))
        return
    path = write_results("fleet_scale", rows, {
        "targets": {"controller_rss_mb": TARGET_RSS_MB, "ingest_ratio": TARGET_INGEST},
        "tick_s": TICK_S, "waves": WAVES, "simulation": {k: getattr(SIM, k) for k in SIM_SHOWN}})
    note = f"{NOTE} Raw numbers: `{path.relative_to(ROOT)}`."
    update_section("fleet_scale", "## Fleet at scale (`bench/fleet_scale.py`)\n\n" + note +
                   "\n\n" + markdown_table(COLUMNS, table))
    print(f"results: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="device counts, comma-separated")
    parser.add_argument("--burst", type=int, default=None,
                        help=f"telemetry points in the ingest burst (default {BURST})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=50, a small burst, nothing written")
    parser.add_argument("--raw-subscriber", nargs=3, metavar=("URL", "FILTER", "COUNT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_subscriber:
        url, topic_filter, count = args.raw_subscriber
        raw_subscriber(url, topic_filter, int(count))
        return
    sizes = QUICK_SIZES if args.quick else tuple(int(s) for s in args.sizes.split(","))
    burst = args.burst or (QUICK_BURST if args.quick else BURST)
    from rich.progress import Progress

    with tempfile.TemporaryDirectory(prefix="edgefleet-scale-") as tmp, Progress() as progress:
        kit = make_kit(Path(tmp))
        rows = [measure(kit, n, burst, progress) for n in sizes]
    report(rows, burst, write=not args.quick)


if __name__ == "__main__":
    main()
