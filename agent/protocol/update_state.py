"""The states of a device's update, as ``update.state`` of the reported state says them.

Both sides speak these: the agent's update flow moves through them
(:mod:`edgefleet.agent.update.states` holds its transition table) and the fleet's
registry and rollout executor read them. A ``str`` enum, so each member is its name on
the wire.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["UpdateState"]


class UpdateState(str, Enum):
    """Where a device's update is; ``IDLE`` before the first one."""

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
