"""Model drift: the alerts firing now, and each model's alert policy (read by viewers,
changed by admins)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from edgefleet.fleet.controller import FleetController
from edgefleet.fleet.drift import DriftPolicy
from edgefleet.fleet.handlers import _checks as check
from edgefleet.fleet.handlers._exchange import Call, Exchange

__all__ = ["alerts", "drift", "set_drift_policy"]


def alerts(ex: Exchange, call: Call) -> None:
    view = ex.controller.drift_view()
    ex.send_json({"alerts": [a.as_dict() for a in view.alerts], "summary": view.summary})


def drift(ex: Exchange, call: Call) -> None:
    ex.send_json({"default": DriftPolicy().as_dict(),
                  "models": {k: v.as_dict()
                             for k, v in ex.controller.drift_policies().items()}})


def set_drift_policy(ex: Exchange, call: Call) -> None:
    body = ex.read_json()
    model = check.contract_id(unquote(call.params["model"]), "model name")
    ex.send_json(_drift_policy(ex.controller, model, body, call.actor).as_dict())


def _drift_policy(controller: FleetController, model: str, body: dict[str, Any],
                  actor: str) -> DriftPolicy:
    """A model's drift alert policy: the fields given change, the others stay."""
    if body.get("reset") is True:
        check.only(body, ("reset",), "a drift policy reset")
        return controller.set_drift_policy(model, None, actor)
    fields = {"psi": float, "min_samples": int, "clear_after": int}
    unknown = sorted(set(body) - set(fields))
    if unknown or not body:
        raise check.invalid(f"a drift policy takes {', '.join(fields)} (or reset: true); "
                            f"got {', '.join(unknown) or 'nothing'}")
    changes = {}
    for key, value in body.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                fields[key] is int and not isinstance(value, int)):
            raise check.invalid(f"drift policy {key} must be a number, got {value!r}")
        changes[key] = value
    try:
        policy = DriftPolicy(**{**controller.drift_policy(model).as_dict(), **changes})
    except ValueError as exc:
        raise check.invalid(f"drift policy refused: {exc}") from exc
    return controller.set_drift_policy(model, policy, actor)
