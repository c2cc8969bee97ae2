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
    RESULTS,
    ROOT,
    markdown_table,
    update_section,
    write_results,
)
from bench.scale_sim import Shard
from bench.scale_tree import Brokers, start_brokers
from edgefleet.agent.protocol.signing import TrustedKeys, generate_keypair
from edgefleet.agent.protocol.topics import Leaf, device_topic, fleet_filter
from edgefleet.demo import package_digits
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port, stop_process, wait_for_port
from edgefleet.local_fleet import wait_until

SIZES, QUICK_SIZES = (100, 1000, 10_000), (50,)
BURST, QUICK_BURST = 50_000, 5_000
TICK_S, SAMPLE_S = 0.5, 0.2
STALL_S = 180.0  # a phase whose count does not grow for this long ends the size
TARGET_RSS_MB, TARGET_INGEST = 1024.0, 0.5
WAVES = ["1%", "10%", "50%", "100%"]
SIM = {"telemetry_interval_s": 5.0, "request_rate": 0.2, "share_downloads": True,
       "connect_rate": 1000.0, "workers": 4}  # connect_rate: the whole fleet's, split by shard
SHARD_SIZE = 12_500  # devices per simulator process and per leaf broker (fd limit: 20,000)


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


class Stall:
    """Raises once a count has not grown for ``limit_s``: how far a size went, said early."""

    def __init__(self, what: str, total: int, limit_s: float = STALL_S) -> None:
        self.what, self.total, self.limit_s = what, total, limit_s
        self.best, self.since = -1, time.monotonic()

    def check(self, count: int) -> None:
        now = time.monotonic()
        if count > self.best:
            self.best, self.since = count, now
        elif now - self.since > self.limit_s:
            raise BenchError(f"{self.what} stalled at {count} of {self.total} "
                             f"(no progress in {self.limit_s:g} s)")


# --- the controller in its own process ------------------------------------------------

class Sampler:
    """Peak RSS (every 0.2 s) and open files (every 1 s) of the largest of some processes,
    sampled on a thread; CPU seconds (user + system) of the first on demand."""

    def __init__(self, *pids: int) -> None:
        self.processes = [psutil.Process(pid) for pid in pids]
        self.process = self.processes[0]
        self.peak_rss = self.peak_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        turn = 0
        while not self._stop.wait(SAMPLE_S):
            turn += 1
            for process in self.processes:
                with contextlib.suppress(psutil.Error):  # ended: its peak is kept
                    self.peak_rss = max(self.peak_rss, process.memory_info().rss)
                    if turn % 5 == 0:
                        self.peak_fds = max(self.peak_fds, process.num_fds())

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
        stdout=log, stderr=subprocess.STDOUT, cwd=kit.work,
        env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout, not an installed one
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


def register(shards: list[Shard], ctl: Controller, n: int, show: Callable[[int], None]
             ) -> float:
    """Start the devices; seconds until the controller lists all of them online on v1."""
    started = time.monotonic()
    for shard in shards:
        shard.send("start")

    stall = Stall("registration", n)

    def done() -> bool:
        health = ctl.health()
        show(int(health["online"]))
        stall.check(int(health["online"]))
        return bool(health["devices"] == n and health["online"] == n
                    and health["versions"].get("digits:1.0.0") == n)

    wait_for(done, 60 + n / 50, f"registration of {n} devices", poll_s=0.5)
    return time.monotonic() - started


class CpuMeter:
    """CPU seconds of each named process over a phase, and the cores the rest of the machine
    kept busy meanwhile (other people's load: the noise of this run)."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.processes = {name: [psutil.Process(pid) for pid in group]
                          for name, group in pids.items()}
        self._last = {p.pid: 0.0 for group in self.processes.values() for p in group}
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        times = psutil.cpu_times()
        busy = times.user + times.system + sum(getattr(times, name, 0.0)
                                               for name in ("nice", "irq", "softirq"))
        read = {name: sum(map(self._cpu, group)) for name, group in self.processes.items()}
        return {**read, "machine": busy, "wall": time.monotonic()}

    def _cpu(self, process: psutil.Process) -> float:
        """User + system seconds; a process that ended keeps its last reading."""
        with contextlib.suppress(psutil.Error):
            self._last[process.pid] = float(sum(process.cpu_times()[:2]))
        return self._last[process.pid]

    def stop(self, phase: str) -> dict[str, float]:
        end = self._read()
        delta = {k: end[k] - self._start[k] for k in end}
        ours = sum(delta[name] for name in self.processes)
        out = {f"{name}_cpu_{phase}_s": round(delta[name], 2) for name in self.processes}
        out[f"other_processes_cores_{phase}"] = round(max(0.0, delta["machine"] - ours)
                                                      / delta["wall"], 2)
        return out


def roll_out(shards: list[Shard], ctl: Controller, n: int, pids: dict[str, list[int]],
             show: Callable[[int], None]) -> dict[str, Any]:
    """Group everyone, create the rollout of v2; wall time until it SUCCEEDED."""
    for shard in shards:  # a request per shard: a JSON body is at most 1 MiB
        ctl.client.post("/api/v1/devices/group", {"devices": shard.devices, "group": "scale"})
    body = {"model": "digits:2.0.0", "selectors": ["group:scale"], "waves": WAVES,
            "soak_s": 0, "device_timeout_s": 3600}
    meter = CpuMeter(pids)
    started = time.monotonic()
    rollout_id = str(ctl.client.post("/api/v1/rollouts", body)["id"])

    stall = Stall("the rollout (devices on v2, committed or in probation)", 2 * n)

    def devices_done() -> bool:  # read on the devices' side: costs the controller nothing
        done = sum(shard.count("done") for shard in shards)
        show(done)  # a wave commits once its devices all run v2: progress is either
        stall.check(done + sum(shard.count("serving") for shard in shards))
        return done == n

    wait_for(devices_done, 120 + n / 25, f"{n} devices on v2", poll_s=0.1)
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
    decoded = [json.loads(p) for p in captured]  # a point, or a backlog of points (a list)
    points = [point for d in decoded for point in (d if isinstance(d, list) else [d])]
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
        meter = CpuMeter({"controller": [ctl.sampler.process.pid], "publisher": [os.getpid()],
                          "broker": [broker.pid or 0], "raw_subscriber": [raw.pid]})
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

@dataclass(frozen=True)
class Setup:
    """What every size of one run shares: telemetry interval, tree or not, shard size."""

    telemetry_interval_s: float
    tree: bool
    shard_size: int

    def shards(self, n: int) -> int:
        return -(-n // self.shard_size)

    def leaves(self, n: int) -> int:
        """Leaf brokers: one per shard, or none (devices on the root) for a single shard."""
        shards = self.shards(n)
        return shards if self.tree or shards > 1 else 0

    def options(self, shards: int) -> dict[str, Any]:
        return {**SIM, "telemetry_interval_s": self.telemetry_interval_s,
                "connect_rate": SIM["connect_rate"] / shards}


def spawn_shards(kit: Kit, brokers: Brokers, fleet: str, n: int, setup: Setup,
                 stack: ExitStack) -> list[Shard]:
    """``n`` devices over the shards, round robin on the device brokers; once all are built."""
    count, urls = setup.shards(n), brokers.device_urls
    sizes = [n // count + (i < n % count) for i in range(count)]
    options = setup.options(count)
    prefixes = ["sim-"] if count == 1 else [f"sim{i + 1}-" for i in range(count)]
    shards = []
    for i, (size, prefix) in enumerate(zip(sizes, prefixes, strict=True)):
        log = stack.enter_context((kit.work / f"shard-{n}-{i + 1}.log").open("wb"))
        # its own source address: paho binds each socket first, so one address holds at
        # most one connection per ephemeral port (28,232 here) for all shards together
        own = json.dumps({**options, "source_address": f"127.0.0.{i + 2}"})
        shard = Shard.spawn([urls[i % len(urls)], fleet, str(size), prefix, str(kit.v1),
                             str(kit.public), "2.0.0", own], log)
        stack.callback(shard.close)
        shards.append(shard)
    return [shard.ready() for shard in shards]


def stop_shards(shards: list[Shard]) -> None:
    """Every device of every shard says offline and disconnects, the shards in parallel."""
    for shard in shards:
        shard.send("stop")
    for shard in shards:
        shard.stop()


def measure(kit: Kit, n: int, burst: int, setup: Setup, progress: Any) -> dict[str, Any]:
    fleet = f"scale{n}"
    task = progress.add_task(f"N={n}: brokers, controller and simulators", total=n)

    def show(what: str, total: int) -> Callable[[int], None]:
        progress.update(task, description=f"N={n}: {what}", total=total, completed=0)
        return lambda done: progress.update(task, completed=done)

    with ExitStack() as stack:
        load = os.getloadavg()[0]
        brokers = start_brokers(kit.work / f"mqtt-{n}", fleet, setup.leaves(n), stack)
        ctl = stack.enter_context(controller(kit, brokers.root, fleet))
        for bundle in (kit.v1, kit.v2):
            ctl.client.upload("/api/v1/models", bundle.read_bytes())
        capture = Capture(brokers.root.url, fleet, keep=50)
        stack.callback(capture.close)
        shards = spawn_shards(kit, brokers, fleet, n, setup, stack)
        watched = {"broker": Sampler(*brokers.pids),
                   "simulator": Sampler(*(s.process.pid for s in shards))}
        for sampler in watched.values():
            stack.callback(sampler.stop)
        pids = {"controller": [ctl.sampler.process.pid],
                "simulator": [s.process.pid for s in shards], "broker": brokers.pids}
        row: dict[str, Any] = {
            "devices": n, "topology": brokers.shape, "simulator_processes": len(shards),
            "telemetry_interval_s": setup.telemetry_interval_s, "load_1m_at_start": round(load, 2)}
        try:
            phases(row, shards, ctl, brokers, pids, fleet, burst, capture, show)
        except BenchError as exc:  # how far it went is the result
            row["failed"] = str(exc)
            row["reached"] = {"online": sum(s.count("online") for s in shards),
                              "on_v2": sum(s.count("done") for s in shards)}
        row["controller_peak_rss_mb"] = round(ctl.sampler.peak_rss / 2**20, 1)
        row["controller_peak_fds"] = ctl.sampler.peak_fds
        row["controller_cpu_total_s"] = round(ctl.sampler.cpu(), 2)
        for name, sampler in watched.items():
            row[f"{name}_peak_rss_mb"] = round(sampler.peak_rss / 2**20, 1)
            row[f"{name}_peak_fds"] = sampler.peak_fds
    progress.remove_task(task)
    return row


def phases(row: dict[str, Any], shards: list[Shard], ctl: Controller, brokers: Brokers,
           pids: dict[str, list[int]], fleet: str, burst: int, capture: Capture,
           show: Callable[[str, int], Callable[[int], None]]) -> None:
    """Registration, rollout, then the burst with the devices stopped; into ``row``."""
    n = row["devices"]
    meter = CpuMeter(pids)
    row["registration_s"] = round(register(shards, ctl, n, show("registering", n)), 2)
    row.update(meter.stop("register"))
    row.update(roll_out(shards, ctl, n, pids, show("rolling out v2", n)))
    devices = [d for shard in shards for d in shard.devices]
    show("stopping the devices", n)
    stop_shards(shards)
    wait_for(lambda: ctl.health()["online"] == 0, 60 + n / 500, "devices offline", poll_s=0.5)
    messages = burst_payloads(capture.payloads, devices, fleet, burst)
    row.update(ingest(ctl, brokers.root, fleet, messages, show("telemetry burst", burst)))


# --- report -----------------------------------------------------------------------------

COLUMNS = ["devices", "brokers / simulator processes", "telemetry every s", "registration s",
           "rollout s", "rollout ms/device", "rollout ÷ linear from smallest / previous N",
           "÷ the 10,000 row: registration / rollout / controller RSS / controller CPU",
           "controller peak RSS MB", "controller CPU s (register / rollout / burst)",
           "simulator CPU s (rollout)", "ingest msg/s", "raw broker msg/s", "ingest ÷ raw",
           "RSS ≤ 1 GB / ingest ≥ 0.5×", "other load, cores (rollout / burst)"]
RATIOS = ("registration_s", "rollout_s", "controller_peak_rss_mb", "controller_cpu_rollout_s")


def add_linearity(rows: list[dict[str, Any]]) -> None:
    """Rollout s against the smallest N's and the next smaller N's, scaled linearly."""
    ordered = sorted((r for r in rows if "rollout_s" in r), key=lambda r: r["devices"])
    if not ordered:
        return
    for previous, row in zip([ordered[0], *ordered[:-1]], ordered, strict=True):
        for key, base in (("rollout_vs_linear", ordered[0]),
                          ("rollout_vs_linear_previous", previous)):
            linear = base["rollout_s"] * row["devices"] / base["devices"]
            row[key] = round(row["rollout_s"] / linear, 3)


def add_ratios(rows: list[dict[str, Any]], base_n: int = 10_000) -> None:
    """Each row's registration, rollout, controller RSS and rollout CPU over the 10,000 row's."""
    base = next((r for r in rows if r["devices"] == base_n and "rollout_s" in r), None)
    for row in rows:
        if base is not None:
            row["vs_10000"] = {k: round(row[k] / base[k], 2) for k in RATIOS
                               if base[k] and k in row}


def cells(r: dict[str, Any]) -> list[Any]:
    """One table row; "-" for what a size that stalled did not reach."""
    def get(key: str) -> Any:
        return r.get(key, "-")

    def met(key: str, ok: Callable[[float], bool]) -> str:
        return "-" if key not in r else "yes" if ok(r[key]) else "no"

    ratio = r.get("vs_10000", {})
    first = r["devices"] if "failed" not in r else \
        f"{r['devices']}: {r['failed']} ({r['reached']['online']} online, " \
        f"{r['reached']['on_v2']} on v2)"
    return [first, f"{r.get('topology', '1 broker')} / {r.get('simulator_processes', 'the bench')}",
            r.get("telemetry_interval_s", 5.0), get("registration_s"), get("rollout_s"),
            get("rollout_ms_per_device"),
            f"{get('rollout_vs_linear')} / {get('rollout_vs_linear_previous')}",
            " / ".join(str(ratio.get(k, "-")) for k in RATIOS),
            r["controller_peak_rss_mb"],
            f"{get('controller_cpu_register_s')} / {get('controller_cpu_rollout_s')} / "
            f"{get('controller_cpu_ingest_s')}", get("simulator_cpu_rollout_s"),
            get("ingest_msg_s"), get("raw_msg_s"), f"{get('ingest_ratio')}×",
            f"{met('controller_peak_rss_mb', lambda v: v <= TARGET_RSS_MB)} / "
            f"{met('ingest_ratio', lambda v: v >= TARGET_INGEST)}",
            f"{get('other_processes_cores_rollout')} / {get('other_processes_cores_ingest')}"]


NOTE = ("One run per N on this machine: Mosquitto, the controller in its own process "
        "(`edgefleet fleet serve --tick 0.5`, SQLite) and N simulated devices (`fleet.simulate`, "
        "the agent's update flow; 0.2 requests/s each, 1,000 connections/s for the whole "
        "fleet) in simulator processes of at most 12,500 devices each (rows without a count "
        "ran them in the bench process). Registration: fleet start until `/healthz` "
        "shows all N online on v1. Rollout: v2 to a group of all N in waves 1%, 10%, 50%, "
        "100%, soak 0, from the create request to SUCCEEDED; the devices download v2 once per "
        "simulator process (`share_downloads`), so the bundle server is not measured. Rollout "
        "÷ linear: rollout s over the smallest (or the next smaller) N's rollout s times N / "
        "that N (≤ 1: no worse than linear). Controller CPU: user + system seconds per phase; "
        "RSS sampled every 0.2 s. Burst: with the devices stopped (still registered), M "
        "points in the agent's telemetry shape (captured from the devices, fresh `ts`) to "
        "their topics at QoS 1 on the controller's broker, at full speed from a raw-socket "
        "publisher (paho tops out near "
        "6,000 QoS 1 publishes/s here: it would measure the publisher), received at once by "
        "the controller and by a bare paho subscriber in its own process that only counts; "
        "raw = its messages/s, ingest = the controller's `telemetry_points` rise per second "
        "(interpolated between 0.25 s polls). Both receivers, the broker and the publisher "
        "share the 2 cores. Other load: cores kept busy by processes outside the benchmark "
        "meanwhile (this machine is shared; a run with other load is slower). Per-wave times, "
        "device update times, the CPU of the simulators, the brokers and the bare "
        "subscriber, and the peak RSS and open files of each kind of process are in the JSON.")
TREE_NOTE = ("Beyond one broker (`--tree`, docs/scale-out.md): the devices connect to leaf "
             "Mosquittos of at most 12,500 connections each, bridged to a root Mosquitto that "
             "the controller connects to (`fleet.mosquitto.bridge_lines`); one simulator "
             "process per leaf. A process here may hold at most 20,000 open files (soft and "
             "hard limit), so neither one broker nor one simulator process can hold 50,000 "
             "connections. Telemetry every {interval:g} s for every size of this table, the "
             "10,000 row being the same setup, for the ratio (run minutes apart on this "
             "machine, each row's `load_1m_at_start` in the JSON): at 50,000 "
             "devices every 5 s would be 10,000 msg/s, above what the controller ingests on "
             "these 2 cores, and the simulated devices themselves cost CPU in proportion "
             "(docs/scale-out.md, Limits). A size that stopped progressing for 180 s shows "
             "how far it went. The tree's brokers save their database as Mosquitto does by "
             "default (`autosave_interval 1800`; the tests' 1 s made the root rewrite tens of "
             "MB every 2 s). This machine was shared with other sessions' test runs: "
             "\"other load\" says how many cores they kept busy; the run's scheduling group "
             "(`{scheduling}`) is in the JSON.")


def print_wide(title: str, table: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = Table(title=title)
    for column in COLUMNS:
        shown.add_column(column, overflow="fold")
    for row in table:
        shown.add_row(*map(str, row))
    Console(width=max(Console().width, 200)).print(shown)


SERIES = {"fleet_scale": ("", NOTE), "fleet_scale_tree": ("### Tree of brokers", TREE_NOTE)}


def report(rows: list[dict[str, Any]], burst: int, setup: Setup, write: bool) -> None:
    add_linearity(rows)
    add_ratios(rows)
    print_wide(f"fleet at scale (burst of {burst} telemetry points)", [cells(r) for r in rows])
    if not write:
        print(json.dumps(rows, indent=1))
        return
    name = "fleet_scale_tree" if setup.tree else "fleet_scale"
    path = write_results(name, rows, {
        "targets": {"controller_rss_mb": TARGET_RSS_MB, "ingest_ratio": TARGET_INGEST},
        "tick_s": TICK_S, "waves": WAVES, "shard_size": setup.shard_size, "tree": setup.tree,
        "simulation": setup.options(1), "scheduling": scheduling()})
    update_section("fleet_scale", section())
    print(f"results: {path}")


def scheduling() -> str:
    """This run's CPU share against other sessions (Linux autogroups: a process's nice only
    counts within its session; the session's own nice counts between sessions)."""
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return "unknown"


def section() -> str:
    """Both series (one broker; a tree of brokers) from their results files."""
    parts = ["## Fleet at scale (`bench/fleet_scale.py`)"]
    for name, (heading, note) in SERIES.items():
        path = RESULTS / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            rows, simulation = data["rows"], data.get("simulation", {})
            text = note.format(interval=simulation.get("telemetry_interval_s", 5.0),
                               scheduling=data.get("scheduling", "unknown"))
            parts += [heading, f"{text} Raw numbers: `{path.relative_to(ROOT)}`.",
                      markdown_table(COLUMNS, [cells(r) for r in rows])]
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="device counts, comma-separated")
    parser.add_argument("--burst", type=int, default=None,
                        help=f"telemetry points in the ingest burst (default {BURST})")
    parser.add_argument("--telemetry-interval", type=float, default=None,
                        help="seconds between a device's telemetry points (default 5; "
                             "30 with --tree)")
    parser.add_argument("--tree", action="store_true",
                        help="devices on leaf brokers bridged to the controller's broker, for "
                             "every size (without it: only sizes above --shard-size)")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE,
                        help="devices per simulator process and per leaf broker")
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
    interval = args.telemetry_interval or (30.0 if args.tree else SIM["telemetry_interval_s"])
    setup = Setup(interval, args.tree, args.shard_size)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop every child on the way out
    from rich.progress import Progress

    with tempfile.TemporaryDirectory(prefix="edgefleet-scale-") as tmp, Progress() as progress:
        kit = make_kit(Path(tmp))
        rows: list[dict[str, Any]] = []
        for n in sizes:  # written after each size: a later one that fails keeps the others
            rows.append(measure(kit, n, burst, setup, progress))
            report(rows, burst, setup, write=not args.quick)


if __name__ == "__main__":
    main()
