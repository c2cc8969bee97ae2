"""The update state machine: every edge of the table, and the flow over fake effects."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.update.flow import Updater
from edgefleet.agent.update.states import (
    MAX_ENTRIES,
    TERMINAL,
    TRANSITIONS,
    Event,
    Journal,
    UpdateState,
    next_state,
)
from edgefleet.agent.update.target import UpdateTarget

S, E = UpdateState, Event

# Every edge, written out: the table must be exactly this.
EDGES = [
    (S.IDLE, E.DESIRED, S.DOWNLOADING),
    (S.COMMITTED, E.DESIRED, S.DOWNLOADING),
    (S.ROLLED_BACK, E.DESIRED, S.DOWNLOADING),
    (S.FAILED, E.DESIRED, S.DOWNLOADING),
    (S.DOWNLOADING, E.OK, S.VERIFYING),
    (S.VERIFYING, E.OK, S.STAGED),
    (S.STAGED, E.OK, S.HEALTH_CHECK),
    (S.HEALTH_CHECK, E.OK, S.SWITCHING),
    (S.SWITCHING, E.OK, S.PROBATION),
    (S.DOWNLOADING, E.FAILURE, S.FAILED),
    (S.VERIFYING, E.FAILURE, S.FAILED),
    (S.STAGED, E.FAILURE, S.FAILED),
    (S.HEALTH_CHECK, E.FAILURE, S.FAILED),
    (S.DOWNLOADING, E.DESIRED, S.DOWNLOADING),
    (S.VERIFYING, E.DESIRED, S.DOWNLOADING),
    (S.STAGED, E.DESIRED, S.DOWNLOADING),
    (S.HEALTH_CHECK, E.DESIRED, S.DOWNLOADING),
    (S.SWITCHING, E.FAILURE, S.ROLLING_BACK),
    (S.PROBATION, E.COMMIT, S.COMMITTED),
    (S.PROBATION, E.ROLLBACK, S.ROLLING_BACK),
    (S.PROBATION, E.FAILURE, S.ROLLING_BACK),
    (S.ROLLING_BACK, E.OK, S.ROLLED_BACK),
    (S.ROLLING_BACK, E.FAILURE, S.ROLLING_BACK),
    (S.ROLLING_BACK, E.GIVE_UP, S.FAILED),
    (S.COMMITTED, E.ROLLBACK, S.ROLLING_BACK),
]


@pytest.mark.parametrize(("state", "event", "expected"), EDGES,
                         ids=[f"{s.value}-{e.value}" for s, e, _ in EDGES])
def test_each_edge(state: UpdateState, event: Event, expected: UpdateState) -> None:
    assert next_state(state, event) == expected


def test_the_table_has_no_other_edge() -> None:
    assert set(TRANSITIONS) == {(s, e) for s, e, _ in EDGES}


@pytest.mark.parametrize("state", [S.SWITCHING, S.PROBATION, S.ROLLING_BACK])
def test_no_new_update_starts_after_the_switch(state: UpdateState) -> None:
    assert next_state(state, E.DESIRED) is None


def test_failure_before_the_switch_never_rolls_back() -> None:
    for state in (S.DOWNLOADING, S.VERIFYING, S.STAGED, S.HEALTH_CHECK):
        assert next_state(state, E.FAILURE) == S.FAILED


@dataclass
class FakeEffects:
    """Records calls; fails the named step; answers probation with ``verdict``."""

    fail: set[str] = field(default_factory=set)
    verdict: Event = Event.COMMIT
    calls: list[str] = field(default_factory=list)
    saved: list[UpdateState] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    clock: int = 0

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise EdgefleetError(f"{name} broke")

    def download(self, j: Journal) -> None: self._call("download")
    def verify(self, j: Journal) -> None: self._call("verify")
    def stage(self, j: Journal) -> None: self._call("stage")
    def health_check(self, j: Journal) -> None: self._call("health_check")
    def switch(self, j: Journal) -> None: self._call("switch")
    def commit(self, j: Journal) -> None: self._call("commit")

    def rollback(self, j: Journal) -> None:
        self.calls.append("rollback")
        if "rollback-always" in self.fail:
            raise EdgefleetError("rollback broke for good")
        if "rollback" in self.fail:
            self.fail.discard("rollback")  # fails once, succeeds on the retry
            raise EdgefleetError("rollback broke")

    def probation(self, j: Journal) -> Event:
        self.calls.append("probation")
        return self.verdict

    def save(self, j: Journal) -> None: self.saved.append(j.state)
    def report(self, j: Journal) -> None: self.details.append(j.detail)

    def now_ms(self) -> int:
        self.clock += 1
        return self.clock


def _run(fake: FakeEffects) -> Journal:
    updater = Updater(fake)
    return updater.run(updater.start(Journal(), UpdateTarget(version="2.0.0")))


def test_a_good_update_commits() -> None:
    fake = FakeEffects()
    assert _run(fake).state == S.COMMITTED
    assert fake.calls == ["download", "verify", "stage", "health_check", "switch", "probation",
                          "commit"]
    assert fake.saved[0] == S.DOWNLOADING and fake.saved[-1] == S.COMMITTED


@pytest.mark.parametrize("step", ["download", "verify", "stage", "health_check"])
def test_a_failure_before_the_switch_fails_without_touching_the_model(step: str) -> None:
    fake = FakeEffects(fail={step})
    journal = _run(fake)
    assert journal.state == S.FAILED and f"{step} broke" in journal.detail
    assert "switch" not in fake.calls and "rollback" not in fake.calls


def test_a_failed_switch_rolls_back() -> None:
    fake = FakeEffects(fail={"switch"})
    assert _run(fake).state == S.ROLLED_BACK
    assert fake.calls[-1] == "rollback"


@pytest.mark.parametrize("verdict", [Event.ROLLBACK, Event.FAILURE])
def test_probation_that_says_no_rolls_back(verdict: Event) -> None:
    fake = FakeEffects(verdict=verdict)
    assert _run(fake).state == S.ROLLED_BACK
    assert "commit" not in fake.calls


def test_a_failing_rollback_is_retried_until_done() -> None:
    fake = FakeEffects(fail={"switch", "rollback"})
    assert _run(fake).state == S.ROLLED_BACK
    assert fake.calls.count("rollback") == 2


def test_a_rollback_that_keeps_failing_gives_up_instead_of_looping() -> None:
    fake = FakeEffects(fail={"switch", "rollback-always"})
    journal = _run(fake)
    assert journal.state == S.FAILED
    assert fake.calls.count("rollback") == MAX_ENTRIES


def test_a_crash_loop_in_a_state_becomes_a_failure() -> None:
    fake = FakeEffects()
    updater = Updater(fake)
    journal = Journal(state=S.SWITCHING, target=UpdateTarget(version="2.0.0"))
    for _ in range(MAX_ENTRIES):  # the process died in SWITCHING again and again
        journal = journal.enter(S.SWITCHING, 0)
    final = updater.resume(journal)
    assert final.state == S.ROLLED_BACK
    assert any("SWITCHING re-entered 6 times" in d for d in fake.details)
    assert "switch" not in fake.calls, "a looping state is not tried again"
    assert fake.calls == ["rollback"]


def test_resume_runs_the_journalled_step_again() -> None:
    fake = FakeEffects()
    final = Updater(fake).resume(Journal(state=S.STAGED, target=UpdateTarget(version="2.0.0")))
    assert final.state == S.COMMITTED
    assert fake.calls[:2] == ["stage", "health_check"]


def test_terminal_states_resume_to_themselves() -> None:
    for state in TERMINAL:
        assert Updater(FakeEffects()).resume(Journal(state=state)).state == state


def test_no_update_starts_during_probation() -> None:
    with pytest.raises(EdgefleetError, match="cannot start an update while PROBATION"):
        Updater(FakeEffects()).start(Journal(state=S.PROBATION), UpdateTarget())


def test_journal_round_trips_through_json() -> None:
    journal = Journal(S.HEALTH_CHECK, UpdateTarget(version="1.2.3"), {"HEALTH_CHECK": 2}, "x", 9)
    assert Journal.from_dict(journal.to_dict()) == journal
