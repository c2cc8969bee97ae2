"""Publish a telemetry point every interval; spool it while the broker is away; replay in order.

Runs on its own thread. The only call into the agent is ``snapshot()``, which
drains counters; inference never waits on the network.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import BrokerTimeoutError
from agent.mqtt import MqttClient
from agent.protocol.files import atomic_write, read_int
from agent.protocol.topics import Leaf, device_topic
from agent.telemetry.spool import Spool
from agent.telemetry.system import SystemProbe

__all__ = ["TelemetryReporter"]

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


class TelemetryReporter:
    """Every ``interval_s``: one point, preceded by the spooled backlog (JSON arrays)."""

    def __init__(self, client: MqttClient, fleet: str, device: str,
                 snapshot: Callable[[], dict[str, Any]], spool: Spool, interval_s: float,
                 *, batch_size: int = 50, ack_timeout_s: float = 2.0) -> None:
        self.client, self.spool, self.interval_s = client, spool, interval_s
        self.topic = device_topic(fleet, device, Leaf.TELEMETRY)
        self._snapshot, self._batch, self._timeout = snapshot, batch_size, ack_timeout_s
        self._system = SystemProbe()
        self._seq_file = Path(spool.directory) / "seq"
        self._seq = read_int(self._seq_file)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefleet-telemetry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if flush:
            self.tick()

    def tick(self) -> None:
        """Build one point and deliver it (or spool it)."""
        try:
            self._deliver(self._point())
        except Exception:
            log.exception("telemetry tick failed; the next one retries")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def _point(self) -> bytes:
        self._seq += 1
        atomic_write(self._seq_file, str(self._seq).encode())
        values = {"schema_version": SCHEMA_VERSION, "seq": self._seq, **self._snapshot(),
                  **self._system.values(), "spool_dropped": self.spool.dropped,
                  "spool_pending": len(self.spool)}
        return json.dumps({"ts": int(time.time() * 1000), "values": values}).encode()

    def _deliver(self, point: bytes) -> None:
        if not (self.client.connected and self._replay()):
            self.spool.append(point)
            return
        try:
            self.client.publish_wait(self.topic, point, qos=1, timeout=self._timeout)
        except BrokerTimeoutError:
            self.spool.append(point)

    def _replay(self) -> bool:
        """Send the backlog oldest first; True when it is empty."""
        while batch := self.spool.peek_batch(self._batch):
            points = [data for _, data in batch if _is_point(data)]
            payload = b"[" + b",".join(points) + b"]"
            try:
                self.client.publish_wait(self.topic, payload, qos=1, timeout=self._timeout)
            except BrokerTimeoutError:
                return False
            self.spool.remove([seq for seq, _ in batch])
        return True



def _is_point(data: bytes) -> bool:
    """A spooled file that still holds one whole JSON object (a torn one is skipped)."""
    try:
        return isinstance(json.loads(data), dict)
    except ValueError:
        log.warning("skipped a corrupt spooled telemetry point (%d bytes)", len(data))
        return False
