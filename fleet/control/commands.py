"""The operator commands that change rollouts, declared once for both ways they run.

Rollouts have one writer (the leader). An operator's rollout action is therefore a
command of a kind in :data:`COMMANDS`: on the controller that leads it runs here; on a
follower it is relayed through the store (:mod:`edgefleet.fleet.relay`) and the leader
runs the very same entry. Each entry says how its JSON body becomes a call of
:class:`RolloutActions` and how its answer crosses the store and back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from edgefleet.fleet.rollout.state import Rollout

__all__ = ["COMMANDS", "CREATE_ROLLOUT", "KINDS", "OPERATE_ROLLOUT", "ROLLBACK_GROUP",
           "Command", "RolloutActions"]

Answer = TypeVar("Answer")


class RolloutActions(Protocol):
    """What the leader does for a command (:class:`edgefleet.fleet.control.actions.Actions`)."""

    def create_rollout(self, model_key: str, options: dict[str, Any], actor: str) -> Rollout: ...
    def operate(self, rollout_id: str, verb: str, actor: str) -> Rollout: ...
    def rollback_group(self, group: str, actor: str) -> list[Rollout]: ...


@dataclass(frozen=True)
class Command(Generic[Answer]):
    """One kind of command: how it runs from its body, and how its answer travels."""

    kind: str
    run: Callable[[RolloutActions, dict[str, Any], str], Answer]
    to_wire: Callable[[Answer], Any]
    from_wire: Callable[[Any], Answer]


def _rollout_to_wire(rollout: Rollout) -> dict[str, Any]:
    return rollout.as_dict()


def _rollouts_to_wire(rollouts: list[Rollout]) -> list[dict[str, Any]]:
    return [r.as_dict() for r in rollouts]


def _rollouts_from_wire(data: Any) -> list[Rollout]:
    return [Rollout.from_dict(r) for r in data]


CREATE_ROLLOUT: Command[Rollout] = Command(
    "rollout.create",
    lambda actions, body, actor: actions.create_rollout(str(body["model"]),
                                                        dict(body["options"]), actor),
    _rollout_to_wire, Rollout.from_dict)
OPERATE_ROLLOUT: Command[Rollout] = Command(
    "rollout.operate",
    lambda actions, body, actor: actions.operate(str(body["rollout"]), str(body["verb"]), actor),
    _rollout_to_wire, Rollout.from_dict)
ROLLBACK_GROUP: Command[list[Rollout]] = Command(
    "fleet.rollback",
    lambda actions, body, actor: actions.rollback_group(str(body["group"]), actor),
    _rollouts_to_wire, _rollouts_from_wire)

COMMANDS: dict[str, Command[Any]] = {
    command.kind: command for command in (CREATE_ROLLOUT, OPERATE_ROLLOUT, ROLLBACK_GROUP)}
KINDS = tuple(COMMANDS)
