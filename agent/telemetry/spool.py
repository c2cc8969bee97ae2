"""The on-disk telemetry spool used while the broker is unreachable.

One file per payload, named ``<id>-<crc32>.json`` with a zero-padded id so
names sort in arrival order; each is written through a temp file, fsync and
rename. The folder is bounded by ``max_bytes``: when a new payload does not
fit, the oldest ones are dropped. Every payload lost (dropped for room, or a
file found corrupt or missing) is counted in ``dropped``, which is kept on
disk so the count survives a restart. Bad files are skipped with a log line.
"""

from __future__ import annotations

import logging
import re
import threading
import zlib
from itertools import islice
from pathlib import Path

from edgefleet.agent.protocol.files import atomic_write, read_int

__all__ = ["Spool"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"^(\d{12})-([0-9a-f]{8})\.json$")
_DROPPED = "dropped"


class Spool:
    """A bounded, durable FIFO of byte payloads in one folder."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[int, int]] = {}  # id -> (crc32, size), oldest first
        self._size = 0
        self._dropped = read_int(self.directory / _DROPPED)
        self._scan()
        self._next = max(self._entries, default=0) + 1

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dropped(self) -> int:
        """Payloads lost so far (for room, or corrupt), across restarts."""
        return self._dropped

    @property
    def size_bytes(self) -> int:
        return self._size

    def append(self, payload: bytes) -> None:
        """Store one payload; drop the oldest ones if the bound would be exceeded."""
        with self._lock:
            if len(payload) > self.max_bytes:
                log.warning(
                    "a %d-byte payload exceeds the whole spool (%d bytes); dropped",
                    len(payload),
                    self.max_bytes,
                )
                self._count_dropped(1)
                return
            lost = 0
            while self._size + len(payload) > self.max_bytes:
                self._forget(next(iter(self._entries)))
                lost += 1
            self._count_dropped(lost)
            self._write(payload)

    def peek_batch(self, max_items: int) -> list[tuple[int, bytes]]:
        """The oldest payloads as (id, bytes), in order; corrupt files are dropped and counted."""
        with self._lock:
            batch: list[tuple[int, bytes]] = []
            bad = 0
            for spool_id in list(islice(self._entries, max_items)):
                data = self._read(spool_id)
                if data is None:
                    self._forget(spool_id)
                    bad += 1
                else:
                    batch.append((spool_id, data))
            self._count_dropped(bad)
            return batch

    def remove(self, ids: list[int]) -> None:
        """Forget delivered payloads."""
        with self._lock:
            for spool_id in ids:
                self._forget(spool_id)

    def _scan(self) -> None:
        """Find what a previous process left: entries, stray temp files, foreign names."""
        found: list[tuple[int, int, int]] = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_file():
                found.append((int(match[1]), int(match[2], 16), path.stat().st_size))
            elif path.name.endswith(".tmp"):
                log.warning("spool: removing %s, a write cut short by a crash", path.name)
                path.unlink(missing_ok=True)
            elif path.name != _DROPPED and path.suffix == ".json":
                log.warning("spool: ignoring %s, not a spool file name", path.name)
        for spool_id, crc, size in sorted(found):
            self._entries[spool_id] = (crc, size)
            self._size += size

    def _write(self, payload: bytes) -> None:
        spool_id, self._next = self._next, self._next + 1
        crc = zlib.crc32(payload)
        atomic_write(self._path(spool_id, crc), payload)
        self._entries[spool_id] = (crc, len(payload))
        self._size += len(payload)

    def _read(self, spool_id: int) -> bytes | None:
        crc, _ = self._entries[spool_id]
        path = self._path(spool_id, crc)
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("spool: %s unreadable (%s); skipped", path.name, exc.strerror or exc)
            return None
        if zlib.crc32(data) != crc:
            log.warning("spool: %s is corrupt (checksum differs); skipped", path.name)
            return None
        return data

    def _forget(self, spool_id: int) -> None:
        entry = self._entries.pop(spool_id, None)
        if entry is not None:
            self._size -= entry[1]
            self._path(spool_id, entry[0]).unlink(missing_ok=True)

    def _count_dropped(self, count: int) -> None:
        if count:
            self._dropped += count
            atomic_write(self.directory / _DROPPED, str(self._dropped).encode())

    def _path(self, spool_id: int, crc: int) -> Path:
        return self.directory / f"{spool_id:012d}-{crc:08x}.json"
