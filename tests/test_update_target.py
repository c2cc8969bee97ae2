"""The typed update target: parsed once, and written back in the journal's JSON as before."""

from __future__ import annotations

import json

import pytest

from edgefleet.agent.protocol.payloads import DesiredState
from edgefleet.agent.update.states import Journal, UpdateState
from edgefleet.agent.update.target import UpdateTarget

SHA = "a" * 64
# What the journal held for each kind of target before it was typed, key order included.
OVER_THE_AIR = {"name": "digits", "version": "2.0.0", "sha256": SHA,
                "url": "https://c/b.efb", "size": 123, "rollout": "r1", "auto_commit": False}
OVER_THE_AIR_BY_HAND = {**OVER_THE_AIR, "rollout": None, "auto_commit": True}
LOCAL_INSTALL = {"name": "digits", "version": "2.0.0", "sha256": SHA, "url": "/b.efb",
                 "size": 0}
SIMULATED_FIRST = {"name": "digits", "version": "1.0.0", "sha256": SHA, "url": ""}


def test_the_fleets_install_becomes_the_target_the_journal_always_held() -> None:
    desired = DesiredState(name="digits", version="2.0.0", sha256=SHA, url="https://c/b.efb",
                           size=123, rollout="r1")
    assert json.dumps(UpdateTarget.from_desired(desired).to_dict()) == json.dumps(OVER_THE_AIR)


@pytest.mark.parametrize("stored", [OVER_THE_AIR, OVER_THE_AIR_BY_HAND, LOCAL_INSTALL, {}],
                         ids=["over-the-air", "no-rollout", "local", "none"])
def test_a_stored_target_is_written_back_byte_for_byte(stored: dict[str, object]) -> None:
    assert json.dumps(UpdateTarget.from_dict(stored).to_dict()) == json.dumps(stored)


def test_a_simulated_first_bundle_states_no_size_and_no_url() -> None:
    target = UpdateTarget.from_dict(SIMULATED_FIRST)
    assert (target.size, target.url) == (None, "")
    assert target.to_dict() == {k: v for k, v in SIMULATED_FIRST.items() if v}


def test_the_fleets_word_on_auto_commit_wins_over_the_devices_default() -> None:
    assert UpdateTarget(auto_commit=False).auto_commits(default=True) is False
    assert UpdateTarget(auto_commit=True).auto_commits(default=False) is True
    assert UpdateTarget().auto_commits(default=True) is True


def test_a_journal_with_its_target_round_trips_through_json() -> None:
    journal = Journal(UpdateState.PROBATION, UpdateTarget.from_dict(OVER_THE_AIR),
                      {"PROBATION": 1}, "", 7)
    text = json.dumps(journal.to_dict())
    assert json.loads(text)["target"] == OVER_THE_AIR
    assert Journal.from_dict(json.loads(text)) == journal
