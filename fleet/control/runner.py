"""The rollout runner: the live rollouts this controller follows, each ticked (pure,
:mod:`edgefleet.fleet.rollout.executor`) and its decisions applied: saved (fenced by the
role's lease), audited, announced, and the desired states queued in the outbox."""

from __future__ import annotations

import logging
from collections.abc import Callable

from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.audit import AuditTrail, Notify
from edgefleet.fleet.control.observer import UNSETTLED, RolloutObserver
from edgefleet.fleet.control.outbox import Outbox
from edgefleet.fleet.control.role import Role
from edgefleet.fleet.errors import FleetError
from edgefleet.fleet.rollout import executor
from edgefleet.fleet.rollout.executor import Decisions
from edgefleet.fleet.rollout.state import Rollout
from edgefleet.fleet.store import Store

__all__ = ["RolloutRunner"]

log = logging.getLogger(CONTROLLER_LOG)
_FOLLOW_AFTER_END_MS = 24 * 3600 * 1000


class RolloutRunner:
    """Ticks and applies the live rollouts; ``live`` is shared with the observer."""

    def __init__(self, store: Store, live: dict[str, Rollout], observer: RolloutObserver,
                 outbox: Outbox, role: Role, audit: AuditTrail, notify: Notify,
                 clock: Callable[[], int]) -> None:
        self.store, self.live, self.observer, self.outbox = store, live, observer, outbox
        self.role, self.audit, self.notify, self.clock = role, audit, notify, clock
        self.broken_ticks = 0  # rollout ticks that raised (each stopped its rollout)

    def load(self) -> None:
        """Follow the live rollouts of the store and tell their devices again (start,
        election)."""
        now = self.clock()
        rollouts = self.store.rollouts()
        self.live.clear()
        self.live.update((r.id, r) for r in rollouts if self.followed(r, now))
        for rollout in self.live.values():
            if (problem := rollout.spec.unreadable()) is not None:
                log.error("rollout %s: %s; it is stopped at its next tick", rollout.id, problem)
        self.outbox.clear()
        self.outbox.restore(rollouts)
        self.outbox.requeue(self.live.values())

    def forget(self) -> None:
        """No longer the leader: forget what only a leader does (the store has it all)."""
        self.live.clear()
        self.outbox.clear()

    def tick_all(self, joined: set[str], now: int, actor: str) -> None:
        for rollout in list(self.live.values()):
            self.tick(rollout, joined, now, actor)

    def tick(self, rollout: Rollout, joined: set[str], now: int, actor: str) -> Rollout:
        """One rollout's tick, applied; a tick that raises stops that rollout only.

        The executor is pure, so what raises in it comes from this rollout's own data (a
        store written before its options were checked may hold a NaN rate): the rollout
        is aborted with the reason (or, if even that fails, no longer followed here) and
        the loop steps the others. Store failures raise as before: the next step retries.
        """
        problem = rollout.spec.unreadable()
        if problem is not None:  # it would select no device: stopped, never run blind
            return self._stop_broken(rollout, f"stopped: its {problem}", now, actor)
        try:
            decisions = executor.tick(rollout, self.observer.observe(rollout, joined), now)
        except FleetError:
            raise
        except Exception as exc:  # one rollout's bad data must never stop the others
            log.exception("rollout %s: its tick failed; stopping it", rollout.id)
            return self._stop_broken(rollout, f"stopped: its tick failed "
                                              f"({type(exc).__name__}: {str(exc)[:200]})",
                                     now, actor)
        return self.apply(decisions, actor)

    def apply(self, decisions: Decisions, actor: str) -> Rollout:
        rollout = decisions.rollout
        if not (decisions.changed or decisions.sends or decisions.notes):
            self.live[rollout.id] = rollout  # a state change always comes with a note
            return rollout
        self.store.save_rollout(rollout, decisions.changed, fence=self.role.fence)
        for note in decisions.notes:
            self.audit.record(actor, "rollout.progress", rollout.id, note)
        if self.followed(rollout, self.clock()):
            self.live[rollout.id] = rollout
        else:
            self.live.pop(rollout.id, None)
        for send in decisions.sends:
            self.outbox.queue(rollout, send.device, send.action, send.bundle)
        for device in decisions.cleared:
            self.outbox.clear_device(device)
        if decisions.notes or decisions.changed:
            self.notify("rollout", rollout.summary())
        return rollout

    @staticmethod
    def followed(rollout: Rollout, now: int) -> bool:
        if not rollout.finished:
            return True
        if now - rollout.updated_ms > _FOLLOW_AFTER_END_MS:
            return False
        return any(d.state in UNSETTLED for d in rollout.devices.values())

    def _stop_broken(self, rollout: Rollout, reason: str, now: int, actor: str) -> Rollout:
        self.broken_ticks += 1
        if not rollout.finished:
            try:
                aborted = executor.abort(rollout, now, reason)
            except Exception:  # the abort cannot run on this rollout's data either
                log.exception("rollout %s: cannot abort it either", rollout.id)
            else:
                return self.apply(aborted, actor)  # a store failure: the next step retries
        self.live.pop(rollout.id, None)  # finished, or beyond repair: left alone here
        self.audit.record(actor, "rollout.progress", rollout.id,
                          f"no longer followed: {reason}", outcome="failed")
        return rollout
