"""Over-the-air updates: follow the retained desired state on a worker thread.

A new target (another bundle than the active one) or a new attempt (another rollout,
see :mod:`edgefleet.agent.update.attempts`) starts the flow; ``commit`` and ``rollback``
actions settle a probation, and ``rollback`` on a committed update returns to the
previous committed bundle (a rollback with nothing to return to is refused, and
changes nothing). A journal left in flight by a crash is resumed when the runner
starts, after what killed runs left in the data dir is swept. Inference never waits on
any of it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.payloads import DesiredState
from edgefleet.agent.update.attempts import starts_attempt
from edgefleet.agent.update.device import DeviceEffects, UpdateSettings, load_journal
from edgefleet.agent.update.flow import Updater
from edgefleet.agent.update.states import TERMINAL, Event, Journal, UpdateState
from edgefleet.agent.update.target import UpdateTarget

__all__ = ["UpdateRunner"]

log = logging.getLogger(__name__)
Job = Callable[[], object]
_WORDS = {"commit": Event.COMMIT, "rollback": Event.ROLLBACK}  # the fleet's word on a probation


class UpdateRunner:
    """One worker thread that applies desired states in order."""

    def __init__(self, data_dir: Path, agent: Agent, settings: UpdateSettings,
                 on_journal: Callable[[Journal], None] = lambda journal: None) -> None:
        self.effects = DeviceEffects(data_dir, agent, settings, self._journalled)
        self.updater = Updater(self.effects)
        self.journal = load_journal(self.effects.journal_path)
        self.effects.sweep(self.journal)
        self._on_journal = on_journal
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._busy = False
        self._thread = threading.Thread(target=self._work, name="edgefleet-update", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if self.journal.state not in TERMINAL:
            journal = self.journal
            self._queue.put(lambda: self.updater.resume(journal))

    def stop(self) -> None:
        self._queue.put(None)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return self._queue.empty() and not self._busy

    def desired(self, desired: DesiredState) -> None:
        """Called on the MQTT thread: settle probation now, queue everything else."""
        in_flight = self.journal.state not in TERMINAL
        same = self.journal.target.sha256 == desired.sha256
        word = _WORDS.get(desired.action)
        if word is not None and in_flight and same:
            self.effects.decide(word, desired.sha256)  # kept until its probation takes it
        else:
            self._queue.put(lambda: self._apply(desired))

    def _journalled(self, journal: Journal) -> None:
        self.journal = journal
        self._on_journal(journal)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            self._busy = True
            try:
                job()
            except EdgefleetError as exc:  # e.g. a full disk while saving the journal
                log.error("update step failed: %s", exc)
            except Exception:  # the worker must survive anything and keep serving
                log.exception("update step failed")
            finally:
                self._busy = False

    def _apply(self, desired: DesiredState) -> None:
        model = self.effects.agent.model
        active_sha = model.bundle.sha256 if model is not None else None
        if desired.action == "rollback":
            if self.journal.state == UpdateState.COMMITTED and active_sha == desired.sha256:
                self._roll_back()
            return
        if not starts_attempt(self.journal, desired, active_sha):
            return  # already there, already on the way, or this attempt was made
        self.effects.forget_decision()
        word = _WORDS.get(desired.action)
        if word is not None:  # the fleet decided already (e.g. a retained commit after the
            self.effects.decide(word, desired.sha256)  # model was removed): kept for probation
        self.updater.run(self.updater.start(self.journal, UpdateTarget.from_desired(desired)))

    def _roll_back(self) -> None:
        """The fleet's rollback of a committed update; with nothing to go back to, it is
        logged and the update state stays as it is."""
        try:
            self.effects.slots.rollback_target()
        except EdgefleetError as exc:
            log.warning("rollback asked for by the fleet refused: %s", exc)
            return
        self.updater.run(self.updater.move(self.journal, Event.ROLLBACK,
                                           "rollback asked for by the fleet"))
