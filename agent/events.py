"""Numbered events: ``seq`` grows monotonically, across restarts too (kept on disk)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edgefleet.agent.protocol.files import atomic_write, read_int
from edgefleet.agent.protocol.payloads import BundleRef, Event

__all__ = ["EventLog"]


class EventLog:
    """Makes :class:`Event` payloads with the next sequence number."""

    def __init__(self, counter_file: Path) -> None:
        self._file = counter_file
        self._lock = threading.Lock()
        self._seq = read_int(counter_file)

    def next(self, kind: str, detail: str = "", state: str | None = None,
             bundle: BundleRef | None = None) -> Event:
        with self._lock:
            self._seq += 1
            seq = self._seq
            atomic_write(self._file, str(seq).encode())
        return Event(seq=seq, ts=int(time.time() * 1000), kind=kind, state=state,
                     detail=detail, bundle=bundle)
