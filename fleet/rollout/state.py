"""A rollout's state: where it is (``RolloutState``, current wave) and every device's progress.

Both machines are declared as edge tables (:data:`ROLLOUT_EDGES`, :data:`DEVICE_EDGES`)
that the executor enforces; the drawings below are the tables' own
(:meth:`~edgefleet.fleet.rollout.edges.Edges.drawing`), and a test holds them equal.

A rollout::

    PENDING     -> RUNNING | WAITING | SUCCEEDED | ABORTED | ROLLED_BACK
    RUNNING     -> WAITING | PAUSED | SUCCEEDED | ABORTED | ROLLED_BACK
    WAITING     -> RUNNING | PAUSED | SUCCEEDED | ABORTED | ROLLED_BACK
    PAUSED      -> RUNNING | ABORTED | ROLLED_BACK
    SUCCEEDED   -> ROLLED_BACK
    ABORTED     -> ROLLED_BACK
    ROLLED_BACK -> ROLLED_BACK

It starts RUNNING, or SUCCEEDED at once when no device matches; it is WAITING instead
of RUNNING while its schedule is closed (before ``--start-at``, outside its windows: it
sends no bundle then, and goes on following the devices it sent one), and RUNNING again
when the schedule opens; an operator pauses and resumes it (a resumed rollout outside
its windows is WAITING at the next tick); it SUCCEEDED when every wave was reached with
enough devices succeeding, and
is ABORTED when a gate fires or an operator aborts it (also before it started). An
operator rolls it back from any state, again after a rollback too (devices it missed).

A device in a rollout::

    PENDING      -> INCOMPATIBLE | TARGETED | SUCCEEDED | CANCELLED
    TARGETED     -> UPDATING | PROBATION | SUCCEEDED | FAILED | TIMED_OUT | ROLLING_BACK
    UPDATING     -> PROBATION | SUCCEEDED | FAILED | TIMED_OUT | ROLLING_BACK
    PROBATION    -> COMMITTING | SUCCEEDED | FAILED | ROLLING_BACK
    COMMITTING   -> SUCCEEDED | FAILED | TIMED_OUT | ROLLING_BACK
    SUCCEEDED    -> ROLLING_BACK
    FAILED       -> UPDATING | PROBATION | ROLLING_BACK
    TIMED_OUT    -> UPDATING | PROBATION | SUCCEEDED | FAILED | ROLLING_BACK
    ROLLING_BACK -> FAILED | ROLLED_BACK

A pending device is sent the bundle (TARGETED), or is INCOMPATIBLE (its runtime or profile
cannot load the bundle; never targeted), already SUCCEEDED (it runs the bundle), or
CANCELLED (the rollout ended before its turn). From then on it moves forward with what it
reports (UPDATING, PROBATION, SUCCEEDED, FAILED), is COMMITTING once its soak is over, and
TIMED_OUT when it does not answer (it answers late: online, a new report). A FAILED device
that works on the bundle again (online) goes back to UPDATING or PROBATION. Any touched
device rolls back (ROLLING_BACK -> ROLLED_BACK, or FAILED when its rollback fails) when the
rollout is aborted or rolled back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.fleet.domain import ref_from_dict, ref_to_dict
from edgefleet.fleet.rollout.edges import Edges
from edgefleet.fleet.rollout.spec import RolloutSpec

__all__ = [
    "ACTIVE",
    "DEVICE_EDGES",
    "DONE",
    "FINISHED",
    "ROLLOUT_EDGES",
    "TOUCHED",
    "DeviceState",
    "Rollout",
    "RolloutDevice",
    "RolloutState",
]


class RolloutState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    WAITING = "WAITING"  # outside its start time or windows: no bundle is sent
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    ABORTED = "ABORTED"
    ROLLED_BACK = "ROLLED_BACK"


FINISHED = frozenset({RolloutState.SUCCEEDED, RolloutState.ABORTED, RolloutState.ROLLED_BACK})


class DeviceState(str, Enum):
    PENDING = "PENDING"
    INCOMPATIBLE = "INCOMPATIBLE"
    TARGETED = "TARGETED"
    UPDATING = "UPDATING"
    PROBATION = "PROBATION"
    COMMITTING = "COMMITTING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"


# A rollout's edges: the drawing in this module's docstring is ROLLOUT_EDGES.drawing().
ROLLOUT_EDGES = Edges.declare("rollout", {
    RolloutState.PENDING: (RolloutState.RUNNING, RolloutState.WAITING, RolloutState.SUCCEEDED,
                           RolloutState.ABORTED, RolloutState.ROLLED_BACK),
    RolloutState.RUNNING: (RolloutState.WAITING, RolloutState.PAUSED, RolloutState.SUCCEEDED,
                           RolloutState.ABORTED, RolloutState.ROLLED_BACK),
    RolloutState.WAITING: (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.SUCCEEDED,
                           RolloutState.ABORTED, RolloutState.ROLLED_BACK),
    RolloutState.PAUSED: (RolloutState.RUNNING, RolloutState.ABORTED, RolloutState.ROLLED_BACK),
    RolloutState.SUCCEEDED: (RolloutState.ROLLED_BACK,),
    RolloutState.ABORTED: (RolloutState.ROLLED_BACK,),
    RolloutState.ROLLED_BACK: (RolloutState.ROLLED_BACK,),
})

# What a device's own report moves it to (``executor._reported``).
_ANSWERS = (DeviceState.UPDATING, DeviceState.PROBATION, DeviceState.SUCCEEDED,
            DeviceState.FAILED)
# A device's edges in a rollout: the drawing in this module's docstring is
# DEVICE_EDGES.drawing().
DEVICE_EDGES = Edges.declare("device", {
    DeviceState.PENDING: (DeviceState.TARGETED, DeviceState.SUCCEEDED, DeviceState.INCOMPATIBLE,
                          DeviceState.CANCELLED),
    DeviceState.TARGETED: (*_ANSWERS, DeviceState.TIMED_OUT, DeviceState.ROLLING_BACK),
    DeviceState.UPDATING: (DeviceState.PROBATION, DeviceState.SUCCEEDED, DeviceState.FAILED,
                           DeviceState.TIMED_OUT, DeviceState.ROLLING_BACK),
    DeviceState.PROBATION: (DeviceState.COMMITTING, DeviceState.SUCCEEDED, DeviceState.FAILED,
                            DeviceState.ROLLING_BACK),
    DeviceState.COMMITTING: (DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.TIMED_OUT,
                             DeviceState.ROLLING_BACK),
    DeviceState.SUCCEEDED: (DeviceState.ROLLING_BACK,),
    DeviceState.FAILED: (DeviceState.UPDATING, DeviceState.PROBATION, DeviceState.ROLLING_BACK),
    DeviceState.TIMED_OUT: (*_ANSWERS, DeviceState.ROLLING_BACK),
    DeviceState.ROLLING_BACK: (DeviceState.ROLLED_BACK, DeviceState.FAILED),
})

# Devices the rollout sent something to and is still waiting on.
ACTIVE = frozenset({DeviceState.TARGETED, DeviceState.UPDATING, DeviceState.PROBATION,
                    DeviceState.COMMITTING})
# Devices whose part in the current wave is over.
DONE = frozenset({DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.TIMED_OUT,
                  DeviceState.INCOMPATIBLE, DeviceState.CANCELLED, DeviceState.ROLLED_BACK,
                  DeviceState.ROLLING_BACK})
# Devices that were sent the bundle: the ones a rollback must return.
TOUCHED = ACTIVE | {DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.TIMED_OUT,
                    DeviceState.ROLLING_BACK}


@dataclass(frozen=True)
class RolloutDevice:
    """One device's part in a rollout."""

    device: str
    wave: int
    state: DeviceState = DeviceState.PENDING
    since_ms: int = 0  # when it entered ``state``
    targeted_ms: int = 0  # when the bundle was sent (0: not yet)
    sent_ms: int = 0  # when the last desired state (install, commit, rollback) was sent
    reason: str = ""
    previous: BundleRef | None = None  # what it ran before (the rollback target)

    def moved(self, state: DeviceState, now_ms: int, reason: str = "") -> RolloutDevice:
        return replace(self, state=state, since_ms=now_ms, reason=reason)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "wave": self.wave, "state": self.state.value,
                "since_ms": self.since_ms, "targeted_ms": self.targeted_ms,
                "sent_ms": self.sent_ms,
                "reason": self.reason, "previous": ref_to_dict(self.previous)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutDevice:
        return cls(device=str(data["device"]), wave=int(data["wave"]),
                   state=DeviceState(data["state"]), since_ms=int(data.get("since_ms", 0)),
                   targeted_ms=int(data.get("targeted_ms", 0)),
                   sent_ms=int(data.get("sent_ms", 0)),
                   reason=str(data.get("reason", "")),
                   previous=ref_from_dict(data.get("previous")))


@dataclass(frozen=True)
class Rollout:
    id: str
    spec: RolloutSpec
    state: RolloutState = RolloutState.PENDING
    wave: int = 0
    wave_started_ms: int = 0
    started_in_wave: int = 0  # devices sent the bundle in the current wave (rate limit)
    reason: str = ""
    created_ms: int = 0
    updated_ms: int = 0
    created_by: str = ""
    devices: Mapping[str, RolloutDevice] = field(default_factory=dict)
    # WAITING: when its schedule opens next (0: not waiting, or never); set by every tick
    waiting_until_ms: int = 0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.devices.values():
            counts[item.state.value] = counts.get(item.state.value, 0) + 1
        return counts

    def summary(self) -> dict[str, Any]:
        """The rollout without its device list."""
        return {"id": self.id, "spec": self.spec.as_dict(), "state": self.state.value,
                "wave": self.wave, "waves": len(self.spec.waves),
                "wave_started_ms": self.wave_started_ms, "started_in_wave": self.started_in_wave,
                "reason": self.reason, "created_ms": self.created_ms,
                "updated_ms": self.updated_ms, "created_by": self.created_by,
                "counts": self.counts(), "total": len(self.devices),
                "waiting_until_ms": self.waiting_until_ms}

    def as_dict(self) -> dict[str, Any]:
        return {**self.summary(),
                "devices": [d.as_dict() for d in sorted(self.devices.values(),
                                                        key=lambda d: (d.wave, d.device))]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rollout:
        devices = [RolloutDevice.from_dict(d) for d in data.get("devices", [])]
        return cls(id=str(data["id"]), spec=RolloutSpec.from_dict(data["spec"]),
                   state=RolloutState(data["state"]), wave=int(data.get("wave", 0)),
                   wave_started_ms=int(data.get("wave_started_ms", 0)),
                   started_in_wave=int(data.get("started_in_wave", 0)),
                   reason=str(data.get("reason", "")), created_ms=int(data.get("created_ms", 0)),
                   updated_ms=int(data.get("updated_ms", 0)),
                   created_by=str(data.get("created_by", "")),
                   waiting_until_ms=int(data.get("waiting_until_ms") or 0),
                   devices={d.device: d for d in devices})
