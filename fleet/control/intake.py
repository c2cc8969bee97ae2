"""Device messages as they arrive (on MQTT's network thread): each checked whole against
its schema (:mod:`edgefleet.fleet.ingest`) before anything of it is kept, then handed to
the registry, the telemetry book or the drift monitor; cheap, no store writes."""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Callable
from typing import Any

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.schema import SEMVER_PATTERN
from edgefleet.agent.protocol.telemetry_schema import drift_problem
from edgefleet.agent.protocol.topics import Leaf, parse_topic
from edgefleet.fleet import ingest
from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.audit import Notify
from edgefleet.fleet.control.drift_desk import DriftDesk
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.telemetry import TelemetryBook, per_model

__all__ = ["MessageIntake"]

_SEMVER = re.compile(SEMVER_PATTERN)

log = logging.getLogger(CONTROLLER_LOG)


class MessageIntake:
    """Takes in one device message at a time; a refused one is counted by reason."""

    def __init__(self, fleet: str, registry: DeviceRegistry, telemetry: TelemetryBook,
                 drift: DriftDesk, notify: Notify, clock: Callable[[], int]) -> None:
        self.fleet, self.registry, self.telemetry, self.drift = fleet, registry, telemetry, drift
        self.notify, self.clock = notify, clock
        self.rejected = 0  # malformed messages dropped
        self.rejected_by: collections.Counter[str] = collections.Counter()  # by reason

    def message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One device message; a refused one is counted by reason and logged.

        ``retained``: a copy the broker replays on every (re)subscription (a device's last
        word, maybe days old): it tells what the device said, not that it was heard from
        now, so it leaves the time last seen as it was (else an offline device would never
        grow stale across a controller's reconnections)."""
        try:
            address = parse_topic(topic)
        except (EdgefleetError, ValueError) as exc:
            self._reject(topic, "topic", exc)
            return
        try:
            self._take(address.leaf, address.device, payload, retained)
        except (EdgefleetError, ValueError) as exc:
            self._reject(topic, ingest.reason(exc), exc)

    def _take(self, leaf: Leaf, device: str, payload: bytes, retained: bool) -> None:
        now = self.clock()
        if leaf == Leaf.TELEMETRY:
            for ts, values in ingest.telemetry(payload):
                if "drift" in values and (problem := drift_problem(values)):
                    values = self.drift.without_drift(device, values, problem)
                self.telemetry.add(device, ts, values)
                for model in _drifts(values):
                    self.drift.monitor.offer(device, model["model"], model["model_version"],
                                             ts, model["drift"])
            self.registry.seen(device, now)
        elif leaf == Leaf.STATUS and payload:
            self.registry.status(device, ingest.status(payload), now, retained=retained)
        elif leaf == Leaf.STATUS:  # cleared: the device was decommissioned (lifecycle.py)
            self.registry.forget([device])
        elif leaf == Leaf.REPORTED and payload:
            self.registry.reported(ingest.reported(device, payload, self.fleet), now,
                                   retained=retained)
        elif leaf == Leaf.EVENTS:
            self.notify("event", {"device": device, "event": ingest.event(payload)})

    def _reject(self, topic: str, reason: str, exc: Exception) -> None:
        self.rejected += 1
        self.rejected_by[reason] += 1
        log.warning("dropped a message on %s (%s): %s", topic[:200], reason, exc)


def _drifts(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The values of each model of a point that carry a drift window fit to use: the point
    itself (checked with the point), or each entry of its ``models`` map whose name,
    version and window hold (an entry that does not is left out alone)."""
    if "models" not in values:
        return [values] if "drift" in values else []
    return [model for model in per_model(values)
            if "drift" in model and isinstance(version := model.get("model_version"), str)
            and _SEMVER.fullmatch(version) and not drift_problem(model)]
