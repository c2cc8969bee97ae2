"""Rollouts: listed and read, created from a pushed model version, operated (pause,
resume, abort, rollback), and a group's rollouts rolled back."""

from __future__ import annotations

from http import HTTPStatus

from edgefleet.fleet.handlers import _checks as check
from edgefleet.fleet.handlers._exchange import Call, Exchange

__all__ = ["create_rollout", "operate", "rollback_group", "rollout", "rollouts"]


def rollouts(ex: Exchange, call: Call) -> None:
    ex.send_json([r.summary() for r in ex.controller.rollouts()])


def rollout(ex: Exchange, call: Call) -> None:
    ex.send_json(ex.controller.rollout(call.rollout_id()).as_dict())


def create_rollout(ex: Exchange, call: Call) -> None:
    body = ex.read_json()
    options = {k: v for k, v in body.items() if k != "model"}
    created = ex.controller.create_rollout(check.model_key(body.get("model")), options,
                                           call.actor)
    ex.send_json(created.as_dict(), HTTPStatus.CREATED)


def operate(ex: Exchange, call: Call, verb: str) -> None:
    """pause, resume, abort or rollback; they take no options (no body, or ``{}``)."""
    if given := ex.read_json():
        raise check.invalid(f"{verb} takes no options, got {', '.join(sorted(given))[:80]}")
    ex.send_json(ex.controller.operate(call.rollout_id(), verb, call.actor).as_dict())


def rollback_group(ex: Exchange, call: Call) -> None:
    body = check.only(ex.read_json(), ("group",), "a group rollback")
    done = ex.controller.rollback_group(check.label(body.get("group"), "group"), call.actor)
    ex.send_json([r.summary() for r in done])
