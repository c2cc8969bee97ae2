"""Labels and dynamic groups through the controller's REST API: checked at the edge,
stored, audited, and expanded into a rollout's selectors when it is created."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.protocol.payloads import ReportedState
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.rollout.selector import parse_selector
from edgefleet.fleet.store import open_store
from tests.conftest import Keys

TOKEN = "ops-token"


class Api:
    def __init__(self, server: ApiServer) -> None:
        self.server = server

    def call(self, method: str, path: str, body: Any = None,
             token: str | None = TOKEN) -> tuple[int, Any]:
        conn = HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, json.dumps(body).encode() if body is not None else None,
                     headers)
        response = conn.getresponse()
        data = json.loads(response.read() or b"null")
        conn.close()
        return response.status, data


@pytest.fixture
def ctl(tmp_path: Path, signing_keys: Keys) -> Iterator[FleetController]:
    """A controller that is not started: devices are fed to its registry by hand."""
    config = ControllerConfig(fleet="f", broker_url="mqtt://127.0.0.1:1",
                              data_dir=tmp_path / "controller", public_url="http://127.0.0.1:1",
                              trusted=signing_keys.trusted)
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    controller = FleetController(config, store)
    for device, profile, site in (("pi-1", "raspberry-pi-4", "plant-a"),
                                  ("pi-2", "raspberry-pi-4", "plant-b"),
                                  ("x86-1", "generic-x86_64", "plant-a")):
        controller.registry.reported(ReportedState(
            fleet="f", device=device, agent_version="0.9.0", profile=profile,
            runtimes={"litert": "2.3.0"}, labels={"site": site}), 1_000)
    controller.device_book.flush()
    yield controller
    store.close()


@pytest.fixture
def api(ctl: FleetController) -> Iterator[Api]:
    server = ApiServer(ctl, {TOKEN: "alice"}, port=0).start()
    yield Api(server)
    server.stop()


def test_an_operator_labels_a_device_and_the_label_wins_over_the_reported_one(
        api: Api, ctl: FleetController) -> None:
    status, device = api.call("POST", "/api/v1/devices/pi-2/labels",
                              {"set": {"site": "plant-a", "line": "3"}})
    assert status == 200 and device["labels"] == {"site": "plant-a", "line": "3"}
    status, device = api.call("POST", "/api/v1/devices/pi-2/labels", {"remove": ["line"]})
    assert status == 200 and device["labels"] == {"site": "plant-a"}
    found = ctl.registry.get("pi-2")
    assert found is not None and parse_selector("label:site=plant-a").matches(found)
    history = [e.action for e in ctl.history(10, "pi-2")]
    assert history == ["device.labels", "device.labels"]


@pytest.mark.parametrize(("body", "words"), [
    ({"set": {"bad key": "x"}}, "label key 'bad key'"),
    ({"set": {"site": "a\nb"}}, "label value"),
    ({"set": "site=a"}, "set must be an object"),
    ({"remove": "site"}, "remove must be a list")])
def test_a_bad_label_is_refused_at_the_edge(api: Api, body: dict[str, Any], words: str) -> None:
    status, error = api.call("POST", "/api/v1/devices/pi-1/labels", body)
    assert status == 400 and words in error["error"], error


def test_labelling_needs_a_token_and_a_known_device(api: Api) -> None:
    assert api.call("POST", "/api/v1/devices/pi-1/labels", {"set": {"a": "b"}},
                    token=None)[0] == 401
    status, error = api.call("POST", "/api/v1/devices/ghost/labels", {"set": {"a": "b"}})
    assert status == 404 and "ghost" in error["error"]


def test_a_dynamic_group_is_saved_listed_with_its_members_and_deleted(
        api: Api, ctl: FleetController) -> None:
    status, group = api.call("POST", "/api/v1/groups", {
        "name": "pis-a", "where": "profile = raspberry-pi-4 & label:site=plant-a"})
    assert status == 201, group
    assert group["where"] == "profile=raspberry-pi-4 & label:site=plant-a"  # canonical
    assert group["members"] == ["pi-1"] and group["created_by"] == "alice"
    status, again = api.call("POST", "/api/v1/groups", {"name": "pis-a", "where": "arch=x"})
    assert status == 409 and "already exists" in again["error"]
    status, listed = api.call("GET", "/api/v1/groups")
    assert [(g["name"], g["devices"]) for g in listed] == [("pis-a", 1)]
    assert api.call("POST", "/api/v1/groups/pis-a/delete")[0] == 200
    status, error = api.call("POST", "/api/v1/groups/pis-a/delete")
    assert status == 404 and "no saved group" in error["error"]
    assert [e.action for e in ctl.history(10, "group:pis-a")] == ["group.delete",
                                                                  "group.create"]


def test_a_dynamic_group_another_one_names_is_not_deleted(api: Api) -> None:
    """Deleting it would make ``group:dx`` inside ``dy`` mean the static group dx."""
    assert api.call("POST", "/api/v1/groups", {"name": "dx", "where": "tag:q"})[0] == 201
    assert api.call("POST", "/api/v1/groups", {"name": "dy",
                                               "where": "group:dx | tag:r"})[0] == 201
    status, error = api.call("POST", "/api/v1/groups/dx/delete")
    assert status == 409 and "dy" in error["error"] and "group:dx" in error["hint"]
    assert api.call("POST", "/api/v1/groups/dy/delete")[0] == 200
    assert api.call("POST", "/api/v1/groups/dx/delete")[0] == 200


def test_a_bad_saved_selector_is_refused_naming_the_position(api: Api) -> None:
    status, error = api.call("POST", "/api/v1/groups", {"name": "g", "where": "profile>2"})
    assert status == 400 and "at character 8" in error["error"] and error["hint"]
    assert api.call("GET", "/api/v1/groups")[1] == []


def test_a_saved_group_cannot_shadow_a_static_group_devices_are_in(
        api: Api, ctl: FleetController) -> None:
    ctl.set_group(["x86-1"], "cams", "alice")
    status, error = api.call("POST", "/api/v1/groups", {"name": "cams", "where": "arch=x"})
    assert status == 409 and "x86-1" in error["error"]


def test_a_rollout_to_a_dynamic_group_stores_the_selector_it_meant(ctl: FleetController) -> None:
    ctl.create_group("pis", "profile=raspberry-pi-4 | arch=aarch64", "alice")
    expanded = ctl.groups.expand((parse_selector("group:pis & runtime.litert>=2"),
                                  parse_selector("group:static")))
    assert [str(s) for s in expanded] == [
        "(profile=raspberry-pi-4 | arch=aarch64) & runtime.litert>=2", "group:static"]


def test_a_group_of_1000_characters_is_saved_listed_and_expanded_and_nothing_breaks(
        api: Api, ctl: FleetController) -> None:
    """Its canonical text (spaces around |) passes 1,000 characters: it still reads back."""
    where = "|".join(f"tag:t{i:03d}" for i in range(111))[:1000].rstrip("|")
    where = where[:where.rindex("|")]  # whole clauses, under 1,000 characters
    status, group = api.call("POST", "/api/v1/groups", {"name": "canon", "where": where})
    assert status == 201 and len(group["where"]) > 1000, group
    status, listed = api.call("GET", "/api/v1/groups", token=TOKEN)
    assert status == 200 and [g["name"] for g in listed] == ["canon"]
    expanded = ctl.groups.expand((parse_selector("group:canon"),
                                  parse_selector("label:site=plant-b")))
    assert str(expanded[0]) == group["where"]


def test_a_group_refused_leaves_nothing_saved_and_the_others_listed(api: Api) -> None:
    status, error = api.call("POST", "/api/v1/groups", {"name": "g", "where": "profile>2"})
    assert status == 400
    status, error = api.call("POST", "/api/v1/groups", {"name": "g", "where": "tag:a"})
    assert status == 201, error  # the name was not taken by the refused one
    assert [g["name"] for g in api.call("GET", "/api/v1/groups")[1]] == ["g"]


def test_groups_naming_groups_are_bounded_when_created(api: Api) -> None:
    """Each level names the one below 30 times: 30, 900, then 27,000 clauses, refused
    (the listing would expand it for every device)."""
    fan = 30
    assert api.call("POST", "/api/v1/groups", {
        "name": "x1", "where": "|".join(f"tag:q{i:02d}" for i in range(fan))})[0] == 201
    assert api.call("POST", "/api/v1/groups",
                    {"name": "x2", "where": "|".join(["group:x1"] * fan)})[0] == 201
    status, error = api.call("POST", "/api/v1/groups",
                             {"name": "x3", "where": "|".join(["group:x2"] * fan)})
    assert status == 400 and "clauses" in error["error"] and error["hint"], error
    status, listed = api.call("GET", "/api/v1/groups")
    assert status == 200 and [g["name"] for g in listed] == ["x1", "x2"]
    # the other way round: a group named before it exists multiplies when it is created
    assert api.call("POST", "/api/v1/groups",
                    {"name": "a", "where": "|".join(["group:b"] * fan)})[0] == 201
    status, error = api.call("POST", "/api/v1/groups",
                             {"name": "b", "where": "|".join(["group:x2"] * 2)})
    assert status == 400 and "group:a" in error["error"], error
    assert [g["name"] for g in api.call("GET", "/api/v1/groups")[1]] == ["a", "x1", "x2"]


@pytest.mark.parametrize("name", ["x/y", "a b", "-x", "", "a\nb", "x" * 65, "group:x", "é"])
def test_a_dynamic_group_name_is_an_id_refused_otherwise(api: Api, name: str) -> None:
    status, error = api.call("POST", "/api/v1/groups", {"name": name, "where": "tag:zz"})
    assert status == 400 and "not allowed" in error["error"], error
    assert api.call("GET", "/api/v1/groups")[1] == []


def test_a_static_group_cannot_take_a_dynamic_groups_name(api: Api) -> None:
    assert api.call("POST", "/api/v1/groups", {"name": "pis", "where": "arch=x"})[0] == 201
    status, error = api.call("POST", "/api/v1/devices/group",
                             {"devices": ["pi-1"], "group": "pis"})
    assert status == 409 and "dynamic group" in error["error"], error
    assert api.call("POST", "/api/v1/devices/group",
                    {"devices": ["pi-1"], "group": "cams"})[0] == 200
