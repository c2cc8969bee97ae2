"""Operator actions that reach a follower go to the leader through the store.

Rollouts have one writer, the leader (:mod:`edgefleet.fleet.lease`). A follower's API therefore
does not change a rollout itself: it queues the request (``requests`` table: kind,
arguments, the token's name), and the leader takes every queued request at its next
tick, runs it exactly as if it had been asked directly (same checks, same audit entry
under the operator's name) and writes the outcome back. The follower waits for that
outcome and answers with it, so to an operator every controller behaves alike; the
request costs one leader tick more.

Why the store and not an HTTP hop to the leader: the store is already the one thing
every controller reaches; the leader's address and tokens need not be known to the
followers; a request queued while no controller leads (a takeover in progress) is taken
by the next leader; and a request is taken by one leader only (the take is fenced like a
rollout save).

When no leader answers within the wait, the follower withdraws the request if it is
still queued (then nothing happened, and it says so); if a leader already took it, the
outcome is unknown and the error says where to look.

The kinds of request (:data:`KINDS`) are the command table's,
:data:`edgefleet.fleet.control.commands.COMMANDS`: the leader serves each one through
that table exactly as it runs the command asked of it directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.fleet.control.commands import KINDS
from edgefleet.fleet.errors import (
    AuthError,
    ConflictError,
    FleetError,
    InvalidRolloutError,
    NotFoundError,
    StoreError,
)
from edgefleet.fleet.lease import Fence, LeaseLostError

__all__ = ["KINDS", "OperatorRequest", "RelayStore", "error_result", "relay"]

QUEUED, TAKEN, DONE, FAILED, WITHDRAWN = "queued", "taken", "done", "failed", "withdrawn"
_POLL_S = 0.05
_ERRORS: dict[str, type[FleetError]] = {
    cls.__name__: cls for cls in (NotFoundError, ConflictError, InvalidRolloutError,
                                  AuthError, StoreError, LeaseLostError)}


@dataclass(frozen=True)
class OperatorRequest:
    id: int
    kind: str
    body: dict[str, Any]
    actor: str
    state: str = QUEUED
    result: Any = None  # the answer (DONE) or {"error", "hint", "kind"} (FAILED)
    created_ms: int = 0
    taken_by: str = ""


class RelayStore(Protocol):
    def submit_request(self, kind: str, body: dict[str, Any], actor: str,
                       now_ms: int) -> int: ...
    def request(self, request_id: int) -> OperatorRequest | None: ...
    def withdraw_request(self, request_id: int) -> bool: ...
    def take_requests(self, fence: Fence, taker: str) -> list[OperatorRequest]: ...
    def finish_request(self, request_id: int, ok: bool, result: Any) -> None: ...


def error_result(exc: EdgefleetError) -> dict[str, Any]:
    return {"error": exc.message, "hint": exc.hint, "kind": type(exc).__name__}


def relay(store: RelayStore, kind: str, body: dict[str, Any], actor: str, now_ms: int,
          timeout_s: float, sleep: Callable[[float], None] = time.sleep) -> Any:
    """Queue one request for the leader and return its answer (or raise its error)."""
    json.dumps(body)  # fail here, not in the store, on a body that is not JSON
    request_id = store.submit_request(kind, body, actor, now_ms)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = store.request(request_id)
        if found is not None and found.state in (DONE, FAILED):
            return _outcome(found)
        sleep(_POLL_S)
    if store.withdraw_request(request_id):
        raise LeaseLostError(f"no controller leads right now: the {kind} request was not "
                             f"taken within {timeout_s:g} s and is withdrawn (nothing "
                             "changed)", hint="retry in a few seconds; /healthz shows the "
                                              "leader")
    deadline = time.monotonic() + timeout_s  # taken: give the leader one more while
    while time.monotonic() < deadline:
        found = store.request(request_id)
        if found is not None and found.state in (DONE, FAILED):
            return _outcome(found)
        sleep(_POLL_S)
    raise FleetError(f"the leader took the {kind} request (#{request_id}) but did not answer "
                     f"within {2 * timeout_s:g} s: it may or may not have been applied",
                     hint="look before retrying: edgefleet fleet rollout list, "
                          "edgefleet fleet history")


def _outcome(request: OperatorRequest) -> Any:
    if request.state == DONE:
        return request.result
    result = request.result if isinstance(request.result, dict) else {}
    cls = _ERRORS.get(str(result.get("kind")), FleetError)
    raise cls(str(result.get("error") or f"the leader refused request #{request.id}"),
              hint=str(result.get("hint") or ""))
