"""The audit trail every part of the controller writes to, and its listeners."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from edgefleet.fleet.access import actor_role
from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.domain import AuditEntry
from edgefleet.fleet.store import Store

__all__ = ["REFUSALS_EVERY_MS", "SYSTEM", "AuditTrail", "Listeners", "Notify"]

log = logging.getLogger(CONTROLLER_LOG)
SYSTEM = "controller"  # the actor of what the controller does by itself
REFUSALS_EVERY_MS = 60_000  # one api.refused row per token and route in this time

Notify = Callable[[str, dict[str, Any]], None]


class AuditTrail:
    """Writes who did what to which target, and how it went, into the store: the actor is
    a token's name (or the controller's own, :data:`SYSTEM`), and the token's role goes
    into the entry's detail as ``role``."""

    def __init__(self, store: Store, clock: Callable[[], int]) -> None:
        self.store, self.clock = store, clock
        # (token, route) -> (when its last api.refused row was written, refusals since)
        self._refusals: dict[tuple[str, str], tuple[int, int]] = {}
        self._refusals_lock = threading.Lock()
        self.refusals_unwritten = 0  # refusals counted in a later row, not a row each
        # (token, route) -> every refusal since this controller started (GET /metrics)
        self._refused: collections.Counter[tuple[str, str]] = collections.Counter()

    def refused(self, actor: str, route: str, target: str, summary: str,
                **detail: Any) -> AuditEntry | None:
        """An ``api.refused`` row, at most one per token and ``route`` (``POST
        /api/v1/rollouts``) every :data:`REFUSALS_EVERY_MS`: a token refused in a loop
        cannot fill the history. The refusals in between are counted in the next row
        written (``detail.refused_since``) and in :attr:`refusals_unwritten`; None: this
        one was only counted."""
        now, key = self.clock(), (str(actor), route)
        with self._refusals_lock:
            self._refused[key] += 1
            last, since = self._refusals.get(key, (None, 0))
            if last is not None and now - last < REFUSALS_EVERY_MS:
                self._refusals[key] = (last, since + 1)
                self.refusals_unwritten += 1
                return None
            self._refusals[key] = (now, 0)
        extra = {"refused_since": since} if since else {}
        return self.record(actor, "api.refused", target, summary, outcome="refused",
                           **detail, **extra)

    def refusals(self) -> dict[tuple[str, str], int]:
        """Every refusal since this controller started, per (token name, route): counted in
        memory, so they start again at 0 with the controller (a Prometheus counter's reset,
        which ``rate()`` and ``increase()`` allow for); the history keeps the rows."""
        with self._refusals_lock:
            return dict(self._refused)

    def record(self, actor: str, action: str, target: str, summary: str = "",
               outcome: str = "ok", **detail: Any) -> AuditEntry:
        role = actor_role(actor)
        entry = AuditEntry(ts_ms=self.clock(), actor=str(actor), action=action, target=target,
                           outcome=outcome, detail={"summary": summary, **detail,
                                                    **({"role": role.value} if role else {})})
        return self.store.add_audit(entry)


class Listeners(list[Notify]):
    """Callbacks told of every event, alert, rollout change and change of leader; one
    that raises is logged and the others are still told."""

    def notify(self, kind: str, data: dict[str, Any]) -> None:
        for listener in list(self):
            try:
                listener(kind, data)
            except Exception:  # a listener's failure must not stop the controller
                log.exception("listener failed")
