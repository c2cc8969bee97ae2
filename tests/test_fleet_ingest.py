"""What the controller takes in: the registry (what marks a device for a store write) and
telemetry payloads, checked on the way in."""

from __future__ import annotations

import pytest

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.payloads import ReportedState, decode_telemetry
from edgefleet.fleet.registry import DeviceRegistry


def test_status_and_reports_mark_devices_dirty_once_each() -> None:
    registry = DeviceRegistry("f")
    registry.status("cam-1", "online", 10)
    registry.reported(ReportedState(fleet="f", device="cam-1", agent_version="0.1.0",
                                    profile="raspberry-pi-4"), 20)
    dirty = registry.take_dirty()
    assert [d.id for d in dirty] == ["cam-1"]
    assert dirty[0].online and dirty[0].profile == "raspberry-pi-4"
    assert registry.take_dirty() == [] and registry.take_joined() == ["cam-1"]


def test_dirty_devices_come_in_id_order_and_a_failed_write_marks_them_again() -> None:
    registry = DeviceRegistry("f")
    for device in ("cam-3", "cam-1", "cam-2"):
        registry.status(device, "online", 10)
    dirty = registry.take_dirty()
    assert [d.id for d in dirty] == ["cam-1", "cam-2", "cam-3"]
    registry.mark_dirty([d.id for d in dirty] + ["never-seen"])
    assert [d.id for d in registry.take_dirty()] == ["cam-1", "cam-2", "cam-3"]


def test_telemetry_updates_last_seen_without_a_store_write() -> None:
    registry = DeviceRegistry("f")
    registry.status("cam-1", "online", 10)
    registry.take_dirty()
    before = registry.get("cam-1")
    registry.seen("cam-1", 99)
    assert registry.take_dirty() == []
    assert registry.get("cam-1") is before, "the device object is unchanged (views stay cached)"
    assert registry.all()[0].last_seen_ms == 99 and registry.last_seen("cam-1") == 99


@pytest.mark.parametrize(("payload", "problem"), [
    (b'{"ts": 1, "values": {"schema_version": 1}}', None),
    (b'[{"ts": 1, "values": {"schema_version": 1}}, {"ts": 2, "values": {"schema_version": 1}}]',
     None),
    (b'{"ts": "1", "values": {"schema_version": 1}}', "integer of milliseconds"),
    (b'{"ts": true, "values": {"schema_version": 1}}', "integer of milliseconds"),
    (b'{"ts": 1, "values": {"schema_version": 9}}', "schema_version 9"),
    (b'{"ts": 1, "values": [1]}', "must be"),
    (b'[1]', "must be"),
    (b'not json', "not valid JSON"),
])
def test_telemetry_payloads_are_checked_on_the_way_in(payload: bytes, problem: str | None
                                                      ) -> None:
    if problem is None:
        assert [p.ts for p in decode_telemetry(payload)] in ([1], [1, 2])
        return
    with pytest.raises(EdgefleetError, match=problem):
        decode_telemetry(payload)
