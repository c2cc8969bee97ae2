"""The drift desk: per-model drift policies, reference statistics, and the alerts the
drift monitor (:mod:`edgefleet.fleet.drift`) raises and clears.

Policies live in the store (any controller may set one) and are read again every
:data:`POLICIES_EVERY_MS`. Scaled out, the leader judges for everyone and keeps its
:class:`DriftView` in the store; a follower shows that copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from edgefleet.agent.protocol.drift import Monitoring
from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.audit import SYSTEM, AuditTrail, Notify
from edgefleet.fleet.drift import AlertChange, DriftMonitor, DriftPolicy, DriftView
from edgefleet.fleet.store import Store
from edgefleet.fleet.telemetry import VersionKey

__all__ = ["MIN_REFERENCE_SAMPLES", "POLICIES_EVERY_MS", "DriftDesk"]

log = logging.getLogger(CONTROLLER_LOG)
_DRIFT_PREFIX = "drift:"  # settings key of a model's DriftPolicy
MIN_REFERENCE_SAMPLES = 100  # drift is judged only against references at least this big
POLICIES_EVERY_MS = 30_000  # how often the drift policies are read again from the store
_DRIFT_VIEW_KEY = "state:drift"  # settings key of the leader's DriftView (scale-out)
_DRIFT_VIEW_EVERY_MS = 5_000  # how often the leader rewrites it while nothing fires


class DriftDesk:
    """Drift policies and references for the monitor, and what its judgements become."""

    def __init__(self, store: Store, audit: AuditTrail, notify: Notify,
                 clock: Callable[[], int], journal: bool) -> None:
        self.store, self.audit, self.notify, self.clock = store, audit, notify, clock
        self._references: dict[VersionKey, Monitoring | None] = {}
        self._policies: dict[str, DriftPolicy] = {}
        self._policies_read_ms = 0
        self.monitor = DriftMonitor(self.reference, self.policy, journal=journal)
        self._leader_view: DriftView | None = None  # a follower's copy of the leader's
        self._written: tuple[int, int] = (-1, 0)  # (windows, ms) of the last write

    # --- ingest ---------------------------------------------------------------------------

    def without_drift(self, device: str, values: dict[str, Any],
                      problem: str) -> dict[str, Any]:
        """A point whose drift window is unusable: the rest of it is still good."""
        self.monitor.rejected += 1
        log.warning("dropped the drift window of %s: %s", device, problem)
        return {key: value for key, value in values.items() if key != "drift"}

    # --- judging ----------------------------------------------------------------------------

    def reread_policies(self, now: int) -> bool:
        """Read the policies again when they are due (set on any controller); True if read."""
        if now - self._policies_read_ms < POLICIES_EVERY_MS:
            return False
        self._policies_read_ms = now
        self._policies = {key.partition(":")[2]: DriftPolicy(**value) for key, value in
                          self.store.settings(_DRIFT_PREFIX).items()}
        return True

    def judge(self) -> list[AlertChange]:
        """Compare the drift windows telemetry brought since the last tick."""
        return self.monitor.process()

    def announce(self, changes: list[AlertChange]) -> None:
        """Audit and announce every alert raised or cleared."""
        for change in changes:
            alert = change.alert
            self.audit.record(SYSTEM, f"drift.{change.kind}", alert.device,
                              f"{alert.model}:{alert.version} {alert.feature} PSI "
                              f"{alert.psi:.3f} (threshold {alert.threshold})",
                              **alert.as_dict())
            self.notify("alert", {"kind": change.kind, **alert.as_dict()})

    # --- the view -------------------------------------------------------------------------

    def view(self) -> DriftView:
        """Alerts, PSI summary and windows judged here."""
        return self.monitor.view()

    def leader_view(self) -> DriftView:
        """The leader's view as last read from the store (empty before the first read)."""
        return self._leader_view or DriftView([], [], 0)

    def write_view(self, now: int, changed: bool) -> None:
        """The leader's alerts and PSI summary into the store: at once when an alert was
        raised or cleared, else every few seconds while windows come in."""
        windows, written_ms = self._written
        if changed or windows < 0 or (self.monitor.windows != windows
                                      and now - written_ms >= _DRIFT_VIEW_EVERY_MS):
            view = self.monitor.view()
            self.store.put_setting(_DRIFT_VIEW_KEY, view.as_dict(), now)
            self._written = (view.windows, now)

    def forget_written(self) -> None:
        """Newly elected: the store holds the last leader's view; write this one's soon."""
        self._written = (-1, 0)

    def read_view(self) -> None:
        stored = self.store.settings(_DRIFT_VIEW_KEY).get(_DRIFT_VIEW_KEY)
        try:
            self._leader_view = None if stored is None else DriftView.from_dict(stored)
        except ValueError as exc:
            log.warning("the leader's stored drift view is unreadable: %s", exc)

    # --- references and policies ------------------------------------------------------------

    def reference(self, model: str, version: str) -> Monitoring | None:
        """The reference statistics in a pushed version's manifest (cached)."""
        key = (model, version)
        if key not in self._references:
            found = self.store.model(model, version)
            raw = found.manifest.get("monitoring") if found is not None else None
            try:
                found_ref = Monitoring.model_validate(raw) if raw else None
                # a reference of a few health vectors would make every device "drift"
                self._references[key] = (found_ref if found_ref is not None and
                                         found_ref.samples >= MIN_REFERENCE_SAMPLES else None)
            except ValueError:
                log.warning("%s:%s carries unreadable drift reference statistics", *key)
                self._references[key] = None
            if found is None:  # maybe pushed later: ask again then
                return self._references.pop(key)
        return self._references[key]

    def policy(self, model: str) -> DriftPolicy:
        return self._policies.get(model, DriftPolicy())

    def policies(self) -> dict[str, DriftPolicy]:
        return dict(self._policies)

    def set_policy(self, model: str, policy: DriftPolicy | None, actor: str) -> DriftPolicy:
        """Set (or with ``None`` reset to the defaults) when ``model``'s drift alerts."""
        self.store.put_setting(f"{_DRIFT_PREFIX}{model}",
                               policy.as_dict() if policy else None, self.clock())
        if policy is None:
            self._policies.pop(model, None)
        else:
            self._policies[model] = policy
        chosen = self.policy(model)
        self.audit.record(actor, "drift.policy", model,
                          "defaults" if policy is None else str(chosen.as_dict()),
                          **chosen.as_dict())
        return chosen
