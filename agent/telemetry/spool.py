"""The on-disk telemetry spool used while the broker is unreachable.

One file per point, named by a zero-padded sequence so names sort in arrival
order; each written through a temp file, fsync and rename. The folder is
bounded by ``max_bytes``: when a new point does not fit, the oldest points are
dropped and counted in ``dropped`` (kept on disk, so the count survives a
restart). A file that cannot be read is skipped with a log line.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from agent.protocol.files import atomic_write, read_int

__all__ = ["Spool"]

log = logging.getLogger(__name__)
_SUFFIX = ".json"
_DROPPED = "dropped"


class Spool:
    """A bounded FIFO of byte payloads in a folder."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}
        for path in self.directory.glob(f"*{_SUFFIX}"):
            if path.stem.isdigit():
                self._sizes[int(path.stem)] = path.stat().st_size
        self._next = max(self._sizes, default=0) + 1
        self._dropped = read_int(self.directory / _DROPPED)

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    def append(self, payload: bytes) -> None:
        """Store one point; drop the oldest ones if the bound would be exceeded."""
        with self._lock:
            if len(payload) > self.max_bytes:
                self._count_dropped(1)
                return
            excess = self.size_bytes + len(payload) - self.max_bytes
            while excess > 0 and self._sizes:
                oldest = min(self._sizes)
                excess -= self._sizes[oldest]
                self._delete(oldest)
                self._count_dropped(1)
            seq, self._next = self._next, self._next + 1
            atomic_write(self._path(seq), payload)
            self._sizes[seq] = len(payload)

    def peek_batch(self, max_items: int) -> list[tuple[int, bytes]]:
        """The oldest points, in order; unreadable files are dropped and logged."""
        with self._lock:
            ids = sorted(self._sizes)[:max_items]
        batch = []
        for seq in ids:
            try:
                batch.append((seq, self._path(seq).read_bytes()))
            except OSError as exc:
                log.warning("spool file %s unreadable (%s); skipped", self._path(seq), exc)
                self.remove([seq])
        return batch

    def remove(self, ids: list[int]) -> None:
        with self._lock:
            for seq in ids:
                self._delete(seq)

    def _delete(self, seq: int) -> None:
        self._sizes.pop(seq, None)
        self._path(seq).unlink(missing_ok=True)

    def _count_dropped(self, count: int) -> None:
        self._dropped += count
        atomic_write(self.directory / _DROPPED, str(self._dropped).encode())

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}{_SUFFIX}"

