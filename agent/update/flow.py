"""Drive the update state machine: one action per state, all I/O behind :class:`UpdateEffects`.

The journal is saved before every step, so a process killed at any point
resumes from the step it was in (every action is idempotent). A state entered
more than ``MAX_ENTRIES`` times counts as a failure, which rolls back or fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.update.states import TERMINAL, Event, Journal, UpdateState, next_state
from edgefleet.agent.update.target import UpdateTarget

__all__ = ["UpdateEffects", "Updater"]

log = logging.getLogger(__name__)


class UpdateEffects(Protocol):
    """What the flow does to the world, one method a step (download, verify, stage, ...),
    plus saving and reporting the journal and the clock. The device, the fleet simulator
    and tests each pass their own."""

    def download(self, journal: Journal) -> None: ...
    def verify(self, journal: Journal) -> None: ...
    def stage(self, journal: Journal) -> None: ...
    def health_check(self, journal: Journal) -> None: ...
    def switch(self, journal: Journal) -> None: ...
    def probation(self, journal: Journal) -> Event: ...
    def commit(self, journal: Journal) -> None: ...
    def rollback(self, journal: Journal) -> None: ...
    def save(self, journal: Journal) -> None: ...
    def report(self, journal: Journal) -> None: ...
    def now_ms(self) -> int: ...


class Updater:
    """Runs the flow from a journal to a terminal state."""

    def __init__(self, effects: UpdateEffects) -> None:
        self.effects = effects
        self._actions: dict[UpdateState, Callable[[Journal], Event]] = {
            UpdateState.DOWNLOADING: self._do(effects.download),
            UpdateState.VERIFYING: self._do(effects.verify),
            UpdateState.STAGED: self._do(effects.stage),
            UpdateState.HEALTH_CHECK: self._do(effects.health_check),
            UpdateState.SWITCHING: self._do(effects.switch),
            UpdateState.PROBATION: effects.probation,
            UpdateState.ROLLING_BACK: self._do(effects.rollback),
        }

    @staticmethod
    def _do(action: Callable[[Journal], None]) -> Callable[[Journal], Event]:
        def run(journal: Journal) -> Event:
            action(journal)
            return Event.OK

        return run

    def start(self, journal: Journal, target: UpdateTarget) -> Journal:
        """A new target: from a terminal state (or before the switch) into DOWNLOADING."""
        state = next_state(journal.state, Event.DESIRED)
        if state is None:
            raise EdgefleetError(f"cannot start an update while {journal.state.value}",
                                 hint="wait for the current update to commit or roll back",
                                 transient=True)
        fresh = Journal(target=target).enter(state, self.effects.now_ms())
        return self._enter(fresh)

    def run(self, journal: Journal) -> Journal:
        """Step until a terminal state; entering COMMITTED commits."""
        while journal.state not in TERMINAL:
            journal = self.step(journal)
        return journal

    def step(self, journal: Journal) -> Journal:
        """Do the current state's action and move along the table."""
        if journal.looping():
            event = Event.GIVE_UP if journal.state == UpdateState.ROLLING_BACK else Event.FAILURE
            return self._move(journal, event, f"{journal.state.value} re-entered "
                              f"{journal.entries.get(journal.state.value)} times")
        try:
            event = self._actions[journal.state](journal)
            detail = ""
        except EdgefleetError as exc:
            event, detail = Event.FAILURE, str(exc)
        except Exception as exc:  # a bug or an OS error must not leave the device half-way
            log.exception("update step %s failed", journal.state.value)
            event, detail = Event.FAILURE, f"{type(exc).__name__}: {exc}"
        return self._move(journal, event, detail)

    def move(self, journal: Journal, event: Event, detail: str = "") -> Journal:
        """Apply an outside event (commit or rollback asked for); refuse one with no edge."""
        if next_state(journal.state, event) is None:
            raise EdgefleetError(f"cannot {event.value.lower()} while {journal.state.value}",
                                 hint="see 'edgefleet agent status'")
        return self._move(journal, event, detail)

    def _move(self, journal: Journal, event: Event, detail: str) -> Journal:
        state = next_state(journal.state, event)
        if state is None:
            raise RuntimeError(f"no transition from {journal.state} on {event}")  # table bug
        moved = journal.enter(state, self.effects.now_ms(), detail)
        if state == UpdateState.COMMITTED:
            self.effects.commit(moved)
        return self._enter(moved)

    def _enter(self, journal: Journal) -> Journal:
        self.effects.save(journal)
        self.effects.report(journal)
        return journal

    def resume(self, journal: Journal) -> Journal:
        """After a restart: count the re-entry of the journalled state, then carry on."""
        if journal.state in TERMINAL:
            return journal
        return self.run(self._enter(journal.enter(journal.state, self.effects.now_ms(),
                                                  "resumed after restart")))
