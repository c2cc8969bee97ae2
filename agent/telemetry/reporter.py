"""Publish a telemetry point every interval; spool it while the broker is away; replay in order.

Runs on its own thread. The only call into the agent is ``snapshot()``, which
drains counters; inference never waits on the network. Each point carries a
``seq`` that increases by one per point, across restarts too (kept in a file
beside the spool), so a consumer can see gaps; ``spool_dropped`` says how many
points the spool lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.errors import BrokerTimeoutError
from edgefleet.agent.mqtt import MqttClient
from edgefleet.agent.protocol.files import atomic_write, read_int
from edgefleet.agent.protocol.schema import finite
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.agent.telemetry.spool import Spool
from edgefleet.agent.telemetry.system import SystemProbe

__all__ = ["SCHEMA_VERSION", "TelemetryReporter"]

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


class TelemetryReporter:
    """Every ``interval_s``: one point, preceded by the spooled backlog (JSON arrays)."""

    def __init__(
        self,
        client: MqttClient,
        fleet: str,
        device: str,
        snapshot: Callable[[], dict[str, Any]],
        spool: Spool,
        interval_s: float,
        *,
        batch_size: int = 50,
        ack_timeout_s: float = 2.0,
        seq_path: Path | None = None,
    ) -> None:
        if interval_s <= 0 or batch_size <= 0:
            raise ValueError("interval_s and batch_size must be positive")
        self.client, self.spool, self.interval_s = client, spool, interval_s
        self.topic = device_topic(fleet, device, Leaf.TELEMETRY)
        self._snapshot, self._batch, self._timeout = snapshot, batch_size, ack_timeout_s
        self._system = SystemProbe()
        self._seq_path = Path(seq_path or spool.directory / "seq")
        self._seq = read_int(self._seq_path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefleet-telemetry", daemon=True)

    @property
    def seq(self) -> int:
        """The ``seq`` of the last point built (0 before the first, ever)."""
        return self._seq

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush: bool = True) -> None:
        """Stop the thread; with ``flush``, build and deliver (or spool) one last point."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if flush:
            self.tick()

    def tick(self) -> None:
        """Build one point and deliver it (or spool it); never raises."""
        try:
            point = self._point()
        except Exception:
            log.exception("telemetry point could not be built; none this interval")
            return
        try:
            self._deliver(point)
        except Exception:
            log.exception("telemetry delivery failed; the point is lost")

    def _run(self) -> None:
        due = time.monotonic()
        while True:
            due = max(due + self.interval_s, time.monotonic())
            if self._stop.wait(due - time.monotonic()):
                return
            self.tick()

    def _point(self) -> bytes:
        values = {
            **self._snapshot(),
            "schema_version": SCHEMA_VERSION,
            "seq": self._seq + 1,
            **self._system.values(),
            "spool_dropped": self.spool.dropped,
            "spool_pending": len(self.spool),
        }
        point = json.dumps({"ts": int(time.time() * 1000), "values": finite(values)},
                           allow_nan=False).encode()
        atomic_write(self._seq_path, str(self._seq + 1).encode())
        self._seq += 1
        return point

    def _deliver(self, point: bytes) -> None:
        if self.client.connected and self._replay():
            try:
                self.client.publish_wait(self.topic, point, qos=1, timeout=self._timeout)
                return
            except BrokerTimeoutError as exc:
                log.info("telemetry point spooled: %s", exc)
        self.spool.append(point)

    def _replay(self) -> bool:
        """Send the backlog oldest first, within one interval; True when it is empty."""
        deadline = time.monotonic() + self.interval_s
        while batch := self.spool.peek_batch(self._batch):
            points = [data for _, data in batch if _is_point(data)]
            if points:
                payload = b"[" + b",".join(points) + b"]"
                try:
                    self.client.publish_wait(self.topic, payload, qos=1, timeout=self._timeout)
                except BrokerTimeoutError as exc:
                    log.info("spool replay paused: %s", exc)
                    return False
            self.spool.remove([spool_id for spool_id, _ in batch])
            if time.monotonic() > deadline and len(self.spool):
                return False
        return True


def _is_point(data: bytes) -> bool:
    """A spooled payload that holds one JSON object (anything else is skipped)."""
    try:
        if isinstance(json.loads(data), dict):
            return True
    except ValueError:
        pass
    log.warning("skipped a spooled telemetry point that is not a JSON object (%d bytes)", len(data))
    return False
