"""Runs an operator's rollout command where it belongs: here when this controller leads,
else relayed to the leader (:mod:`edgefleet.fleet.relay`); and, on the leader, runs the
commands followers relayed. Both ways go through the one table,
:data:`edgefleet.fleet.control.commands.COMMANDS`."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.fleet.access import ROLE_KEY, Actor, TokenRole, actor_role
from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.commands import COMMANDS, Command, RolloutActions
from edgefleet.fleet.control.role import Role
from edgefleet.fleet.errors import InvalidRolloutError
from edgefleet.fleet.relay import OperatorRequest, error_result

__all__ = ["CommandDesk"]

log = logging.getLogger(CONTROLLER_LOG)
Answer = TypeVar("Answer")


class CommandDesk:
    """Submits commands (an operator's, here) and serves them (a follower's, relayed)."""

    def __init__(self, actions: RolloutActions, role: Role) -> None:
        self.actions, self.role = actions, role

    def submit(self, command: Command[Answer], body: dict[str, Any], actor: str) -> Answer:
        """Run ``command`` here, or on the leader when this controller follows."""
        if self.role.relays:  # the leader audits the token's role too: it travels along
            role = actor_role(actor)
            sent = {**body, ROLE_KEY: role.value} if role else body
            return command.from_wire(self.role.relay(command.kind, sent, actor))
        return command.run(self.actions, body, actor)

    def serve(self, request: OperatorRequest) -> None:
        """A request a follower relayed, run as if asked here; the outcome goes back."""
        try:
            command = COMMANDS.get(request.kind)
            if command is None:
                raise InvalidRolloutError(f"unknown request kind {request.kind!r}",
                                          hint="controllers of different versions?")
            result: Any = command.to_wire(command.run(self.actions, request.body,
                                                      _actor(request)))
            ok = True
        except EdgefleetError as exc:
            result, ok = error_result(exc), False
        except Exception as exc:  # the outcome must reach the operator whatever happened
            log.exception("relayed request %d failed", request.id)
            result, ok = {"error": f"internal error: {type(exc).__name__}: {exc}",
                          "hint": "see the leader's log", "kind": "FleetError"}, False
        self.role.finish(request, ok, result)


def _actor(request: OperatorRequest) -> str:
    """The relayed request's actor, with the role its token had on the follower."""
    role = request.body.get(ROLE_KEY)
    if role in {r.value for r in TokenRole}:
        return Actor(request.actor, TokenRole(role))
    return request.actor
