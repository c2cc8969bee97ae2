"""The fleet store keeps devices, models, rollouts and history, alike on SQLite and PostgreSQL.

Every behaviour runs on both backends. PostgreSQL is the real server at
``EDGEFLEET_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/test``), one
fresh schema a test; when it cannot be reached the tests fail, they are never skipped.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.fleet.domain import AuditEntry, Device, ModelVersion
from edgefleet.fleet.errors import ConflictError, NotFoundError, StoreError
from edgefleet.fleet.rollout.spec import Gates, RolloutSpec, Selector, Wave
from edgefleet.fleet.rollout.state import DeviceState, Rollout, RolloutDevice, RolloutState
from edgefleet.fleet.store import Store, open_store
from tests.postgres import admin_connection

OLD = BundleRef(name="digits", version="0.9.0", sha256="b" * 64)
NEW = BundleRef(name="digits", version="1.0.0", sha256="a" * 64)

Opener = Callable[[], Store]


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def store(reopen: Opener) -> Store:
    return reopen()


def _terminate_backends(application: str) -> None:
    """Kill the server side of every connection named ``application``, and wait until gone."""
    with admin_connection() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = %s", (application,))
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                            (application,)).fetchone() != (0,):
            assert time.monotonic() < deadline, "PostgreSQL did not end the connection"
            time.sleep(0.01)


def _raw_execute(url: str, statement: str) -> None:
    """Run one statement beside the store, as an operator with a SQL shell would."""
    if url.startswith("sqlite://"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as conn:
            conn.execute(statement)
    else:
        with psycopg.connect(url) as conn:
            conn.execute(statement)


# -- test objects ------------------------------------------------------------------------

def _device(device_id: str = "cam-1", **changes: object) -> Device:
    device = Device(id=device_id, fleet="plant-a", online=True, group="cams",
                    tags=frozenset({"indoor", "v2"}), profile="rpi4",
                    runtimes={"onnxruntime": "1.18.0", "litert": "2.3.0"},
                    agent_version="0.1.0", active=NEW, previous=OLD, update_state="IDLE",
                    update_target=NEW.sha256, update_detail="ok", first_seen_ms=1_000,
                    last_seen_ms=2_000)
    return device.with_changes(**changes)


def _model(version: str = "1.0.0", sha256: str = "a" * 64, pushed_ms: int = 5_000,
           name: str = "digits") -> ModelVersion:
    return ModelVersion(name=name, version=version, sha256=sha256, size=1234, format="tflite",
                        runtime="litert", min_runtime_version="2.3.0",
                        manifest={"name": name, "metrics": {"accuracy": 0.97}, "files": []},
                        path=f"/var/lib/edgefleet/bundles/{sha256}.efb", pushed_ms=pushed_ms,
                        pushed_by="ci")


def _spec() -> RolloutSpec:
    return RolloutSpec(model=NEW, url="http://x/b.efb", size=10,
                       selectors=(Selector("group", "cams"), Selector("tag", "v2")),
                       waves=(Wave(1, False), Wave(10.0, True), Wave(50.0, True)),
                       rate_per_min=30.0, exponential=2.0, device_timeout_s=120.0, soak_s=60.0,
                       gates=Gates(max_failures_pct=5.0, min_success_pct=90.0,
                                   max_p95_ratio=1.5, max_error_rate_pct=1.0,
                                   min_agreement_pct=95.0, min_samples=50))


def _rollout(rollout_id: str = "r1", devices: int = 3, created_ms: int = 10_000,
             state: RolloutState = RolloutState.RUNNING) -> Rollout:
    items = {f"cam-{i}": RolloutDevice(f"cam-{i}", wave=i % 2, previous=OLD, sent_ms=7 + i,
                                          targeted_ms=3 + i)
             for i in range(devices)}
    return Rollout(id=rollout_id, spec=_spec(), state=state, wave=1, wave_started_ms=9_000,
                   started_in_wave=2, reason="", created_ms=created_ms,
                   updated_ms=created_ms + 1, created_by="alice", devices=items)


def _audit(ts_ms: int, target: str = "digits:1.0.0") -> AuditEntry:
    return AuditEntry(ts_ms=ts_ms, actor="alice", action="push", target=target,
                      detail={"sha256": "a" * 64, "size": 1234})


# -- devices -----------------------------------------------------------------------------

def test_device_round_trips_with_tags_refs_and_runtimes(store: Store) -> None:
    device = _device()
    store.upsert_devices([device])
    assert store.device("cam-1") == device


def test_device_without_refs_or_group_round_trips(store: Store) -> None:
    device = Device(id="bare", fleet="plant-a")
    store.upsert_devices([device])
    assert store.device("bare") == device


def test_unknown_device_is_none(store: Store) -> None:
    assert store.device("nope") is None


def test_upsert_replaces_a_known_device(store: Store) -> None:
    store.upsert_devices([_device()])
    store.upsert_devices([_device(online=False, last_seen_ms=9_999, active=None)])
    assert store.device("cam-1") == _device(online=False, last_seen_ms=9_999, active=None)


def test_devices_are_ordered_by_id_code_point_on_every_backend(store: Store) -> None:
    ids = ["b", "B", "a_1", "a-1", "a", "A", "cam-10", "cam-9"]
    store.upsert_devices([_device(i) for i in ids])
    assert [d.id for d in store.devices()] == sorted(ids)


def test_a_device_round_trips_through_its_dict() -> None:
    for device in (_device(), Device(id="bare", fleet="f", update_since_ms=5)):
        assert Device.from_dict(device.as_dict()) == device


def test_ten_thousand_devices_are_upserted_and_read_back(store: Store) -> None:
    devices = [_device(f"dev-{i:05d}", last_seen_ms=i) for i in range(10_000)]
    store.upsert_devices(devices)
    assert store.devices() == devices


def test_set_group_moves_the_named_devices_only(store: Store) -> None:
    store.upsert_devices([_device("a"), _device("b"), _device("c")])
    store.set_group(["a", "c"], "lobby")
    assert [d.group for d in store.devices()] == ["lobby", "cams", "lobby"]


def test_set_group_to_none_clears_the_group(store: Store) -> None:
    store.upsert_devices([_device("a")])
    store.set_group(["a"], None)
    assert store.device("a") == _device("a", group=None)


def test_set_group_with_an_unknown_id_names_it_and_changes_nothing(store: Store) -> None:
    store.upsert_devices([_device("a")])
    with pytest.raises(NotFoundError, match="'ghost'"):
        store.set_group(["a", "ghost"], "lobby")
    assert store.device("a") == _device("a")


def test_set_tags_adds_and_removes_and_returns_the_device(store: Store) -> None:
    store.upsert_devices([_device()])
    updated = store.set_tags("cam-1", add=["outdoor", "v3"], remove=["v2"])
    assert updated.tags == {"indoor", "outdoor", "v3"}
    assert store.device("cam-1") == updated == _device(tags=updated.tags)


def test_set_tags_on_an_unknown_device_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError, match="'ghost'"):
        store.set_tags("ghost", add=["x"])


def test_deleting_devices_removes_their_rows_group_and_tags_and_names_those_there(
        store: Store) -> None:
    store.upsert_devices([_device("a"), _device("b"), _device("c")])
    assert store.delete_devices(["c", "ghost", "a", "a"]) == ["a", "c"]
    assert [d.id for d in store.devices()] == ["b"]
    assert store.device("a") is None
    assert store.delete_devices([]) == []
    store.upsert_devices([_device("a", group=None, tags=frozenset())])  # it comes back: new
    assert store.device("a") == _device("a", group=None, tags=frozenset())


def test_deleting_a_device_keeps_the_rollouts_that_touched_it(store: Store) -> None:
    store.upsert_devices([_device("cam-0"), _device("cam-1")])
    store.save_rollout(_rollout(devices=2))
    store.delete_devices(["cam-0"])
    kept = store.rollout("r1")
    assert kept is not None and set(kept.devices) == {"cam-0", "cam-1"}


def test_deleting_more_devices_than_one_in_list_holds(store: Store) -> None:
    store.upsert_devices([_device(f"d{i:04d}") for i in range(1200)])
    removed = store.delete_devices([f"d{i:04d}" for i in range(0, 1200, 2)])
    assert len(removed) == 600 and len(store.devices()) == 600


# -- model versions ----------------------------------------------------------------------

def test_model_round_trips_by_name_version_and_sha(store: Store) -> None:
    model = _model()
    assert store.add_model(model) is True
    assert store.model("digits", "1.0.0") == model
    assert store.model_by_sha("a" * 64) == model
    assert store.model("digits", "2.0.0") is None
    assert store.model_by_sha("f" * 64) is None


def test_pushing_the_same_bundle_again_is_idempotent(store: Store) -> None:
    store.add_model(_model())
    assert store.add_model(_model(pushed_ms=9_999)) is False
    assert store.models() == [_model()]


def test_pushing_other_bytes_under_a_stored_version_conflicts(store: Store) -> None:
    store.add_model(_model(sha256="a" * 64))
    with pytest.raises(ConflictError, match="aaaaaaaaaaaa.*cccccccccccc") as info:
        store.add_model(_model(sha256="c" * 64))
    assert "bump the version" in info.value.hint
    assert store.model("digits", "1.0.0") == _model(sha256="a" * 64)


def test_models_are_filtered_by_name_and_ordered_by_name_then_push_time(store: Store) -> None:
    late, early = _model("1.1.0", "1" * 64, pushed_ms=7_000), _model("2.0.0", "2" * 64, 6_000)
    other = _model("1.0.0", "3" * 64, pushed_ms=1_000, name="anomaly")
    for model in (late, early, other):
        store.add_model(model)
    assert store.models() == [other, early, late]
    assert store.models("digits") == [early, late]


# -- rollouts ----------------------------------------------------------------------------

def test_rollout_round_trips_with_devices_spec_gates_and_waves(store: Store) -> None:
    rollout = _rollout()
    store.save_rollout(rollout)
    assert store.rollout("r1") == rollout
    assert store.rollout("r2") is None


def test_save_rollout_with_changed_writes_only_those_rows(store: Store) -> None:
    rollout = _rollout()
    store.save_rollout(rollout)
    moved = {i: rollout.devices[i].moved(DeviceState.TARGETED, 11_000) for i in ("cam-0",
                                                                               "cam-1")}
    store.save_rollout(replace(rollout, devices={**rollout.devices, **moved}),
                       changed=["cam-0"])
    stored = store.rollout("r1")
    assert stored is not None
    assert stored.devices["cam-0"].state is DeviceState.TARGETED
    assert stored.devices["cam-1"] == rollout.devices["cam-1"]


def test_save_rollout_always_updates_the_header(store: Store) -> None:
    store.save_rollout(_rollout())
    store.save_rollout(replace(_rollout(), state=RolloutState.PAUSED, reason="ops"), changed=[])
    stored = store.rollout("r1")
    assert stored is not None
    assert (stored.state, stored.reason) == (RolloutState.PAUSED, "ops")


def test_save_rollout_with_an_unknown_changed_id_saves_nothing(store: Store) -> None:
    with pytest.raises(NotFoundError, match="'ghost'"):
        store.save_rollout(_rollout(), changed=["cam-0", "ghost"])
    assert store.rollout("r1") is None


def test_rollouts_are_newest_first_and_filtered_by_state(store: Store) -> None:
    old = _rollout("r1", created_ms=1_000, state=RolloutState.SUCCEEDED)
    mid = _rollout("r2", created_ms=2_000, state=RolloutState.RUNNING)
    new = _rollout("r3", created_ms=3_000, state=RolloutState.PAUSED)
    for rollout in (mid, new, old):
        store.save_rollout(rollout)
    assert store.rollouts() == [new, mid, old]
    assert store.rollouts([RolloutState.RUNNING, RolloutState.SUCCEEDED]) == [mid, old]
    assert store.rollouts([RolloutState.ABORTED]) == []
    assert store.rollouts([]) == []


def test_rollouts_created_in_the_same_millisecond_list_the_later_save_first(
        store: Store) -> None:
    store.save_rollout(_rollout("r9", created_ms=5_000))
    store.save_rollout(_rollout("r10", created_ms=5_000))
    store.save_rollout(_rollout("r9", created_ms=5_000))  # re-saving keeps its place
    assert [r.id for r in store.rollouts()] == ["r10", "r9"]


def test_ten_thousand_rollout_rows_are_saved_and_read_back(store: Store) -> None:
    rollout = _rollout(devices=10_000)
    store.save_rollout(rollout)
    assert store.rollout("r1") == rollout


def test_new_rollout_ids_keep_increasing_across_close_and_reopen(reopen: Opener) -> None:
    first = reopen()
    ids = [first.new_rollout_id(), first.new_rollout_id()]
    first.close()
    ids.append(reopen().new_rollout_id())
    assert ids == ["r1", "r2", "r3"]


# -- audit history -----------------------------------------------------------------------

def test_audit_entry_round_trips_with_its_new_id(store: Store) -> None:
    saved = store.add_audit(_audit(1_000))
    assert saved.id is not None
    assert saved == replace(_audit(1_000), id=saved.id)
    assert store.history() == [saved]


def test_history_is_newest_first_and_limited(store: Store) -> None:
    saved = [store.add_audit(_audit(ts)) for ts in (1_000, 2_000, 3_000)]
    assert store.history() == saved[::-1]
    assert store.history(limit=2) == saved[:0:-1]


def test_settings_are_json_values_by_key_listed_by_prefix_and_deleted_by_none(
        reopen: Opener) -> None:
    store = reopen()
    store.put_setting("drift:digits", {"psi": 0.3, "min_samples": 50, "clear_after": 2}, 1)
    store.put_setting("drift:faces", {"psi": 0.1, "min_samples": 9, "clear_after": 1}, 1)
    store.put_setting("keyring", "signed bytes", 1)
    store.put_setting("drift:digits", {"psi": 0.25, "min_samples": 50, "clear_after": 2}, 2)
    other = reopen()  # another controller sees the same
    assert other.settings("drift:") == {
        "drift:digits": {"psi": 0.25, "min_samples": 50, "clear_after": 2},
        "drift:faces": {"psi": 0.1, "min_samples": 9, "clear_after": 1}}
    assert other.settings("keyring") == {"keyring": "signed bytes"}
    store.put_setting("drift:faces", None, 3)
    assert list(other.settings("drift:")) == ["drift:digits"]
    assert other.settings("nothing") == {}


def test_history_target_filter_matches_exactly(store: Store) -> None:
    kept = store.add_audit(_audit(1_000, target="digits:1.0.0"))
    store.add_audit(_audit(2_000, target="digits:1.0.0-rc"))
    store.add_audit(_audit(3_000, target="digits"))
    assert store.history(target="digits:1.0.0") == [kept]


# -- lifetime, URLs and failures ---------------------------------------------------------

def test_data_survives_close_and_reopen(reopen: Opener) -> None:
    first = reopen()
    first.upsert_devices([_device()])
    first.add_model(_model())
    first.save_rollout(_rollout())
    entry = first.add_audit(_audit(1_000))
    first.close()
    again = reopen()
    assert again.devices() == [_device()]
    assert again.models() == [_model()]
    assert again.rollouts() == [_rollout()]
    assert again.history() == [entry]


def test_a_store_from_a_newer_edgefleet_is_refused(reopen: Opener, store_url: str) -> None:
    reopen().close()
    _raw_execute(store_url, "UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        reopen()


def test_a_closed_store_raises_store_error(store: Store) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.devices()


def test_a_failed_method_leaves_the_store_usable(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.set_tags("ghost", add=["x"])
    store.upsert_devices([_device()])
    assert store.device("cam-1") == _device()


def test_the_store_is_usable_from_several_threads(store: Store) -> None:
    def work(worker: int) -> None:
        for i in range(20):
            store.upsert_devices([_device(f"w{worker}-{i:02d}")])
            store.add_audit(_audit(i, target=f"w{worker}"))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.devices()) == 80
    assert len(store.history(limit=1_000)) == 80


def test_two_connections_writing_one_set_of_devices_in_opposite_orders_never_deadlock(
        reopen: Opener) -> None:
    """Two controllers flush and label overlapping devices, each in its own order; rows
    are written in id order, so neither waits on the other in a cycle (PostgreSQL
    refused one with "deadlock detected" before)."""
    ids = [f"cam-{i:02d}" for i in range(12)]
    errors: list[Exception] = []

    def work(store: Store, order: list[str]) -> None:
        try:
            for round_ in range(40):
                store.upsert_devices([_device(i, last_seen_ms=round_) for i in order])
                store.insert_devices([_device(i) for i in order])
                store.set_group(order, f"g{round_ % 3}")
                store.set_tags(order[round_ % len(order)], add=[f"t{round_}"])
        except Exception as exc:
            errors.append(exc)

    a, b = reopen(), reopen()
    threads = [threading.Thread(target=work, args=(a, ids)),
               threading.Thread(target=work, args=(b, ids[::-1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [d.id for d in a.devices()] == ids


def test_a_real_deadlock_is_reported_as_a_conflict_worth_a_retry(postgres_url: str) -> None:
    from edgefleet.fleet.store.postgres import PostgresBackend

    with psycopg.connect(postgres_url) as one, psycopg.connect(postgres_url) as two:
        for conn in (one, two):
            conn.autocommit = True
        one.execute("CREATE TABLE locks (id INT PRIMARY KEY)")
        one.execute("INSERT INTO locks VALUES (1), (2)")
        one.autocommit = two.autocommit = False
        one.execute("UPDATE locks SET id = id WHERE id = 1")
        two.execute("UPDATE locks SET id = id WHERE id = 2")
        caught: list[Exception] = []

        def cross(conn: psycopg.Connection[object], row: int) -> None:
            try:
                conn.execute("UPDATE locks SET id = id WHERE id = %s", (row,))
            except psycopg.Error as exc:
                caught.append(exc)
            conn.rollback()

        other = threading.Thread(target=cross, args=(two, 1))
        other.start()
        time.sleep(0.2)  # two waits on one's row
        cross(one, 2)
        other.join()
    assert len(caught) == 1 and getattr(caught[0], "sqlstate", None) == "40P01"
    backend = PostgresBackend(postgres_url)
    try:
        error = backend.translate(caught[0])
    finally:
        backend.close()
    assert error.transient
    assert "concurrent write conflicted" in error.message and "retry" in error.hint
    assert "is PostgreSQL running" not in error.hint


def test_a_bare_path_opens_sqlite_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    for url in (path, str(path)):
        store = open_store(url)
        store.upsert_devices([_device()])
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_bad_url_raises_store_error_naming_the_accepted_forms() -> None:
    with pytest.raises(StoreError) as info:
        open_store("mysql://root:secret@db/fleet")
    assert "mysql://" in str(info.value) and "secret" not in str(info.value)
    assert all(form in info.value.hint for form in ("sqlite:///", "postgresql://"))


@pytest.mark.parametrize("url", ["", "sqlite://"])
def test_an_empty_sqlite_path_raises_store_error(url: str) -> None:
    with pytest.raises(StoreError, match="empty path"):
        open_store(url)


def test_an_unwritable_sqlite_path_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="directory exists"):
        open_store(tmp_path / "missing-dir" / "fleet.db")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_an_unreachable_postgres_raises_store_error_with_a_hint(scheme: str) -> None:
    with pytest.raises(StoreError) as info:
        open_store(f"{scheme}://postgres@127.0.0.1:1/test?connect_timeout=2")
    assert isinstance(info.value.__cause__, psycopg.Error)
    assert "is PostgreSQL running at 127.0.0.1:1," in info.value.hint
    assert info.value.transient


def test_a_dropped_postgres_connection_fails_once_then_reconnects(postgres_url: str) -> None:
    store = open_store(postgres_url)
    try:
        store.upsert_devices([_device()])
        application = postgres_url.rpartition("application_name=")[2]
        _terminate_backends(application)
        with pytest.raises(StoreError) as info:
            store.devices()
        assert info.value.transient
        assert store.devices() == [_device()]
    finally:
        store.close()
