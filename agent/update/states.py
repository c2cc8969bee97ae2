"""The update flow as a pure transition table: ``TRANSITIONS[(state, event)] -> state``.

::

    IDLE -> DOWNLOADING -> VERIFYING -> STAGED -> HEALTH_CHECK -> SWITCHING -> PROBATION
              |              |           |           |               |            |
              +--------------+-----------+-----------+--> FAILED     |        COMMITTED
                                                                     +--> ROLLING_BACK
                                                                            -> ROLLED_BACK

Before the switch a failure ends in ``FAILED`` with the old model untouched;
from the switch on it ends in ``ROLLING_BACK`` and then ``ROLLED_BACK``. A
state entered more than ``MAX_ENTRIES`` times (a crash loop replaying the
journal) counts as a failure. No I/O here: see ``agent.update.flow``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from edgefleet.agent.protocol.update_state import UpdateState
from edgefleet.agent.update.target import UpdateTarget

__all__ = ["MAX_ENTRIES", "TERMINAL", "TRANSITIONS", "Event", "Journal", "UpdateState",
           "next_state"]

MAX_ENTRIES = 5


class Event(str, Enum):
    DESIRED = "DESIRED"  # a new target arrived
    OK = "OK"  # the step of the current state succeeded
    FAILURE = "FAILURE"  # the step failed (or the state was re-entered too often)
    COMMIT = "COMMIT"  # the fleet, or the end of an auto-commit window, says keep it
    ROLLBACK = "ROLLBACK"  # the fleet says go back
    GIVE_UP = "GIVE_UP"  # a rollback that keeps failing: stop, report, keep serving


TERMINAL = frozenset({UpdateState.IDLE, UpdateState.COMMITTED, UpdateState.ROLLED_BACK,
                      UpdateState.FAILED})
_BEFORE_SWITCH = (UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.STAGED,
                  UpdateState.HEALTH_CHECK)

TRANSITIONS: dict[tuple[UpdateState, Event], UpdateState] = {
    **{(s, Event.DESIRED): UpdateState.DOWNLOADING for s in TERMINAL},
    (UpdateState.DOWNLOADING, Event.OK): UpdateState.VERIFYING,
    (UpdateState.VERIFYING, Event.OK): UpdateState.STAGED,
    (UpdateState.STAGED, Event.OK): UpdateState.HEALTH_CHECK,
    (UpdateState.HEALTH_CHECK, Event.OK): UpdateState.SWITCHING,
    (UpdateState.SWITCHING, Event.OK): UpdateState.PROBATION,
    **{(s, Event.FAILURE): UpdateState.FAILED for s in _BEFORE_SWITCH},
    # a new target while still before the switch replaces the old one
    **{(s, Event.DESIRED): UpdateState.DOWNLOADING for s in _BEFORE_SWITCH},
    (UpdateState.SWITCHING, Event.FAILURE): UpdateState.ROLLING_BACK,
    (UpdateState.PROBATION, Event.COMMIT): UpdateState.COMMITTED,
    (UpdateState.PROBATION, Event.ROLLBACK): UpdateState.ROLLING_BACK,
    (UpdateState.PROBATION, Event.FAILURE): UpdateState.ROLLING_BACK,
    (UpdateState.ROLLING_BACK, Event.OK): UpdateState.ROLLED_BACK,
    # a failed rollback is retried: never left half-way
    (UpdateState.ROLLING_BACK, Event.FAILURE): UpdateState.ROLLING_BACK,
    (UpdateState.ROLLING_BACK, Event.GIVE_UP): UpdateState.FAILED,  # after MAX_ENTRIES tries
    (UpdateState.COMMITTED, Event.ROLLBACK): UpdateState.ROLLING_BACK,  # one-command rollback
}


def next_state(state: UpdateState, event: Event) -> UpdateState | None:
    """The state ``event`` leads to from ``state``, or None when the table has no edge."""
    return TRANSITIONS.get((state, event))


@dataclass(frozen=True)
class Journal:
    """What survives a crash: the state, its target, and how often each state was entered."""

    state: UpdateState = UpdateState.IDLE
    target: UpdateTarget = field(default_factory=UpdateTarget)
    entries: dict[str, int] = field(default_factory=dict)
    detail: str = ""
    since: int = 0

    def enter(self, state: UpdateState, now_ms: int, detail: str = "") -> Journal:
        counts = dict(self.entries)
        counts[state.value] = counts.get(state.value, 0) + 1
        if state in TERMINAL or (state == UpdateState.DOWNLOADING and self.state in TERMINAL):
            counts = {state.value: 1}
        return replace(self, state=state, entries=counts, detail=detail, since=now_ms)

    def looping(self) -> bool:
        """Entered the current state too often: a crash loop."""
        return self.entries.get(self.state.value, 0) > MAX_ENTRIES

    def to_dict(self) -> dict[str, object]:
        return {"state": self.state.value, "target": self.target.to_dict(),
                "entries": self.entries, "detail": self.detail, "since": self.since}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Journal:
        entries = data.get("entries") or {}
        target = data.get("target") or {}
        return cls(UpdateState(str(data.get("state", UpdateState.IDLE.value))),
                   UpdateTarget.from_dict(target) if isinstance(target, dict)
                   else UpdateTarget(),
                   {str(k): int(v) for k, v in entries.items()}
                   if isinstance(entries, dict) else {},
                   str(data.get("detail", "")), int(str(data.get("since", 0))))
