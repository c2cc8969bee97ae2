"""Several controllers on one store and one broker: one leads, the others take over.

Store-level behaviour (the lease, fencing, relayed requests, telemetry shares, shared
bundles, label changes, the schema migration) runs on SQLite and on PostgreSQL, one
fresh schema a test (``tests/test_fleet_store.py``'s). The fleet tests run two
controllers on one PostgreSQL schema and a private Mosquitto with real agents; what a
device did is read from its own ``events`` topic, and what it sent from a plain (not
shared) subscription beside the controllers.
"""

from __future__ import annotations

import io
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from rich.console import Console

from edgefleet.agent.protocol.payloads import BundleRef, decode_telemetry
from edgefleet.agent.protocol.topics import Leaf, fleet_filter, parse_topic
from edgefleet.agent.runtime import load_runtime
from edgefleet.cli.fleet.top import collect, render
from edgefleet.fleet.access import Actor, TokenRole
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.control.role import LeasedRole
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.domain import ModelVersion
from edgefleet.fleet.errors import FleetError
from edgefleet.fleet.lease import Fence, LeaseLostError
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port, stop_process, wait_for_port
from edgefleet.fleet.relay import relay
from edgefleet.fleet.rollout.spec import Gates, RolloutSpec, Selector, Wave
from edgefleet.fleet.rollout.state import DeviceState, Rollout, RolloutDevice, RolloutState
from edgefleet.fleet.simulate import SimOptions, SimulatedFleet
from edgefleet.fleet.store import Store, open_store
from edgefleet.fleet.telemetry import TelemetryBook
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import TOKEN, Fleet, wait_until
from tests.models import TrainedModels, load_digits
from tests.test_fleet_restart import _serving, _updates
from tests.test_fleet_store import _device

V1 = BundleRef(name="digits", version="1.0.0", sha256="c" * 64)
V2 = BundleRef(name="digits", version="2.0.0", sha256="a" * 64)
LEASE = "rollouts"


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def stores(reopen: Callable[[], Store]) -> Callable[[], Store]:
    """Opens another connection to the test's store (one per controller)."""
    return reopen


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scale-out-bundles")
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            "v2": make_bundle(digits_models.onnx, root / "v2.efb", signing_keys, "2.0.0")}


def _rollout(state: RolloutState = RolloutState.RUNNING) -> Rollout:
    spec = RolloutSpec(model=V2, url="http://x/b.efb", size=10,
                       selectors=(Selector("group", "cams"),), waves=(Wave(100.0, True),),
                       gates=Gates())
    return Rollout(id="r1", spec=spec, state=state, created_ms=1, updated_ms=1,
                   created_by="alice", devices={"cam-0": RolloutDevice("cam-0", 0)})


# -- the lease ---------------------------------------------------------------------------

def test_the_first_controller_takes_the_lease_and_the_others_see_who_holds_it(
        stores: Callable[[], Store]) -> None:
    a, b = stores(), stores()
    first = a.acquire_lease(LEASE, "a", "na", 5_000, "http://a:8600")
    seen = b.acquire_lease(LEASE, "b", "nb", 5_000, "http://b:8600")
    assert (first.holder, first.generation, first.expired) == ("a", 1, False)
    assert (seen.holder, seen.nonce, seen.generation, seen.url) == ("a", "na", 1,
                                                                    "http://a:8600")


def test_the_holder_renews_in_the_same_generation_and_its_expiry_moves_on(
        stores: Callable[[], Store]) -> None:
    a = stores()
    first = a.acquire_lease(LEASE, "a", "na", 5_000)
    time.sleep(0.01)
    again = a.acquire_lease(LEASE, "a", "na", 5_000, wanted='[["digits","2.0.0"]]')
    assert again.generation == first.generation == 1
    assert again.expires_ms > first.expires_ms
    stored = stores().lease(LEASE)
    assert stored is not None and replace(stored, now_ms=0) == replace(again, now_ms=0)


def test_an_expired_lease_is_taken_over_with_the_next_generation(
        stores: Callable[[], Store]) -> None:
    a, b = stores(), stores()
    a.acquire_lease(LEASE, "a", "na", 200)
    assert b.acquire_lease(LEASE, "b", "nb", 200).holder == "a"  # still valid
    time.sleep(0.3)
    taken = b.acquire_lease(LEASE, "b", "nb", 5_000)
    assert (taken.holder, taken.generation) == ("b", 2)
    assert a.acquire_lease(LEASE, "a", "na", 5_000).holder == "b"  # the old holder follows


def test_a_restarted_controller_with_the_same_id_waits_for_its_old_lease(
        stores: Callable[[], Store]) -> None:
    store = stores()
    store.acquire_lease(LEASE, "a", "old-process", 5_000)
    assert store.acquire_lease(LEASE, "a", "new-process", 5_000).nonce == "old-process"


def test_a_released_lease_is_taken_at_once(stores: Callable[[], Store]) -> None:
    a, b = stores(), stores()
    a.acquire_lease(LEASE, "a", "na", 60_000)
    b.release_lease(LEASE, "nb")  # not the holder: changes nothing
    assert b.acquire_lease(LEASE, "b", "nb", 60_000).holder == "a"
    a.release_lease(LEASE, "na")
    assert b.acquire_lease(LEASE, "b", "nb", 60_000).holder == "b"


def test_a_stale_leaders_rollout_save_is_refused_and_writes_nothing(
        stores: Callable[[], Store]) -> None:
    a, b = stores(), stores()
    old = a.acquire_lease(LEASE, "a", "na", 200)
    a.save_rollout(_rollout(), fence=Fence(LEASE, "na", old.generation))
    time.sleep(0.3)
    new = b.acquire_lease(LEASE, "b", "nb", 5_000)
    paused = _rollout(RolloutState.PAUSED)
    with pytest.raises(LeaseLostError, match="stale leader.*controller b"):
        a.save_rollout(paused, fence=Fence(LEASE, "na", old.generation))
    stored = b.rollout("r1")
    assert stored is not None and stored.state == RolloutState.RUNNING
    b.save_rollout(paused, fence=Fence(LEASE, "nb", new.generation))
    assert b.rollout("r1").state == RolloutState.PAUSED  # type: ignore[union-attr]


# -- requests a follower relays to the leader -------------------------------------------

def test_a_relayed_request_is_taken_once_by_the_leader_and_answered(
        stores: Callable[[], Store]) -> None:
    leader, follower = stores(), stores()
    fence = Fence(LEASE, "na", leader.acquire_lease(LEASE, "a", "na", 60_000).generation)
    request = follower.submit_request("rollout.operate", {"rollout": "r1", "verb": "pause"},
                                      "alice", 5)
    taken = leader.take_requests(fence, "a")
    assert [(r.id, r.kind, r.body, r.actor, r.state) for r in taken] == [
        (request, "rollout.operate", {"rollout": "r1", "verb": "pause"}, "alice", "queued")]
    assert leader.take_requests(fence, "a") == []
    assert not follower.withdraw_request(request)  # taken: too late to withdraw
    leader.finish_request(request, True, {"id": "r1", "state": "PAUSED"})
    answered = follower.request(request)
    assert answered is not None
    assert (answered.state, answered.result, answered.taken_by) == (
        "done", {"id": "r1", "state": "PAUSED"}, "a")


def test_a_withdrawn_request_is_never_taken_and_a_stale_leader_takes_none(
        stores: Callable[[], Store]) -> None:
    leader, follower = stores(), stores()
    leader.acquire_lease(LEASE, "a", "na", 60_000)
    withdrawn = follower.submit_request("fleet.rollback", {"group": "cams"}, "alice", 5)
    assert follower.withdraw_request(withdrawn)
    follower.submit_request("fleet.rollback", {"group": "cams"}, "alice", 6)
    with pytest.raises(LeaseLostError):
        leader.take_requests(Fence(LEASE, "na", 7), "a")
    assert [r.id for r in leader.take_requests(Fence(LEASE, "na", 1), "a")] == [withdrawn + 1]


def test_relaying_without_a_leader_withdraws_the_request_and_says_nothing_changed(
        stores: Callable[[], Store]) -> None:
    store = stores()
    with pytest.raises(LeaseLostError, match="no controller leads.*withdrawn"):
        relay(store, "rollout.create", {"model": "digits:2.0.0"}, "alice", 5, timeout_s=0.3)
    assert store.take_requests(Fence(LEASE, "na", store.acquire_lease(
        LEASE, "a", "na", 60_000).generation), "a") == []


# -- telemetry shares, bundles, labels, schema -----------------------------------------

def test_telemetry_shares_are_read_per_stream_after_each_cursor_and_pruned(
        stores: Callable[[], Store]) -> None:
    a, b = stores(), stores()
    for seq in (1, 2, 3):
        b.share_telemetry("b-1", seq, f'{{"n":{seq}}}')
    a.share_telemetry("a-1", 1, "{}")
    assert [(s, n) for s, n, _ in a.shared_telemetry("a-1", {})] == [("b-1", 1), ("b-1", 2),
                                                                      ("b-1", 3)]
    assert a.shared_telemetry("a-1", {"b-1": 2}) == [("b-1", 3, '{"n":3}')]
    time.sleep(0.05)
    a.prune_shared(10, 86_400_000)
    assert a.shared_telemetry("nobody", {}) == []


def test_bundle_bytes_are_kept_once_by_sha256(stores: Callable[[], Store]) -> None:
    a, b = stores(), stores()
    assert a.put_bundle("f" * 64, b"\x00bundle\xff")
    assert not b.put_bundle("f" * 64, b"other bytes")
    assert b.bundle_data("f" * 64) == b"\x00bundle\xff"
    assert b.bundle_data("e" * 64) is None
    assert a.bundle_shas() == {"f" * 64}


def test_group_and_tag_changes_are_listed_by_sequence_and_reports_never_undo_them(
        stores: Callable[[], Store]) -> None:
    a, b = stores(), stores()
    a.upsert_devices([_device("cam-1"), _device("cam-2")])
    seq, changes = b.labels_since(0)
    assert (seq, changes) == (0, [])
    a.set_group(["cam-1"], "lobby")
    a.set_tags("cam-2", add=["outdoor"], remove=["v2"])
    seq, changes = b.labels_since(0)
    assert sorted(changes) == [("cam-1", "lobby", frozenset({"indoor", "v2"})),
                               ("cam-2", "cams", frozenset({"indoor", "outdoor"}))]
    assert b.labels_since(seq) == (seq, [])
    b.upsert_devices([_device("cam-1", online=False)])  # a report from a stale registry
    stored = a.device("cam-1")
    assert stored is not None and (stored.group, stored.online) == ("lobby", False)


def test_a_version_1_store_is_migrated_to_version_2(store_url: str) -> None:
    store = open_store(store_url)
    store.upsert_devices([_device("cam-1")])
    store.close()
    _as_version_1(store_url)
    store = open_store(store_url)
    try:
        store.set_group(["cam-1"], "lobby")
        assert store.labels_since(0)[1] == [("cam-1", "lobby", frozenset({"indoor", "v2"}))]
        assert store.acquire_lease(LEASE, "a", "na", 1_000).generation == 1
    finally:
        store.close()


def _as_version_1(url: str) -> None:
    """What a store written by edgefleet with schema 1 looked like."""
    statements = ["DROP INDEX devices_labels", "ALTER TABLE devices DROP COLUMN labels_seq",
                  "UPDATE meta SET value = 1 WHERE key = 'schema_version'",
                  "DELETE FROM meta WHERE key = 'labels_seq'",
                  *(f"DROP TABLE {t}" for t in ("leases", "requests", "telemetry_shares",
                                                "bundles"))]
    if url.startswith("sqlite://"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as conn:
            for statement in statements:
                conn.execute(statement)
    else:
        with psycopg.connect(url) as conn:
            for statement in statements:
                conn.execute(statement)


# -- telemetry merged at the leader ------------------------------------------------------

def _point(device: str, ts: int, inferences: int, top1: float | None = None) -> dict[str, Any]:
    stats: dict[str, Any] = {"inferences": inferences, "errors": 1, "latency_p95_ms": 2.0}
    if top1 is not None:
        stats["agreement"] = {"top1": top1, "samples": 10}
    return {"model": "digits", "model_version": "2.0.0", "versions": {"2.0.0": stats}}


def test_the_leaders_quality_sums_every_controllers_share_once_in_time_order() -> None:
    leader, follower, single = (TelemetryBook(journal=True), TelemetryBook(journal=True),
                                TelemetryBook())
    key = ("digits", "2.0.0")
    for ts in range(1_000, 11_000, 1_000):  # one device's points alternate between the two
        book = leader if ts % 2000 else follower
        for target in (book, single):
            target.add("cam-0", ts, _point("cam-0", ts, ts // 100, top1=ts / 20_000))
    assert follower.take_share([("other", "1.0")]) == {"w": [], "a": []}  # not wanted
    follower.add("cam-0", 11_000, _point("cam-0", 11_000, 7))
    single.add("cam-0", 11_000, _point("cam-0", 11_000, 7))
    share = follower.take_share([key], new=[key])  # newly wanted: everything it kept
    assert len(share["w"]) == 6
    assert leader.merge(share) == 6
    assert leader.merge(share) == 0  # read twice: merged once
    assert leader.quality(["cam-0"], key, 0) == single.quality(["cam-0"], key, 0)
    assert leader.quality(["cam-0"], key, 5_500) == single.quality(["cam-0"], key, 5_500)
    assert follower.take_share([key]) == {"w": [], "a": []}  # the journal was emptied


# -- config ------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"controller_id": "a", "lease_s": 2.0}, "shorter than 3 ticks"),
    ({"lease_s": 5.0}, "need an id each"),
    ({"controller_id": "a", "shared_telemetry": "edgefleet"}, "they need a leader"),
    ({"controller_id": "a", "lease_s": 5.0, "shared_telemetry": "a/b"}, "not a shared"),
])
def test_scale_out_settings_that_cannot_work_are_refused_with_the_fix(
        options: dict[str, Any], message: str, tmp_path: Path, signing_keys: Keys) -> None:
    with pytest.raises(FleetError, match=message):
        ControllerConfig(fleet="f", broker_url="mqtt://127.0.0.1:1", data_dir=tmp_path,
                         public_url="http://x", trusted=signing_keys.trusted, tick_s=1.0,
                         **options)


# -- controllers without a broker: a paused leader ---------------------------------------

def _config(root: Path, keys: Keys, controller_id: str, lease_s: float = 0.6,
            **extra: Any) -> ControllerConfig:
    return ControllerConfig(fleet="plant", broker_url="mqtt://127.0.0.1:1",
                            data_dir=root / controller_id, public_url=f"http://{controller_id}",
                            trusted=keys.trusted, tick_s=0.2, controller_id=controller_id,
                            lease_s=lease_s, **extra)


def _seed(store: Store) -> None:
    """One online device on 1.0.0 and a pushed 2.0.0 (its file is not needed here)."""
    store.upsert_devices([_device("cam-0", active=V1)])
    store.add_model(ModelVersion(name="digits", version="2.0.0", sha256=V2.sha256, size=10,
                                 format="onnx", runtime="onnxruntime",
                                 min_runtime_version="1.0", manifest={}, path="/nowhere",
                                 pushed_ms=1, pushed_by="ci"))


def test_a_paused_leader_stops_acting_and_its_late_writes_are_refused(
        stores: Callable[[], Store], tmp_path: Path, signing_keys: Keys) -> None:
    _seed(stores())
    a = FleetController(_config(tmp_path, signing_keys, "a"), stores())
    b = FleetController(_config(tmp_path, signing_keys, "b"), stores())
    a.step()
    b.step()
    assert (a.controller_status()["role"], b.controller_status()["role"]) == (
        "leader", "follower")
    created = a.create_rollout("digits:2.0.0", {"selectors": ["device:cam-0"]}, "alice")
    assert created.devices["cam-0"].state == DeviceState.TARGETED

    frozen = time.monotonic()  # a pauses: its own clock stops, its lease lapses
    assert isinstance(a.role, LeasedRole)
    a.role.scale.leadership._monotonic = lambda: frozen
    time.sleep(0.7)
    b.step()
    assert b.controller_status()["role"] == "leader"
    assert b.rollout(created.id).devices["cam-0"].state == DeviceState.TARGETED
    assert list(b.outbox) == ["cam-0"]  # told again, as after a restart

    with pytest.raises(LeaseLostError, match="stale leader"):  # a still thinks it leads
        a.operate(created.id, "pause", "alice")
    assert b.store.rollout(created.id).state == RolloutState.RUNNING  # type: ignore[union-attr]
    a.role.scale.leadership._monotonic = time.monotonic
    a.step()
    assert a.controller_status()["role"] == "follower"
    assert (a.runner.live, a.outbox.waiting) == ({}, {})


def test_a_followers_rollout_action_is_done_by_the_leader_under_the_operators_name(
        stores: Callable[[], Store], tmp_path: Path, signing_keys: Keys) -> None:
    stores().save_rollout(_rollout())
    leader = FleetController(_config(tmp_path, signing_keys, "a", lease_s=5), stores())
    follower = FleetController(_config(tmp_path, signing_keys, "b", lease_s=5), stores())
    leader.step()  # elected: it follows r1 from the store
    follower.step()
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(
        follower.operate("r1", "pause", Actor("bob", TokenRole.OPERATOR))))
    worker.start()

    def lead() -> bool:
        leader.step()
        return bool(done)

    wait_until(lead, 10, what="the relayed pause")
    worker.join()
    assert done[0].state == RolloutState.PAUSED
    assert leader.store.rollout("r1").state == RolloutState.PAUSED  # type: ignore[union-attr]
    assert [(e.actor, e.action) for e in follower.history(target="r1")] == [
        ("bob", "rollout.progress"), ("bob", "rollout.pause")]
    paused = follower.history(target="r1")[1]
    assert paused.detail["role"] == "operator"  # the token's role travelled to the leader


# -- two controllers, one broker, real agents --------------------------------------------

@dataclass
class Member:
    """A controller with its API server in this process."""

    controller: FleetController
    api: ApiServer
    store: Store

    @property
    def client(self) -> FleetClient:
        return FleetClient(self.api.url, TOKEN)

    @property
    def role(self) -> str:
        return str(self.controller.controller_status()["role"])

    def stop(self) -> None:
        self.api.stop()
        self.controller.stop()
        self.store.close()


def _member(cid: str, db: str, broker: MosquittoBroker, fleet: str, root: Path, keys: Keys,
            lease_s: float, window_ms: int = 600_000) -> Member:
    port = free_port()
    config = ControllerConfig(fleet=fleet, broker_url=broker.url, data_dir=root / cid,
                              public_url=f"http://127.0.0.1:{port}", trusted=keys.trusted,
                              tick_s=0.2, quality_window_ms=window_ms, controller_id=cid,
                              lease_s=lease_s, shared_telemetry="edgefleet")
    store = open_store(db)
    controller = FleetController(config, store)
    api = ApiServer(controller, {TOKEN: "alice"}, port=port)
    controller.start()
    api.start()
    assert controller.mqtt is not None and controller.mqtt.wait_subscribed(10)
    return Member(controller, api, store)


@pytest.fixture
def members(postgres_url: str) -> Iterator[list[Member]]:
    """Controllers the test starts; stopped before their schema is dropped."""
    started: list[Member] = []
    yield started
    for member in started:
        member.stop()


@pytest.fixture
def devices(mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
            signing_keys: Keys) -> Iterator[Fleet]:
    """Real agents only (the controllers are the test's)."""
    harness = Fleet(fleet_name, mosquitto.url, tmp_path / "fleet", signing_keys)
    harness.telemetry_interval_s = 0.5
    yield harness
    harness.stop()


def _on_v1(client: FleetClient, devices: Fleet, v1: Path, ids: list[str],
           traffic: bool) -> None:
    for device in ids:
        devices.add_agent(device, v1, traffic=traffic)

    def registered() -> bool:
        known = {d["id"]: d for d in client.get("/api/v1/devices")}
        return all(i in known and known[i]["active"] and known[i]["active"]["version"]
                   == "1.0.0" for i in ids)

    wait_until(registered, 30, what="devices registered on v1")


def _sent(telemetry: Subscriber, version: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """Points the devices published, and each device's (inferences, errors) of ``version``."""
    points, sums = 0, dict[str, tuple[int, int]]()
    for message in telemetry.on(Leaf.TELEMETRY.value):
        device = parse_topic(message.topic).device
        for point in decode_telemetry(message.payload):
            points += 1
            stats = (point.values.get("versions") or {}).get(version) or {}
            inferences, errors = sums.get(device, (0, 0))
            sums[device] = (inferences + int(stats.get("inferences") or 0),
                            errors + int(stats.get("errors") or 0))
    return points, sums


def test_two_controllers_split_telemetry_and_the_leader_gates_on_all_of_it(
        members: list[Member], devices: Fleet, versions: dict[str, Path],
        mosquitto: MosquittoBroker, postgres_url: str, signing_keys: Keys,
        tmp_path: Path) -> None:
    ids = [f"cam-{i}" for i in range(4)]
    telemetry = Subscriber(mosquitto.url, [fleet_filter(devices.name, Leaf.TELEMETRY)])
    try:
        for cid in ("a", "b"):
            members.append(_member(cid, postgres_url, mosquitto, devices.name, tmp_path,
                                   signing_keys, lease_s=1.5))
        leader, follower = members
        _on_v1(follower.client, devices, versions["v1"], ids, traffic=True)
        assert (leader.role, follower.role) == ("leader", "follower")
        health = follower.client.get("/healthz")
        assert health["controller"]["leader"] == "a" and health["devices"] == 4
        screen = Console(file=io.StringIO(), width=200)
        screen.print(render(collect(follower.client)))  # edgefleet fleet top
        assert "controller b (follower, leader a)" in screen.file.getvalue()  # type: ignore[attr-defined]

        follower.client.post("/api/v1/devices/group", {"devices": ids, "group": "cams"})
        wait_until(lambda: {d.group for d in leader.controller.devices()} == {"cams"}, 10,
                   what="the leader to see the group set on the follower")
        follower.client.upload("/api/v1/models", versions["v2"].read_bytes())
        rollout = follower.client.post("/api/v1/rollouts", {
            "model": "digits:2.0.0", "selectors": ["group:cams"], "waves": ["100%"],
            "soak_s": 8, "device_timeout_s": 60,
            "gates": {"max_error_rate_pct": 90.0, "min_samples": 1}})
        assert rollout["state"] == "RUNNING" and rollout["created_by"] == "alice"

        def states() -> set[str]:
            got = follower.client.get(f"/api/v1/rollouts/{rollout['id']}")
            return {d["state"] for d in got["devices"]}

        wait_until(lambda: states() == {"PROBATION"}, 30, what="every device in probation")
        devices.stop_traffic()  # from now on the windows count no inference
        key = ("digits", "2.0.0")

        def merged_is_everything() -> bool:
            _, sent = _sent(telemetry, "2.0.0")
            seen = {i: leader.controller.telemetry.quality([i], key, 0) for i in ids}
            return all(sent.get(i, (0, 0)) == (q.inferences, q.errors) and q.inferences
                       for i, q in seen.items())

        wait_until(merged_is_everything, 15, what="the leader's quality to hold every "
                                                  "device's v2 telemetry")
        assert leader.controller.telemetry.merged > 0  # part of it came from the follower
        done = wait_until(lambda: (r := follower.client.get(
            f"/api/v1/rollouts/{rollout['id']}"))["state"] != "RUNNING" and r, 30,
            what="the rollout to end")
        assert done["state"] == "SUCCEEDED", done["reason"]

        for service in devices.agents.values():
            service.stop()

        def ingested_once() -> bool:
            ingested = (leader.controller.telemetry.points
                        + follower.controller.telemetry.points)
            return ingested == _sent(telemetry, "2.0.0")[0]

        wait_until(ingested_once, 10, what="every published point ingested once")
        assert leader.controller.telemetry.points > 0
        assert follower.controller.telemetry.points > 0
        assert (leader.role, follower.role) == ("leader", "follower")
    finally:
        telemetry.close()


@dataclass
class ServeProcess:
    """``edgefleet fleet serve`` as a child process, killed like a crash."""

    cid: str
    db: str
    broker_url: str
    fleet: str
    root: Path
    keys: Keys
    lease_s: float
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> FleetClient:
        argv = [sys.executable, "-m", "edgefleet", "fleet", "serve", "--fleet", self.fleet,
                "--broker", self.broker_url, "--db", self.db,
                "--data-dir", str(self.root / self.cid), "--http", f"127.0.0.1:{self.port}",
                "--trusted-key", str(self.keys.public), "--token", f"alice={TOKEN}",
                "--tick", "0.2", "--controller-id", self.cid, "--lease-s", str(self.lease_s),
                "--shared-telemetry", "--verbose"]
        log = self.root / f"{self.cid}.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        if not wait_for_port("127.0.0.1", self.port, 30):
            self.kill()
            raise AssertionError(f"controller {self.cid} did not listen:\n{log.read_text()}")
        return FleetClient(f"http://127.0.0.1:{self.port}", TOKEN)

    def kill(self) -> None:
        process, self.process = self.process, None
        stop_process(process, signal.SIGKILL)


def test_the_leader_judges_drift_on_every_controllers_share_and_all_show_its_alerts(
        members: list[Member], mosquitto: MosquittoBroker, fleet_name: str,
        postgres_url: str, digits_models: TrainedModels, signing_keys: Keys,
        tmp_path: Path) -> None:
    """With shared telemetry each controller is handed part of every device's drift
    windows; the follower passes its part on, the leader pools them per device and raises
    each alert once, and both controllers list the same alerts."""
    x = load_digits().x_test
    name = load_runtime(digits_models.tflite.read_bytes(), "tflite").inputs[0].name
    bundle = make_bundle(digits_models.tflite, tmp_path / "ref.efb", signing_keys,
                         reference_inputs={name: x[:300]}, reference_source="eval")
    for cid in ("a", "b"):
        members.append(_member(cid, postgres_url, mosquitto, fleet_name, tmp_path,
                               signing_keys, lease_s=1.5))
    leader, follower = members
    follower.client.upload("/api/v1/models", bundle.read_bytes())
    options = SimOptions(telemetry_interval_s=0.2, request_rate=400, drifting=0.25,
                         connect_rate=1000)
    with SimulatedFleet(mosquitto.url, fleet_name, 8, signing_keys.trusted, options,
                        bundle) as sim:
        drifting = {d for d, view in sim.devices.items() if "drifting" in view.faults}
        assert len(drifting) == 2

        def listed(member: Member) -> set[str]:
            return {a["device"] for a in member.client.get("/api/v1/alerts")["alerts"]}

        wait_until(lambda: listed(leader) == listed(follower) == drifting, 60,
                   what="the drifting devices' alerts on both controllers")
        judged = leader.controller.drift.windows
        wait_until(lambda: leader.controller.drift.windows >= judged + 100, 60,
                   what="more windows judged")
    assert follower.controller.drift.offered > 0  # the broker handed the follower a part
    assert leader.controller.drift.windows > leader.controller.drift.offered  # and it came
    summary = follower.client.get("/api/v1/alerts")["summary"]
    assert {row["model"] for row in summary} == {"digits:1.0.0"}
    assert sum(row["devices"] for row in summary) >= 8  # the leader's view of all devices
    raised = [(e["target"], e["detail"]["feature"]) for e in
              follower.client.get("/api/v1/history?limit=1000") if e["action"] == "drift.raised"]
    assert raised and len(raised) == len(set(raised))  # each (device, feature) said once
    assert {device for device, _ in raised} == drifting


def test_the_leader_killed_mid_rollout_is_replaced_and_no_device_is_updated_twice(
        members: list[Member], devices: Fleet, versions: dict[str, Path],
        mosquitto: MosquittoBroker, postgres_url: str, signing_keys: Keys,
        tmp_path: Path) -> None:
    ids = [f"cam-{i}" for i in range(4)]
    lease_s = 2.0
    first = ServeProcess("a", postgres_url, mosquitto.url, devices.name, tmp_path,
                         signing_keys, lease_s)
    events = Subscriber(mosquitto.url, [fleet_filter(devices.name, Leaf.EVENTS)])
    try:
        leader_client = first.start()
        wait_until(lambda: leader_client.get("/healthz")["controller"]["role"] == "leader",
                   10, what="a to lead")
        members.append(_member("b", postgres_url, mosquitto, devices.name, tmp_path,
                               signing_keys, lease_s))
        follower = members[0]
        assert follower.role == "follower"
        _on_v1(follower.client, devices, versions["v1"], ids, traffic=False)
        follower.client.post("/api/v1/devices/group", {"devices": ids, "group": "cams"})
        follower.client.upload("/api/v1/models", versions["v2"].read_bytes())  # b has it
        rollout = follower.client.post("/api/v1/rollouts", {
            "model": "digits:2.0.0", "selectors": ["group:cams"], "waves": ["1", "100%"],
            "rate_per_min": 20, "soak_s": 0.5, "device_timeout_s": 60})

        def between_sends() -> bool:
            """Canary done, the second wave's first device past its download, 3 s until
            the next one is sent."""
            got = follower.client.get(f"/api/v1/rollouts/{rollout['id']}")["devices"]
            touched = [d["state"] for d in got if d["state"] != "PENDING"]
            return len(touched) == 2 and all(s in ("PROBATION", "COMMITTING", "SUCCEEDED")
                                             for s in touched)

        wait_until(between_sends, 30, every=0.05, what="the second wave to start")
        first.kill()
        killed = time.monotonic()
        stored = follower.store.rollout(rollout["id"])
        assert stored is not None and stored.state == RolloutState.RUNNING
        assert sum(d.state != DeviceState.PENDING for d in stored.devices.values()) == 2

        wait_until(lambda: follower.role == "leader", lease_s + 5,
                   what=f"b to take the lease (bound: lease {lease_s:g} s + a tick)")
        took_s = time.monotonic() - killed
        status = follower.controller.controller_status()
        assert (status["leader"], status["generation"]) == ("b", 2), status
        done = wait_until(lambda: (r := follower.client.get(
            f"/api/v1/rollouts/{rollout['id']}"))["state"] != "RUNNING" and r, 60,
            what="the rollout to end on b")
        assert done["state"] == "SUCCEEDED", done["reason"]
        assert {d["state"] for d in done["devices"]} == {"SUCCEEDED"}
        elected = follower.client.get("/api/v1/history?target=b")
        assert [e["action"] for e in elected] == ["controller.elected"], took_s

        assert events.wait_for(lambda _: all(
            _updates(events, "2.0.0").get(i, [])[-1:] == ["COMMITTED"] for i in ids), 10)
        updates = _updates(events, "2.0.0")
        assert {i: Counter(updates[i])["DOWNLOADING"] for i in ids} == dict.fromkeys(ids, 1)
        assert {i: _serving(devices, i) for i in ids} == dict.fromkeys(ids, "2.0.0")
    finally:
        first.kill()
        events.close()
