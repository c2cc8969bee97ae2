"""Drive the update state machine: one action per state, all I/O behind a Controller.

The journal is saved before every step, so a process killed at any point
resumes from the step it was in (every action is idempotent). A state entered
more than ``MAX_ENTRIES`` times counts as a failure, which rolls back or fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.update.states import TERMINAL, Event, Journal, State, next_state

__all__ = ["Controller", "Updater"]

log = logging.getLogger(__name__)


class Controller(Protocol):
    """Everything the flow needs from the world; tests pass a fake."""

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

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self._actions: dict[State, Callable[[Journal], Event]] = {
            State.DOWNLOADING: self._do(controller.download),
            State.VERIFYING: self._do(controller.verify),
            State.STAGED: self._do(controller.stage),
            State.HEALTH_CHECK: self._do(controller.health_check),
            State.SWITCHING: self._do(controller.switch),
            State.PROBATION: controller.probation,
            State.ROLLING_BACK: self._do(controller.rollback),
        }

    @staticmethod
    def _do(action: Callable[[Journal], None]) -> Callable[[Journal], Event]:
        def run(journal: Journal) -> Event:
            action(journal)
            return Event.OK

        return run

    def start(self, journal: Journal, target: dict[str, object]) -> Journal:
        """A new target: from a terminal state (or before the switch) into DOWNLOADING."""
        state = next_state(journal.state, Event.DESIRED)
        if state is None:
            raise EdgefleetError(f"cannot start an update while {journal.state.value}",
                                 hint="wait for the current update to commit or roll back",
                                 transient=True)
        fresh = Journal(target=target).enter(state, self.c.now_ms())
        return self._enter(fresh)

    def run(self, journal: Journal) -> Journal:
        """Step until a terminal state; entering COMMITTED commits."""
        while journal.state not in TERMINAL:
            journal = self.step(journal)
        return journal

    def step(self, journal: Journal) -> Journal:
        """Do the current state's action and move along the table."""
        if journal.looping():
            event = Event.GIVE_UP if journal.state == State.ROLLING_BACK else Event.FAILURE
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
        moved = journal.enter(state, self.c.now_ms(), detail)
        if state == State.COMMITTED:
            self.c.commit(moved)
        return self._enter(moved)

    def _enter(self, journal: Journal) -> Journal:
        self.c.save(journal)
        self.c.report(journal)
        return journal

    def resume(self, journal: Journal) -> Journal:
        """After a restart: count the re-entry of the journalled state, then carry on."""
        if journal.state in TERMINAL:
            return journal
        return self.run(self._enter(journal.enter(journal.state, self.c.now_ms(),
                                                  "resumed after restart")))
