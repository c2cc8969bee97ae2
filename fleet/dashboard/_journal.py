"""The latest events of every device, kept for the dashboard's device pages.

The controller does not store device events: it hands each one to its listeners. A
:class:`EventJournal` is such a listener; :func:`attach` gives every controller one
(idempotent), so the page can show a device's recent events after it loads.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.payloads import Event, decode

if TYPE_CHECKING:
    from edgefleet.fleet.controller import FleetController

__all__ = ["EventJournal", "attach"]

log = logging.getLogger(__name__)
_journals: weakref.WeakKeyDictionary[FleetController, EventJournal] = (
    weakref.WeakKeyDictionary())
_attach_lock = threading.Lock()


def attach(controller: FleetController) -> EventJournal:
    """The journal listening to ``controller``'s device events (registered on first call)."""
    with _attach_lock:
        journal = _journals.get(controller)
        if journal is None:
            journal = _journals[controller] = EventJournal()
            controller.listeners.append(journal)
        return journal


class EventJournal:
    """The last ``per_device`` events of the ``devices`` most recently heard-from devices."""

    def __init__(self, per_device: int = 30, devices: int = 5000) -> None:
        self.per_device, self.max_devices = per_device, devices
        self._events: collections.OrderedDict[str, collections.deque[dict[str, Any]]] = (
            collections.OrderedDict())
        self._lock = threading.Lock()

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        """A controller listener: keeps ``event`` notifications, ignores the rest."""
        if kind == "event":
            self.record(str(data.get("device", "")), str(data.get("event", "")))

    def record(self, device: str, raw: str) -> dict[str, Any] | None:
        """Keep one event payload of ``device``; a malformed one is logged and dropped."""
        event = parse_event(device, raw)
        if event is None:
            return None
        with self._lock:
            events = self._events.pop(device, None)
            if events is None:
                events = collections.deque(maxlen=self.per_device)
                while len(self._events) >= self.max_devices:
                    self._events.popitem(last=False)
            events.append(event)
            self._events[device] = events  # most recently heard-from last
        return event

    def recent(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` events, oldest first, favouring the most recently active devices."""
        with self._lock:
            chosen: list[dict[str, Any]] = []
            for events in reversed(self._events.values()):
                chosen.extend(events)
                if len(chosen) >= limit:
                    break
        return sorted(chosen, key=lambda e: (e["ts"], e["seq"]))[-limit:]


def parse_event(device: str, raw: str) -> dict[str, Any] | None:
    """The fields the page shows of one ``events`` payload, or None if it is not one."""
    try:
        event = decode(Event, raw)
    except EdgefleetError as exc:
        log.info("dashboard: dropped an event of %s: %s", device, exc)
        return None
    return {"device": device, "seq": event.seq, "ts": event.ts, "kind": event.kind,
            "state": event.state, "detail": event.detail,
            "version": event.bundle.version if event.bundle else None}
