"""The fleet's devices: listed (the stale ones with ``?stale_s=``), labelled, removed."""

from __future__ import annotations

from urllib.parse import unquote

from edgefleet.fleet.handlers import _checks as check
from edgefleet.fleet.handlers._exchange import Call, Exchange

__all__ = ["devices", "label_device", "remove_device", "remove_devices"]


def devices(ex: Exchange, call: Call) -> None:
    stale = call.query.get("stale_s", [None])[0]
    found = (ex.controller.devices() if stale is None
             else ex.controller.stale_devices(check.seconds(stale, "stale_s")))
    ex.send_json([d.as_dict() for d in found])


def label_device(ex: Exchange, call: Call) -> None:
    body = check.only(ex.read_json(), ("set", "remove"), "labelling")
    device = ex.controller.label(
        check.contract_id(unquote(call.params["device_id"]), "device id"),
        check.label_map(body.get("set", {})),
        [check.contract_id(k, "label key")
         for k in check.json_list(body.get("remove", []), "remove")], call.actor)
    ex.send_json(device.as_dict())


def remove_device(ex: Exchange, call: Call) -> None:
    ex.drop_unread_body()  # a DELETE's body, if any, means nothing
    device = check.contract_id(unquote(call.params["device_id"]), "device id")
    ex.send_json(ex.controller.remove_devices([device], call.actor).as_dict())


def remove_devices(ex: Exchange, call: Call) -> None:
    body = check.only(ex.read_json(), ("devices", "stale_s"), "a removal")
    ids = check.contract_ids(body.get("devices"), "devices", "device id")
    if not ids:
        raise check.invalid("devices must list at least one device id")
    stale = body.get("stale_s")
    stale_s = None if stale is None else check.seconds(stale, "stale_s")
    ex.send_json(ex.controller.remove_devices(ids, call.actor, stale_s).as_dict())
