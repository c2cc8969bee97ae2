"""Numbered events: ``seq`` grows monotonically, across restarts too (kept on disk)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.protocol.files import atomic_write
from agent.protocol.payloads import BundleRef, Event

__all__ = ["EventLog"]


class EventLog:
    """Makes :class:`Event` payloads with the next sequence number."""

    def __init__(self, counter_file: Path) -> None:
        self._file = counter_file
        self._lock = threading.Lock()
        try:
            self._seq = int(counter_file.read_text().strip() or 0)
        except (OSError, ValueError):
            self._seq = 0

    def next(self, kind: str, detail: str = "", state: str | None = None,
             bundle: BundleRef | None = None) -> Event:
        with self._lock:
            self._seq += 1
            seq = self._seq
            atomic_write(self._file, str(seq).encode())
        return Event(seq=seq, ts=int(time.time() * 1000), kind=kind, state=state,
                     detail=detail, bundle=bundle)
