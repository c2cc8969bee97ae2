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

__all__ = ["MAX_ENTRIES", "TERMINAL", "TRANSITIONS", "Event", "Journal", "State", "next_state"]

MAX_ENTRIES = 5


class State(str, Enum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    HEALTH_CHECK = "HEALTH_CHECK"
    SWITCHING = "SWITCHING"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"


class Event(str, Enum):
    DESIRED = "DESIRED"  # a new target arrived
    OK = "OK"  # the step of the current state succeeded
    FAILURE = "FAILURE"  # the step failed (or the state was re-entered too often)
    COMMIT = "COMMIT"  # the fleet, or the end of an auto-commit window, says keep it
    ROLLBACK = "ROLLBACK"  # the fleet says go back
    GIVE_UP = "GIVE_UP"  # a rollback that keeps failing: stop, report, keep serving


TERMINAL = frozenset({State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.FAILED})
_BEFORE_SWITCH = (State.DOWNLOADING, State.VERIFYING, State.STAGED, State.HEALTH_CHECK)

TRANSITIONS: dict[tuple[State, Event], State] = {
    **{(s, Event.DESIRED): State.DOWNLOADING for s in TERMINAL},
    (State.DOWNLOADING, Event.OK): State.VERIFYING,
    (State.VERIFYING, Event.OK): State.STAGED,
    (State.STAGED, Event.OK): State.HEALTH_CHECK,
    (State.HEALTH_CHECK, Event.OK): State.SWITCHING,
    (State.SWITCHING, Event.OK): State.PROBATION,
    **{(s, Event.FAILURE): State.FAILED for s in _BEFORE_SWITCH},
    # a new target while still before the switch replaces the old one
    **{(s, Event.DESIRED): State.DOWNLOADING for s in _BEFORE_SWITCH},
    (State.SWITCHING, Event.FAILURE): State.ROLLING_BACK,
    (State.PROBATION, Event.COMMIT): State.COMMITTED,
    (State.PROBATION, Event.ROLLBACK): State.ROLLING_BACK,
    (State.PROBATION, Event.FAILURE): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.OK): State.ROLLED_BACK,
    (State.ROLLING_BACK, Event.FAILURE): State.ROLLING_BACK,  # retried: never left half-way
    (State.ROLLING_BACK, Event.GIVE_UP): State.FAILED,  # after MAX_ENTRIES tries
    (State.COMMITTED, Event.ROLLBACK): State.ROLLING_BACK,  # one-command rollback
}


def next_state(state: State, event: Event) -> State | None:
    """The state ``event`` leads to from ``state``, or None when the table has no edge."""
    return TRANSITIONS.get((state, event))


@dataclass(frozen=True)
class Journal:
    """What survives a crash: the state, its target, and how often each state was entered."""

    state: State = State.IDLE
    target: dict[str, object] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)
    detail: str = ""
    since: int = 0

    def enter(self, state: State, now_ms: int, detail: str = "") -> Journal:
        counts = dict(self.entries)
        counts[state.value] = counts.get(state.value, 0) + 1
        if state in TERMINAL or (state == State.DOWNLOADING and self.state in TERMINAL):
            counts = {state.value: 1}
        return replace(self, state=state, entries=counts, detail=detail, since=now_ms)

    def looping(self) -> bool:
        """Entered the current state too often: a crash loop."""
        return self.entries.get(self.state.value, 0) > MAX_ENTRIES

    def to_dict(self) -> dict[str, object]:
        return {"state": self.state.value, "target": self.target, "entries": self.entries,
                "detail": self.detail, "since": self.since}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Journal:
        entries = data.get("entries") or {}
        target = data.get("target") or {}
        return cls(State(str(data.get("state", "IDLE"))),
                   dict(target) if isinstance(target, dict) else {},
                   {str(k): int(v) for k, v in entries.items()}
                   if isinstance(entries, dict) else {},
                   str(data.get("detail", "")), int(str(data.get("since", 0))))
