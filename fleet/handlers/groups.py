"""Dynamic groups (a selector saved under a name), and a device's own group and tags."""

from __future__ import annotations

from http import HTTPStatus
from urllib.parse import unquote

from edgefleet.fleet.handlers import _checks as check
from edgefleet.fleet.handlers._exchange import Call, Exchange

__all__ = ["create_group", "delete_group", "groups", "set_group", "tag"]


def groups(ex: Exchange, call: Call) -> None:
    ex.send_json(ex.controller.saved_groups())


def create_group(ex: Exchange, call: Call) -> None:
    body = check.only(ex.read_json(), ("name", "where"), "a dynamic group")
    where = body.get("where")
    if not isinstance(where, str):
        raise check.invalid("where must be a selector string, e.g. profile=raspberry-pi-4")
    group = ex.controller.create_group(check.label(body.get("name"), "group"), where,
                                       call.actor)
    ex.send_json(group, HTTPStatus.CREATED)


def delete_group(ex: Exchange, call: Call) -> None:
    if given := ex.read_json():
        raise check.invalid(f"deleting a group takes no options, got "
                            f"{', '.join(sorted(given))[:80]}")
    name = check.label(unquote(call.params["name"]), "group")
    ex.controller.delete_group(name, call.actor)
    ex.send_json({"deleted": name})


def set_group(ex: Exchange, call: Call) -> None:
    body = check.only(ex.read_json(), ("devices", "group"), "setting a group")
    devices = check.contract_ids(body.get("devices"), "devices", "device id")
    group = body.get("group")
    changed = ex.controller.set_group(
        devices, None if group is None else check.label(group, "group"), call.actor)
    ex.send_json([d.as_dict() for d in changed])


def tag(ex: Exchange, call: Call) -> None:
    body = check.only(ex.read_json(), ("add", "remove"), "tagging")
    device = ex.controller.tag(check.contract_id(unquote(call.params["device_id"]), "device id"),
                               check.labels(body.get("add", []), "add", "tag"),
                               check.labels(body.get("remove", []), "remove", "tag"),
                               call.actor)
    ex.send_json(device.as_dict())
