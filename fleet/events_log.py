"""The controller's events as log records, with the fields an operator greps for.

``fleet serve`` attaches :func:`log_events` to its controller: each rollout change (a
warning when it pauses, aborts or rolls back), device event (update steps, model
switches, errors) and drift alert becomes one record of the ``fleet.events`` logger
whose ``extra`` carries ``rollout``, ``device``, ``model``, ``version`` and ``state``
where the event knows them (the JSON lines of ``--log-format json`` show them as fields).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from edgefleet.fleet.controller import FleetController
from edgefleet.fleet.rollout.state import RolloutState

__all__ = ["DETAIL_MAX", "FIELD_MAX", "log_event", "log_events"]

FIELD_MAX, DETAIL_MAX = 128, 1024  # a device's text in one log line, in characters

log = logging.getLogger("edgefleet.fleet.events")
_STOPPED = {RolloutState.PAUSED.value, RolloutState.ABORTED.value, RolloutState.ROLLED_BACK.value}


def log_events(controller: FleetController) -> None:
    """Log every event ``controller`` notifies its listeners of, from now on."""
    controller.listeners.append(log_event)


def log_event(kind: str, data: dict[str, Any]) -> None:
    """Log one controller event (kind "rollout", "event" or "alert"; others are not logged)."""
    handler = _HANDLERS.get(kind)
    if handler is not None:
        handler(data)


def _rollout(data: Mapping[str, Any]) -> None:
    model = data.get("spec", {}).get("model") or {}
    reason = f": {data['reason']}" if data.get("reason") else ""
    waves, state = int(data.get("waves") or 0), data.get("state")
    level = logging.WARNING if state in _STOPPED else logging.INFO
    log.log(level, "rollout %s %s, wave %d of %d%s", data.get("id"), state,
            min(int(data.get("wave") or 0) + 1, waves), waves, reason,
            extra={"rollout": data.get("id"), "state": state,
                   "model": model.get("name"), "version": model.get("version")})


def _device_event(data: Mapping[str, Any]) -> None:
    """A device's own text: logged cut to ``FIELD_MAX`` (detail ``DETAIL_MAX``) characters."""
    try:
        event = json.loads(data.get("event") or "{}")
    except ValueError:  # not JSON: the device's event is logged as an empty one
        event = {}
    event = event if isinstance(event, dict) else {}
    bundle = event.get("bundle")
    bundle = bundle if isinstance(bundle, dict) else {}
    log.info("device %s %s: %s", data.get("device"), _cut(event.get("kind")) or "event",
             _cut(event.get("detail"), DETAIL_MAX) or "",
             extra={"device": data.get("device"), "state": _cut(event.get("state")),
                    "model": _cut(bundle.get("name")), "version": _cut(bundle.get("version"))})


def _cut(value: Any, limit: int = FIELD_MAX) -> str | None:
    return None if value is None else str(value)[:limit]


def _alert(data: Mapping[str, Any]) -> None:
    model, _, version = str(data.get("model") or "").partition(":")
    log.warning("drift alert %s: %s feature %s PSI %s", data.get("kind"), data.get("device"),
                data.get("feature"), data.get("psi"),
                extra={"device": data.get("device"), "model": model or None,
                       "version": version or None, "state": data.get("kind")})


_HANDLERS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "rollout": _rollout, "event": _device_event, "alert": _alert}
