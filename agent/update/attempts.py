"""Which desired state starts an update attempt, and which repeats one already made.

An *attempt* is identified by the desired state's ``rollout`` field (docs/protocol.md,
"Desired state"): the controller sends the same rollout id every time it repeats its word
(a retained message re-delivered, a controller restarted), and a new rollout has a new
id. ``issued_at`` only says when the word was written; it changes on a re-send and
identifies nothing. The rule, for an ``install`` of bundle ``S``:

==========================================  =========================================
the device                                  the install of S
==========================================  =========================================
serves S                                    ignored: already there
works on another bundle, or none            starts an attempt
FAILED on S                                 starts again (same attempt retried: a
                                            retained install re-delivered after a
                                            download gave up during a network cut)
COMMITTED / ROLLED_BACK / IDLE on S         starts only for another attempt (a new
                                            rollout); the same one is ignored, so a
                                            rolled-back bundle never returns by itself
on its way with S (DOWNLOADING..PROBATION)  ignored: already on the way
==========================================  =========================================
"""

from __future__ import annotations

from edgefleet.agent.protocol.payloads import DesiredState
from edgefleet.agent.update.states import Journal, UpdateState
from edgefleet.agent.update.target import UpdateTarget

__all__ = ["attempt_of", "starts_attempt"]

_SETTLED = frozenset({UpdateState.COMMITTED, UpdateState.ROLLED_BACK, UpdateState.IDLE})


def attempt_of(target: UpdateTarget) -> str | None:
    """The attempt a journal's target belongs to (its rollout id; None by hand)."""
    return target.rollout


def starts_attempt(journal: Journal, desired: DesiredState, active_sha: str | None) -> bool:
    """Whether the install ``desired`` starts an update now (the table above)."""
    if desired.sha256 == active_sha:
        return False
    if desired.sha256 != journal.target.sha256 or journal.state == UpdateState.FAILED:
        return True
    return journal.state in _SETTLED and desired.rollout != attempt_of(journal.target)
