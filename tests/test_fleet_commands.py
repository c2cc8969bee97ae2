"""The one table of rollout commands: an operator's command runs from it here, and a
follower's relayed request is served from it on the leader, for every kind it declares."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.fleet import relay
from edgefleet.fleet.control.commands import COMMANDS, KINDS
from edgefleet.fleet.control.dispatch import CommandDesk
from edgefleet.fleet.control.role import SingleRole
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.errors import NotFoundError
from edgefleet.fleet.lease import Fence
from edgefleet.fleet.relay import DONE, FAILED, OperatorRequest
from edgefleet.fleet.rollout.spec import RolloutSpec, Selector
from edgefleet.fleet.rollout.state import Rollout
from edgefleet.fleet.store import open_store

# one body per kind, as the controller's public methods build them
BODIES: dict[str, dict[str, Any]] = {
    "rollout.create": {"model": "digits:2.0.0", "options": {"selectors": ["group:cams"]}},
    "rollout.operate": {"rollout": "r7", "verb": "pause"},
    "fleet.rollback": {"group": "cams"},
}
SPEC = RolloutSpec(model=BundleRef(name="digits", version="2.0.0", sha256="a" * 64),
                   url="http://c/b.efb", size=100, selectors=(Selector("group", "cams"),))


class RecordingActions:
    """Answers every command with a rollout and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def create_rollout(self, model_key: str, options: dict[str, Any], actor: str) -> Rollout:
        self.calls.append(("rollout.create", (model_key, options, actor)))
        return Rollout("r1", SPEC, created_by=actor)

    def operate(self, rollout_id: str, verb: str, actor: str) -> Rollout:
        self.calls.append(("rollout.operate", (rollout_id, verb, actor)))
        return Rollout(rollout_id, SPEC, created_by=actor)

    def rollback_group(self, group: str, actor: str) -> list[Rollout]:
        self.calls.append(("fleet.rollback", (group, actor)))
        if group == "empty":
            raise NotFoundError(f"group {group!r} has no devices")
        return [Rollout("r1", SPEC), Rollout("r2", SPEC)]


class ServingRole(SingleRole):
    """The leader: keeps every outcome it would write back to the store."""

    def __init__(self) -> None:
        super().__init__("leader", lambda: None)
        self.finished: list[tuple[bool, Any]] = []

    def finish(self, request: OperatorRequest, ok: bool, result: Any) -> None:
        self.finished.append((ok, result))


class InstantLeaderStore:
    """A relay store whose leader serves each request, through JSON, as it is queued."""

    def __init__(self, leader: RecordingActions) -> None:
        self.role = ServingRole()
        self.desk = CommandDesk(leader, self.role)
        self.requests: dict[int, OperatorRequest] = {}

    def submit_request(self, kind: str, body: dict[str, Any], actor: str,
                       now_ms: int) -> int:
        request = OperatorRequest(len(self.requests) + 1, kind, json.loads(json.dumps(body)),
                                  actor)
        self.desk.serve(request)
        ok, result = self.role.finished.pop()
        self.requests[request.id] = replace(request, state=DONE if ok else FAILED,
                                            result=json.loads(json.dumps(result)))
        return request.id

    def request(self, request_id: int) -> OperatorRequest | None:
        return self.requests.get(request_id)

    def withdraw_request(self, request_id: int) -> bool:
        return False

    def take_requests(self, fence: Fence, taker: str) -> list[OperatorRequest]:
        return []

    def finish_request(self, request_id: int, ok: bool, result: Any) -> None:
        return None


class RelayingRole(SingleRole):
    """A follower: every command goes to the leader through :func:`relay.relay`."""

    relays = True

    def __init__(self, leader: RecordingActions) -> None:
        super().__init__("follower", lambda: None)
        self.store, self.kinds = InstantLeaderStore(leader), list[str]()

    def relay(self, kind: str, body: dict[str, Any], actor: str) -> Any:
        self.kinds.append(kind)
        return relay.relay(self.store, kind, body, actor, 0, timeout_s=1.0)


def test_the_relay_knows_exactly_the_kinds_of_the_command_table() -> None:
    assert relay.KINDS == KINDS == tuple(COMMANDS)
    assert set(BODIES) == set(COMMANDS), "every kind needs a body here"


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_runs_alike_here_and_relayed_to_the_leader(kind: str) -> None:
    here = RecordingActions()
    local = CommandDesk(here, SingleRole("", lambda: None)).submit(
        COMMANDS[kind], BODIES[kind], "alice")
    there, idle = RecordingActions(), RecordingActions()
    relayed = CommandDesk(idle, RelayingRole(there)).submit(COMMANDS[kind], BODIES[kind],
                                                            "alice")
    assert [k for k, _ in here.calls] == [kind]
    assert here.calls == there.calls
    assert idle.calls == []  # a follower runs nothing itself
    assert COMMANDS[kind].to_wire(relayed) == COMMANDS[kind].to_wire(local)


def test_a_refusal_on_the_leader_reaches_the_follower_as_the_same_error() -> None:
    follower = CommandDesk(RecordingActions(), RelayingRole(RecordingActions()))
    with pytest.raises(NotFoundError, match="has no devices"):
        follower.submit(COMMANDS["fleet.rollback"], {"group": "empty"}, "alice")


def test_an_unknown_kind_is_refused_by_the_leader() -> None:
    role = ServingRole()
    CommandDesk(RecordingActions(), role).serve(OperatorRequest(1, "rollout.explode", {}, "bob"))
    assert role.finished == [(False, {"error": "unknown request kind 'rollout.explode'",
                                      "hint": "controllers of different versions?",
                                      "kind": "InvalidRolloutError"})]


def test_the_controller_sends_every_rollout_command_through_the_table(tmp_path: Path) -> None:
    config = ControllerConfig(fleet="f", broker_url="mqtt://127.0.0.1:1",
                              data_dir=tmp_path / "controller",
                              public_url="http://127.0.0.1:1", trusted=TrustedKeys({}))
    controller = FleetController(config, open_store(f"sqlite:///{tmp_path / 'fleet.db'}"))
    leader = RecordingActions()
    role = RelayingRole(leader)
    controller.commands = CommandDesk(RecordingActions(), role)
    controller.create_rollout("digits:2.0.0", {"selectors": ["group:cams"]}, "alice")
    controller.operate("r7", "pause", "alice")
    controller.rollback_group("cams", "alice")
    assert role.kinds == list(KINDS)
    assert [(k, args) for k, args in leader.calls] == [
        ("rollout.create", ("digits:2.0.0", {"selectors": ["group:cams"]}, "alice")),
        ("rollout.operate", ("r7", "pause", "alice")),
        ("fleet.rollback", ("cams", "alice"))]
