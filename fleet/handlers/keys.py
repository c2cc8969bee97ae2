"""Who may act and what devices trust: the caller's token, the controller's tokens (names
and roles, never secrets) and the fleet keyring."""

from __future__ import annotations

import json

from edgefleet.agent.protocol.keyring import MAX_KEYRING_BYTES
from edgefleet.fleet import access
from edgefleet.fleet.access import Actor, TokenRole
from edgefleet.fleet.errors import NotFoundError
from edgefleet.fleet.handlers._exchange import Call, Exchange

__all__ = ["keyring", "publish_keyring", "tokens", "whoami"]


def whoami(ex: Exchange, call: Call) -> None:
    actor = call.actor
    role = actor.role.value if isinstance(actor, Actor) else TokenRole.ADMIN.value
    ex.send_json({"name": str(actor), "role": role})


def tokens(ex: Exchange, call: Call) -> None:
    ex.send_json(access.describe_tokens(ex.server.tokens))


def keyring(ex: Exchange, call: Call) -> None:
    held = ex.controller.keyring()
    if held is None:
        raise NotFoundError("this controller holds no keyring yet",
                            hint="write one with 'edgefleet keys rotate', then "
                                 "'edgefleet fleet keyring publish'")
    ex.send_json({**held.summary(), "document": json.loads(held.raw)})


def publish_keyring(ex: Exchange, call: Call) -> None:
    force = call.query.get("force", ["0"])[0] in ("1", "true")
    raw = ex.read_body(MAX_KEYRING_BYTES)
    ex.send_json(ex.controller.publish_keyring(raw, call.actor, force))
