"""Devices cut off from the broker and the controller, and a flapping link, on a real
network path (``tests/netfault.py``: a network namespace behind a veth pair where the
machine allows it, TCP proxies the test controls elsewhere).

The devices behind the link ("far") are real agent processes (``edgefleet agent run``);
the ones in front of it ("near"), the controller and the broker run as in the other
fleet tests. The broker and the controller's HTTP server listen where the far devices
reach them (``link.service_host``). What the bundle server answered is read from its
access log (a 206 is a download resumed with Range).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.update.download import DownloadError, DownloadStats, fetch
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.mosquitto import MosquittoBroker, stop_process
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, wait_until
from tests.http_files import FileServer
from tests.models import TrainedModels
from tests.netfault import Link, open_link

pytestmark = pytest.mark.faults

TIMEOUT_S = 6  # each rollout's --device-timeout


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("network-fault-bundles")
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            "v2": make_bundle(digits_models.onnx, root / "v2.efb", signing_keys, "2.0.0")}


@pytest.fixture()
def link() -> Iterator[Link]:
    with open_link() as opened:
        yield opened


@pytest.fixture()
def mosquitto(tmp_path: Path, link: Link) -> Iterator[MosquittoBroker]:
    """Overrides conftest's: listens where the devices behind the link reach it."""
    broker = MosquittoBroker(host=link.service_host, workdir=tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@dataclass
class FarDevice:
    """``edgefleet agent run`` behind the link, with its data folder on this disk."""

    device: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log: Path

    def journal(self) -> dict[str, Any]:
        try:
            data = json.loads((self.data_dir / "models" / "digits" / "journal.json").read_text())
        except (OSError, ValueError):  # none yet, or being replaced
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def state(self) -> str:
        return str(self.journal().get("state", "IDLE"))

    def downloaded(self) -> int:
        """Bytes of the download in progress (0 when there is none)."""
        downloads = self.data_dir / "models" / "digits" / "downloads"
        return sum(p.stat().st_size for p in downloads.glob("*.part"))

    def stop(self) -> None:
        stop_process(self.process, signal.SIGTERM)


class AccessLog(logging.Handler):
    """The controller's HTTP access log (``fleet.api`` at DEBUG), line by line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def bundle_requests(self, client: str) -> list[str]:
        """The status codes of the bundle downloads ``client`` made, in order."""
        return [line.split()[-2] for line in list(self.lines)
                if line.startswith(f"{client} ") and "/bundles/" in line]


@dataclass
class Site:
    """A fleet with some devices near (in this process) and some far (behind ``link``)."""

    fleet: Fleet
    link: Link
    keys: Keys
    access: AccessLog
    far: dict[str, FarDevice] = field(default_factory=dict)
    client: FleetClient | None = None

    def start(self, near: list[str], far: list[str], bundle: Path) -> FleetClient:
        self.client = client = self.fleet.start_controller()
        for device in far:
            self.far[device] = self._spawn(device, bundle)
        for device in near:
            self.fleet.add_agent(device, bundle, traffic=False)
        everyone = [*near, *far]
        wait_until(lambda: self._all(lambda d: d["online"] and d["active"] and
                                     d["active"]["version"] == "1.0.0", everyone),
                   60, what="every device online on 1.0.0")
        client.post("/api/v1/devices/group", {"devices": everyone, "group": "site"})
        return client

    def _spawn(self, device: str, bundle: Path) -> FarDevice:
        data = self.fleet.root / "far" / device
        data.mkdir(parents=True)
        log = self.fleet.root / f"{device}.log"
        argv = [sys.executable, "-m", "edgefleet", "agent", "run", "--bundle", str(bundle),
                "--fleet", self.fleet.name, "--device-id", device,
                "--broker", self.link.broker_url(self.fleet.broker_url),
                "--trusted-key", str(self.keys.public), "--data-dir", str(data),
                "--telemetry-interval", "0.5"]
        with log.open("wb") as out:
            process = subprocess.Popen(self.link.command(argv), env={**os.environ,
                                                                    **self.link.env()},
                                       stdout=out, stderr=subprocess.STDOUT)
        return FarDevice(device, data, process, log)

    def devices(self) -> dict[str, dict[str, Any]]:
        assert self.client is not None
        return {d["id"]: d for d in self.client.get("/api/v1/devices")}

    def _all(self, check: Any, ids: list[str]) -> bool:
        known = self.devices()
        return all(i in known and check(known[i]) for i in ids)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        assert self.client is not None
        found: dict[str, Any] = self.client.get(f"/api/v1/rollouts/{rollout_id}")
        return found

    def stop(self) -> None:
        for device in self.far.values():
            device.stop()
        self.fleet.stop()


@pytest.fixture()
def site(link: Link, mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
         signing_keys: Keys) -> Iterator[Site]:
    access = AccessLog()
    api_log = logging.getLogger("edgefleet.fleet.api")
    level = api_log.level
    api_log.setLevel(logging.DEBUG)
    api_log.addHandler(access)
    fleet = Fleet(fleet_name, mosquitto.url, tmp_path, signing_keys,
                  http_host=link.service_host)
    built = Site(fleet, link, signing_keys, access)
    try:
        yield built
    finally:
        built.stop()
        api_log.removeHandler(access)
        api_log.setLevel(level)
        for device in built.far.values():  # what the far agents said, when a test failed
            sys.stdout.write(f"--- {device.device} ---\n{device.log.read_text()[-3000:]}\n")


class Watch:
    """Every state each device of a rollout goes through, polled every 50 ms."""

    def __init__(self, site: Site, rollout_id: str) -> None:
        self.seen: dict[str, list[tuple[str, str]]] = {}
        self._site, self._id = site, rollout_id
        self._stop = threading.Event()
        self._record()  # the states now, before anything the test does next moves them
        self._thread = threading.Thread(target=self._poll, daemon=True, name="watch")
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self._record()

    def _record(self) -> None:
        for device in self._site.rollout(self._id)["devices"]:
            seen = self.seen.setdefault(device["device"], [])
            now = (device["state"], device["reason"])
            if not seen or seen[-1] != now:
                seen.append(now)

    def states(self, device: str) -> list[str]:
        """Its states in order (a state seen twice in a row is one)."""
        return [state for state, _ in itertools.groupby(s for s, _ in self.seen[device])]

    def stop(self) -> None:
        """Stop polling, after one last look (the state the test just waited for)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._record()


def _states(rollout: dict[str, Any]) -> dict[str, str]:
    return {d["device"]: d["state"] for d in rollout["devices"]}


def _reasons(rollout: dict[str, Any]) -> dict[str, str]:
    return {d["device"]: d["reason"] for d in rollout["devices"]}


def _rollout_until(site: Site, rollout_id: str, done: Any, what: str,
                   timeout: float = 60.0) -> dict[str, Any]:
    """Poll the rollout until ``done(rollout)``; on a timeout, say where every device is."""
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = site.rollout(rollout_id)
        return bool(done(last))

    try:
        wait_until(check, timeout, what=what)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {last.get('state')} {last.get('reason')!r}, "
                             f"devices {_states(last)}, {_reasons(last)}") from None
    return last


def _decided(rollout: dict[str, Any]) -> bool:
    return rollout["state"] not in ("PENDING", "RUNNING")


NEAR, FAR = ["near-0", "near-1"], ["far-0", "far-1"]


def test_devices_cut_off_while_downloading_time_out_then_resume_and_commit(
        site: Site, versions: dict[str, Path]) -> None:
    client = site.start(NEAR, FAR, versions["v1"])
    client.upload("/api/v1/models", versions["v2"].read_bytes())
    site.link.rate_limit(64)  # the far downloads take several seconds
    rollout = client.post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["group:site"], "soak_s": 0.5,
        "device_timeout_s": TIMEOUT_S, "gates": {"min_success_pct": 50}})
    # both on their way (one may still wait for its first byte: the link is shared)
    wait_until(lambda: all(site.far[d].state == "DOWNLOADING" for d in FAR)
               and any(site.far[d].downloaded() > 0 for d in FAR), 30, every=0.05,
               what="the far devices to be downloading")
    site.link.cut()

    # the rollout decides without them: they time out, 2 of 4 is not below --min-success 50
    done = _rollout_until(site, rollout["id"], _decided, "the rollout to decide", 30)
    assert done["state"] == "SUCCEEDED", done["reason"]
    assert done["reason"] == "2 of 4 devices run 2.0.0"
    assert _states(done) == {**dict.fromkeys(NEAR, "SUCCEEDED"),
                             **dict.fromkeys(FAR, "TIMED_OUT")}
    assert {d: _reasons(done)[d] for d in FAR} == dict.fromkeys(
        FAR, f"no answer within {TIMEOUT_S}s (offline)")
    assert {d: site.far[d].state for d in FAR} == dict.fromkeys(FAR, "DOWNLOADING")
    assert 0 < max(site.far[d].downloaded() for d in FAR) < done["spec"]["size"]

    watch = Watch(site, rollout["id"])
    site.link.rate_limit(None)
    site.link.restore()
    # they reconnect, resume their downloads, and the succeeded rollout commits them late
    final = _rollout_until(site, rollout["id"], lambda r: set(_states(r).values()) == {
        "SUCCEEDED"}, "the far devices to be committed")
    watch.stop()
    assert final["state"] == "SUCCEEDED"
    for device in FAR:  # once it answered, never declared timed out again
        states = watch.states(device)
        assert states[0] == "TIMED_OUT" and "TIMED_OUT" not in states[1:], watch.seen[device]
        assert states[-1] == "SUCCEEDED", watch.seen[device]
    registry = wait_until(lambda: (r := site.devices()) and all(
        r[d]["online"] and r[d]["update_state"] == "COMMITTED" for d in NEAR + FAR) and r,
        30, what="the registry to show every device committed")
    assert {d: registry[d]["active"]["version"] for d in NEAR + FAR} == dict.fromkeys(
        NEAR + FAR, "2.0.0")
    assert {d: site.far[d].state for d in FAR} == dict.fromkeys(FAR, "COMMITTED")
    assert "206" in site.access.bundle_requests(site.link.device_host)  # resumed with Range


def test_devices_cut_off_in_probation_time_out_the_rollout_aborts_and_they_roll_back(
        site: Site, versions: dict[str, Path]) -> None:
    client = site.start(NEAR, FAR, versions["v1"])
    client.upload("/api/v1/models", versions["v2"].read_bytes())
    rollout = client.post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["group:site"], "soak_s": 3,
        "device_timeout_s": TIMEOUT_S})  # --min-success 100 (the default)
    watch = Watch(site, rollout["id"])
    _rollout_until(site, rollout["id"], lambda r: all(_states(r)[d] == "PROBATION" for d in FAR),
                   "the far devices in probation", 30)
    site.link.cut()

    # their soak ends, the commit goes unconfirmed, they time out: the wave misses
    # --min-success and the rollout aborts; the devices that never confirmed roll back
    done = _rollout_until(site, rollout["id"], _decided, "the rollout to decide", 30)
    assert done["state"] == "ABORTED"
    assert done["reason"] == ("wave 1 of 1: 2 of 4 devices succeeded (50.0%), below "
                              "--min-success 100%")
    assert _states(done) == {**dict.fromkeys(NEAR, "SUCCEEDED"),
                             **dict.fromkeys(FAR, "ROLLING_BACK")}
    assert {d: site.devices()[d]["online"] for d in FAR} == dict.fromkeys(FAR, False)
    # cut off, they wait in probation on the new version, the previous one ready
    assert {d: site.far[d].state for d in FAR} == dict.fromkeys(FAR, "PROBATION")

    site.link.restore()
    final = _rollout_until(site, rollout["id"], lambda r: all(
        _states(r)[d] == "ROLLED_BACK" for d in FAR), "the far devices to roll back")
    watch.stop()
    assert final["state"] == "ABORTED"
    assert _states(final) == {**dict.fromkeys(NEAR, "SUCCEEDED"),
                              **dict.fromkeys(FAR, "ROLLED_BACK")}
    for device in FAR:
        # the unconfirmed commit may be seen timing out before the abort tells it to roll
        # back (which one a poll catches depends on the machine's load): both are right
        moved = [state for state in watch.states(device) if state != "TIMED_OUT"]
        assert moved[-4:] == ["PROBATION", "COMMITTING", "ROLLING_BACK",
                              "ROLLED_BACK"], watch.seen[device]
        assert _reasons(final)[device] == "running digits 1.0.0"
    registry = wait_until(lambda: (r := site.devices()) and all(
        r[d]["online"] and r[d]["update_state"] in ("COMMITTED", "ROLLED_BACK")
        for d in NEAR + FAR) and r, 30, what="the registry to show every device settled")
    assert {d: (registry[d]["active"]["version"], registry[d]["update_state"])
            for d in NEAR + FAR} == {**dict.fromkeys(NEAR, ("2.0.0", "COMMITTED")),
                                     **dict.fromkeys(FAR, ("1.0.0", "ROLLED_BACK"))}
    assert {d: site.far[d].state for d in FAR} == dict.fromkeys(FAR, "ROLLED_BACK")


def test_a_download_over_a_link_that_flaps_five_times_resumes_and_commits(
        site: Site, versions: dict[str, Path]) -> None:
    client = site.start([], ["far-0"], versions["v1"])
    device = site.far["far-0"]
    client.upload("/api/v1/models", versions["v2"].read_bytes())
    site.link.rate_limit(32)  # 4 KB/s: the bundle takes longer than the five flaps
    rollout = client.post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["device:far-0"], "soak_s": 0.5,
        "device_timeout_s": 120})
    wait_until(lambda: device.downloaded() > 0, 30, every=0.05, what="the download to start")
    progress = []
    for _ in range(5):
        assert device.state == "DOWNLOADING"  # each flap cuts the download in progress
        progress.append(device.downloaded())
        site.link.flap(1, down_s=1.0, up_s=1.5)
    site.link.rate_limit(None)

    done = _rollout_until(site, rollout["id"], _decided, "the rollout to end", 60)
    assert done["state"] == "SUCCEEDED", done["reason"]
    assert _states(done) == {"far-0": "SUCCEEDED"}
    assert device.journal()["state"] == "COMMITTED"
    assert device.journal()["target"]["version"] == "2.0.0"
    assert progress == sorted(progress)  # the partial file only grew across the flaps
    requests = site.access.bundle_requests(site.link.device_host)
    assert requests[0] == "200" and "206" in requests[1:]  # resumed with Range, not restarted


class RetryHold:
    """A controller listener that holds the controller's MQTT ingest at the first update
    event of ``device`` into ``state`` stamped after ``after_ms`` (its clock) until
    ``until()`` holds, at most ``limit_s``: a slow ingest, so that a tick sees what the
    device reported just before that event."""

    def __init__(self, device: str, state: str, after_ms: int, until: Any,
                 limit_s: float = 10.0) -> None:
        self.device, self.state, self.after_ms = device, state, after_ms
        self.until, self.limit_s = until, limit_s
        self.held: bool | None = None  # None: not yet; True: ``until()`` held in time

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind != "event" or data["device"] != self.device or self.held is not None:
            return
        event = json.loads(data["event"])  # a reconnection first resends what was unacked
        if (event.get("kind"), event.get("state")) == ("update", self.state) and (
                event["ts"] > self.after_ms):
            try:
                wait_until(self.until, self.limit_s, every=0.02, what="the hold to end")
                self.held = True
            except TimeoutError:
                self.held = False


def test_a_device_that_gives_its_download_up_during_a_long_cut_then_retries_is_committed(
        site: Site, versions: dict[str, Path]) -> None:
    """The agent behind a long cut gives its download up (FAILED, after its retries); when
    it reconnects it reports the failure, which the controller records late (clearing its
    desired state), but it has re-received the retained install by then and retries by
    design: the rollout, finished by then, follows it again and commits it.

    The controller must see the late FAILED before the retry's first report, a race of a
    few milliseconds on the reconnect: ``RetryHold`` holds the controller's ingest at the
    retry's first event until a tick recorded the failure, so the test takes that path
    every time."""
    client = site.start(["near-0"], ["far-0"], versions["v1"])
    device = site.far["far-0"]
    client.upload("/api/v1/models", versions["v2"].read_bytes())
    site.link.rate_limit(64)
    rollout = client.post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["group:site"], "soak_s": 0.5,
        "device_timeout_s": TIMEOUT_S, "gates": {"min_success_pct": 50}})
    wait_until(lambda: device.state == "DOWNLOADING" and device.downloaded() > 0, 30,
               every=0.05, what="the far device to be downloading")
    site.link.cut()

    done = _rollout_until(site, rollout["id"], _decided, "the rollout to decide", 30)
    assert (done["state"], _states(done)) == ("SUCCEEDED", {"near-0": "SUCCEEDED",
                                                            "far-0": "TIMED_OUT"})
    # cut off for longer than its download's retries: the agent gives the update up
    wait_until(lambda: device.state == "FAILED", 90, every=0.1,  # about 25 s here
               what="the far agent to give its download up")
    assert "failed after" in device.journal()["detail"]
    assert site.devices()["far-0"]["online"] is False

    controller = site.fleet.controller
    assert controller is not None
    hold = RetryHold("far-0", "DOWNLOADING", int(device.journal()["since"]), lambda: (
        controller.rollout(rollout["id"]).devices["far-0"].state.value == "FAILED"))
    controller.listeners.append(hold)
    watch = Watch(site, rollout["id"])
    site.link.rate_limit(None)
    site.link.restore()

    final = _rollout_until(site, rollout["id"], lambda r: _states(r)["far-0"] == "SUCCEEDED",
                           "the far device to be committed", 30)
    watch.stop()
    assert hold.held is True  # the controller recorded the late FAILED before the retry
    assert final["state"] == "SUCCEEDED" and final["reason"] == "1 of 2 devices run 2.0.0"
    # on its way again, it is followed from the first state the next tick sees it in
    # (UPDATING or, when it got there that fast, PROBATION); COMMITTING may be brief
    seen = watch.seen["far-0"]
    assert [s for s in watch.states("far-0") if s not in ("UPDATING", "COMMITTING")] == [
        "TIMED_OUT", "FAILED", "PROBATION", "SUCCEEDED"], seen
    assert "the last 6 without a byte" in seen[1][1], seen  # its retries, then it gave up
    assert seen[2][1].startswith("device retried after failing: reported "), seen
    assert device.journal()["state"] == "COMMITTED"
    assert device.journal()["target"]["version"] == "2.0.0"
    registry = wait_until(lambda: (r := site.devices()) and r["far-0"]["online"] and r[
        "far-0"]["update_state"] == "COMMITTED" and r, 30, what="the registry to show it")
    assert registry["far-0"]["active"]["version"] == "2.0.0"


# --- the downloader under the same faults, on a test server (no link needed) ------------

@pytest.fixture()
def served(versions: dict[str, Path]) -> Iterator[FileServer]:
    server = FileServer(versions["v2"].parent)
    yield server
    server.stop()


def test_a_download_cut_more_often_than_its_retries_completes_while_it_progresses(
        served: FileServer, versions: dict[str, Path], tmp_path: Path) -> None:
    source = versions["v2"]
    served.faults.cut_after, served.faults.cuts = 4096, 8  # retries=5: 6 attempts in a row
    stats = DownloadStats()
    out = fetch(served.url(source.name), tmp_path / "v2.efb", source.stat().st_size,
                retries=5, backoff_s=0.01, stats=stats)
    assert out.read_bytes() == source.read_bytes()
    assert stats.attempts == 9
    assert served.faults.requests == [None, *(f"bytes={4096 * i}-" for i in range(1, 9))]


def test_a_download_that_brings_nothing_gives_up_after_its_retries(
        served: FileServer, versions: dict[str, Path], tmp_path: Path) -> None:
    source = versions["v2"]
    served.faults.cut_after, served.faults.cuts = 0, 100  # every answer is cut at once
    stats = DownloadStats()
    with pytest.raises(DownloadError, match="after 6 attempts, the last 6 without a byte"):
        fetch(served.url(source.name), tmp_path / "v2.efb", source.stat().st_size,
              retries=5, backoff_s=0.01, stats=stats)
    assert stats.attempts == 6
