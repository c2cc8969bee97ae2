"""An operator's rollout actions as the leader runs them: create a rollout, pause,
resume, abort or roll one back, roll a group back. Each is checked, audited under the
operator's name, applied and published at once (:class:`RolloutActions
<edgefleet.fleet.control.commands.RolloutActions>`; a follower relays them instead)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from edgefleet.fleet.control.audit import AuditTrail
from edgefleet.fleet.control.catalog import ModelCatalog
from edgefleet.fleet.control.devices import DeviceBook
from edgefleet.fleet.control.groups import GroupBook
from edgefleet.fleet.control.runner import RolloutRunner
from edgefleet.fleet.errors import ConflictError, InvalidRolloutError, NotFoundError
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.rollout import executor
from edgefleet.fleet.rollout.executor import Decisions
from edgefleet.fleet.rollout.state import ACTIVE, DeviceState, Rollout, RolloutState
from edgefleet.fleet.rollout.validate import rollout_spec
from edgefleet.fleet.store import Store

__all__ = ["OPERATIONS", "Actions"]

OPERATIONS: dict[str, Callable[[Rollout, int], Decisions]] = {
    "pause": executor.pause, "resume": executor.resume, "abort": executor.abort,
    "rollback": executor.rollback}


class Actions:
    """The local side of every rollout command, and the rollouts an operator reads."""

    def __init__(self, store: Store, registry: DeviceRegistry, catalog: ModelCatalog,
                 devices: DeviceBook, runner: RolloutRunner, audit: AuditTrail,
                 lock: threading.RLock, clock: Callable[[], int], groups: GroupBook) -> None:
        self.store, self.registry, self.catalog, self.devices = store, registry, catalog, devices
        self.runner, self.audit, self.lock, self.clock = runner, audit, lock, clock
        self.groups = groups

    def rollout(self, rollout_id: str) -> Rollout:
        with self.lock:
            found = self.runner.live.get(rollout_id) or self.store.rollout(rollout_id)
        if found is None:
            raise NotFoundError(f"no rollout {rollout_id!r}",
                                hint="see edgefleet fleet rollout list")
        return found

    def rollouts(self) -> list[Rollout]:
        with self.lock:
            stored = {r.id: r for r in self.store.rollouts()}
            stored.update(self.runner.live)
        return sorted(stored.values(), key=lambda r: r.created_ms, reverse=True)

    def create_rollout(self, model_key: str, options: dict[str, Any], actor: str) -> Rollout:
        model = self.catalog.model(model_key)
        # every option checked (finite, ranges, lengths, counts) before anything is stored
        spec = rollout_spec(options, model.ref, self.catalog.bundle_url(model.sha256),
                            model.size)
        # saved selectors (dynamic groups) are taken now: the rollout keeps what they meant
        spec = replace(spec, selectors=self.groups.expand(spec.selectors))
        with self.lock:
            self.devices.flush()
            busy = sorted(d.id for d in self.registry.all()
                          if spec.matches(d) and self.runner.observer.busy_elsewhere(d.id, ""))
            if busy:
                owner = next(r.id for r in self.runner.live.values()
                             if not r.finished and busy[0] in r.devices)
                raise ConflictError(f"{len(busy)} selected devices (e.g. {busy[0]}) are in "
                                    f"rollout {owner}, which is still running",
                                    hint=f"wait for it, or pause/abort it: edgefleet fleet "
                                         f"rollout abort {owner}")
            now = self.clock()
            rollout = Rollout(self.store.new_rollout_id(), spec, created_ms=now,
                              updated_ms=now, created_by=actor)
            self.store.save_rollout(rollout, fence=self.runner.role.fence)
            self.audit.record(actor, "rollout.create", rollout.id,
                              f"{model.key} to {', '.join(map(str, spec.selectors))}",
                              spec=spec.as_dict())
            rollout = self.runner.tick(rollout, set(), now, actor)
            self.runner.outbox.flush()
            return rollout

    def operate(self, rollout_id: str, verb: str, actor: str) -> Rollout:
        """pause, resume, abort or rollback one rollout."""
        if verb not in OPERATIONS:
            raise InvalidRolloutError(f"unknown rollout action {verb!r}",
                                      hint=f"one of {', '.join(OPERATIONS)}")
        with self.lock:
            rollout = self.rollout(rollout_id)
            try:
                decisions = OPERATIONS[verb](rollout, self.clock())
            except ConflictError as exc:
                self.audit.record(actor, f"rollout.{verb}", rollout_id, str(exc),
                                  outcome="refused")
                raise
            self.audit.record(actor, f"rollout.{verb}", rollout_id, decisions.rollout.reason)
            self.runner.live[rollout_id] = decisions.rollout
            result = self.runner.apply(decisions, actor)
            self.runner.outbox.flush()
            return result

    def rollback_group(self, group: str, actor: str) -> list[Rollout]:
        """Return every device of ``group`` that a rollout touched to its previous bundle."""
        with self.lock:
            members = frozenset(d.id for d in self.registry.all() if d.group == group)
            if not members:
                raise NotFoundError(f"group {group!r} has no devices",
                                    hint="see edgefleet fleet devices")
            touched = [r for r in self.rollouts() if r.state != RolloutState.ROLLED_BACK
                       and any(d in members and item.state in (*ACTIVE, DeviceState.SUCCEEDED)
                               for d, item in r.devices.items())]
            done = []
            for rollout in touched:
                decisions = executor.rollback(rollout, self.clock(), only=members)
                self.runner.live[rollout.id] = decisions.rollout
                done.append(self.runner.apply(decisions, actor))
            self.audit.record(actor, "fleet.rollback", f"group:{group}",
                              f"{len(done)} rollouts, {len(members)} devices",
                              rollouts=[r.id for r in done])
            self.runner.outbox.flush()
            return done
