"""The dashboard's server-sent events: what changed, as it changes, and a periodic snapshot.

One stream per open page. Events, each ``data`` one JSON line::

    hello      on connect: fleet name, series bucket width, recent device events
    snapshot   every ``snapshot_s``: overview, a fingerprint of the device list (the page
               refetches the list when it changes) and the per-version chart points
               since the last snapshot (the last few buckets are sent again: they fill up),
               and the drift alerts firing (worst first, at most 50) with their count
    rollout    a rollout's summary, on every change the controller makes to it
    event      one device event
    resync     the page fell behind (its queue overflowed): reload everything

Controller listeners run on the MQTT and loop threads, so the stream's listener only
queues; this thread does the writing.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgefleet.agent.protocol.schema import finite
from edgefleet.fleet.dashboard._journal import EventJournal, attach, parse_event

if TYPE_CHECKING:
    from edgefleet.fleet.controller import FleetController

__all__ = ["json_text", "stream"]

_INBOX = 2000  # notifications a slow page may lag behind before it must resync
_RESEND_BUCKETS = 2  # series buckets sent again with each snapshot (late points)
_POLL_S = 0.25  # how often ``stop`` is looked at when nothing happens


def stream(controller: FleetController, write: Callable[[bytes], None],
           stop: threading.Event, snapshot_s: float = 1.5) -> None:
    """Write server-sent events until ``stop`` is set or ``write`` raises ``OSError``."""
    journal = attach(controller)
    inbox: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=_INBOX)
    overflow = threading.Event()

    def listen(kind: str, data: dict[str, Any]) -> None:
        try:
            inbox.put_nowait((kind, data))
        except queue.Full:
            overflow.set()

    controller.listeners.append(listen)
    try:
        _Pump(controller, journal, write, snapshot_s).run(inbox, overflow, stop)
    except OSError:
        return  # the page went away
    finally:
        controller.listeners.remove(listen)


class _Pump:
    def __init__(self, controller: FleetController, journal: EventJournal,
                 write: Callable[[bytes], None], snapshot_s: float) -> None:
        self.controller, self.journal, self.write = controller, journal, write
        self.snapshot_s = snapshot_s
        self.since_ms = 0  # series buckets from here on go into the next snapshot

    def run(self, inbox: queue.Queue[tuple[str, dict[str, Any]]], overflow: threading.Event,
            stop: threading.Event) -> None:
        self.write(b"retry: 2000\n\n")
        self.send("hello", {"fleet": self.controller.config.fleet,
                            "bucket_ms": self.controller.telemetry.series_bucket_ms,
                            "events": self.journal.recent()})
        due = 0.0
        while not stop.is_set():
            if time.monotonic() >= due:
                self.snapshot()
                due = time.monotonic() + self.snapshot_s
            if overflow.is_set():
                _drain(inbox)
                overflow.clear()
                self.send("resync", {})
            try:
                kind, data = inbox.get(timeout=min(_POLL_S, max(0.0, due - time.monotonic())))
            except queue.Empty:
                continue
            self.notification(kind, data)

    def notification(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "event":
            event = parse_event(str(data.get("device", "")), str(data.get("event", "")))
            if event is not None:
                self.send("event", event)
        elif kind == "rollout":
            self.send("rollout", data)

    def snapshot(self) -> None:
        telemetry = self.controller.telemetry
        series = telemetry.series(self.since_ms)
        latest = max((points[-1]["t"] for points in series.values() if points), default=None)
        if latest is not None:
            self.since_ms = latest - _RESEND_BUCKETS * telemetry.series_bucket_ms
        self.send("snapshot", {"ts": int(time.time() * 1000),
                               "overview": self.controller.overview(),
                               "devices_rev": _devices_rev(self.controller),
                               "series": series, "drift": _drift(self.controller)})

    def send(self, kind: str, data: dict[str, Any]) -> None:
        body = json_text(data, separators=(",", ":"), default=str)
        self.write(f"event: {kind}\ndata: {body}\n\n".encode())


def json_text(data: Any, **options: Any) -> str:
    """JSON a browser can parse: a non-finite number (a rollout an earlier edgefleet
    stored with a NaN rate) is written as null rather than as ``NaN``."""
    try:
        return json.dumps(data, allow_nan=False, **options)
    except ValueError:
        return json.dumps(finite(data), allow_nan=False, **options)


_ALERTS_SHOWN = 50


def _drift(controller: FleetController) -> dict[str, Any]:
    alerts = controller.alerts()
    return {"firing": len(alerts), "alerts": [a.as_dict() for a in alerts[:_ALERTS_SHOWN]]}


def _devices_rev(controller: FleetController) -> str:
    """Changes when a device's listing on the page would (not on every telemetry point)."""
    return format(hash(tuple(
        (d.id, d.online, d.active.sha256 if d.active else None, d.update_state,
         d.update_detail, d.group, tuple(sorted(d.tags)), d.profile,
         tuple((name, state.active.sha256 if state.active else None, state.update_state)
               for name, state in sorted((d.models or {}).items())))
        for d in controller.devices())) & 0xFFFFFFFFFFFF, "x")


def _drain(inbox: queue.Queue[tuple[str, dict[str, Any]]]) -> None:
    while True:
        try:
            inbox.get_nowait()
        except queue.Empty:
            return
