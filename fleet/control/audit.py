"""The audit trail every part of the controller writes to, and its listeners."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from edgefleet.fleet.access import actor_role
from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.domain import AuditEntry
from edgefleet.fleet.store import Store

__all__ = ["SYSTEM", "AuditTrail", "Listeners", "Notify"]

log = logging.getLogger(CONTROLLER_LOG)
SYSTEM = "controller"  # the actor of what the controller does by itself

Notify = Callable[[str, dict[str, Any]], None]


class AuditTrail:
    """Writes who did what to which target, and how it went, into the store: the actor is
    a token's name (or the controller's own, :data:`SYSTEM`), and the token's role goes
    into the entry's detail as ``role``."""

    def __init__(self, store: Store, clock: Callable[[], int]) -> None:
        self.store, self.clock = store, clock

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
