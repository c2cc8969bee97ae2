"""Token roles over real HTTP: every route of the API's one table (``fleet.api.ROUTES``)
walked with every role; a role below the route's gets 403 naming the role it needs (and
the refusal is in the history under the token's name and role), a role at or above it
gets through to the handler."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from edgefleet.fleet.access import (
    ROLE_KEY,
    Actor,
    Token,
    TokenRole,
    parse_token,
    parse_tokens,
    tokens_by_secret,
)
from edgefleet.fleet.api import ROUTES, ApiServer
from edgefleet.fleet.control.dispatch import _actor
from edgefleet.fleet.errors import AuthError
from edgefleet.fleet.relay import OperatorRequest
from edgefleet.fleet.routing import Route, allowed, find
from tests.fleet_harness import TOKEN, Fleet, wait_until

SECRETS = {TokenRole.VIEWER: "viewer-secret-0001", TokenRole.OPERATOR: "operator-secret-01",
           TokenRole.ADMIN: "admin-secret-00001"}
NAMES = {TokenRole.VIEWER: "vic", TokenRole.OPERATOR: "olga", TokenRole.ADMIN: "ada"}
SAMPLES = {"rollout_id": "r1", "device_id": "cam-0", "model": "digits", "sha256": "0" * 64,
           "pair": f"{'0' * 64}-{'1' * 64}", "file": "index.html", "name": "north"}


def _path(route: Route[Any]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLES[m.group(1)], route.path)


class Caller:
    """One request at a time over http.client; an event stream is read up to its headers."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = str(parts.hostname), int(parts.port or 80)

    def call(self, method: str, path: str, secret: str | None,
             body: bytes | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=20)
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            if response.getheader("Content-Type") == "text/event-stream":
                return response.status, None  # a stream: never ends by itself
            raw = response.read()
            is_json = "json" in (response.getheader("Content-Type") or "")
            return response.status, json.loads(raw) if raw and is_json else raw
        finally:
            conn.close()


@pytest.fixture()
def caller(fleet: Fleet) -> Iterator[Caller]:
    fleet.start_controller()
    assert fleet.controller is not None
    tokens = {SECRETS[role]: Token(NAMES[role], role) for role in TokenRole}
    server = ApiServer(fleet.controller, {**tokens, TOKEN: Token("alice", TokenRole.ADMIN)})
    server.start()
    yield Caller(server.url)
    server.stop()


def _admin_history(caller: Caller) -> list[dict[str, Any]]:
    status, data = caller.call("GET", "/api/v1/history?limit=1000", TOKEN)
    assert status == 200
    return list(data)


def test_every_route_answers_each_role_by_the_table(caller: Caller) -> None:
    refused: list[tuple[str, str, str]] = []
    for route in ROUTES:
        path = _path(route)
        if route.role is None:
            status, data = caller.call(route.method, path, None)
            assert status not in (401, 403), (route, data)
            continue
        for role in TokenRole:
            body = b"{}" if route.method == "POST" else None
            status, data = caller.call(route.method, path, SECRETS[role], body)
            if role.allows(route.role):
                assert status not in (401, 403), (route, role, data)
                assert not (status == 404 and data["error"].startswith("no such endpoint")), (
                    route, role, data)
            else:
                assert status == 403, (route, role, data)
                assert data["kind"] == "ForbiddenError" and data["role"] == route.role.value
                assert f"needs the {route.role.value} role" in data["error"], data
                assert f"NAME:{route.role.value}=SECRET" in data["hint"]
                refused.append((NAMES[role], role.value, route.role.value))
    written = [(e["actor"], e["detail"]["role"], e["detail"]["needs"])
               for e in _admin_history(caller) if e["action"] == "api.refused"]
    assert sorted(written) == sorted(refused)
    assert len(refused) == sum(not role.allows(route.role) for route in ROUTES if route.role
                               for role in TokenRole)
    assert len(refused) >= 23  # viewer: 11 operator + 6 admin routes; operator: 6 admin


def test_a_call_no_entry_names_needs_a_token_then_gets_404_or_405(caller: Caller) -> None:
    assert caller.call("GET", "/api/v1/nothing", None)[0] == 401
    status, data = caller.call("GET", "/api/v1/nothing", SECRETS[TokenRole.VIEWER])
    assert status == 404 and data["error"] == "no such endpoint: GET /api/v1/nothing"
    status, data = caller.call("PATCH", "/api/v1/devices/cam-0", SECRETS[TokenRole.ADMIN])
    assert status == 405 and "DELETE" in data["hint"]


def test_the_history_names_the_token_and_its_role(caller: Caller, fleet: Fleet) -> None:
    assert fleet.controller is not None
    fleet.controller.registry.status("cam-0", "online", 1)
    status, _ = caller.call("POST", "/api/v1/devices/group", SECRETS[TokenRole.OPERATOR],
                            json.dumps({"devices": ["cam-0"], "group": "north"}).encode())
    assert status == 200
    entry = next(e for e in _admin_history(caller) if e["action"] == "device.group")
    assert entry["actor"] == "olga" and entry["detail"]["role"] == "operator"


def test_whoami_answers_each_token_its_name_and_role_and_a_plain_token_is_admin(
        caller: Caller) -> None:
    for role in TokenRole:
        status, data = caller.call("GET", "/api/v1/whoami", SECRETS[role])
        assert (status, data) == (200, {"name": NAMES[role], "role": role.value})
    status, data = caller.call("GET", "/api/v1/tokens", SECRETS[TokenRole.ADMIN])
    assert status == 200 and {"name": "vic", "role": "viewer"} in data
    assert not any(secret in json.dumps(data) for secret in SECRETS.values())


# --- the table and the handlers -----------------------------------------------------------

def test_no_two_entries_take_the_same_call() -> None:
    for route in ROUTES:
        found = find(ROUTES, route.method, _path(route))
        assert found is not None and found.route == route, route
    assert len({(r.method, r.path) for r in ROUTES}) == len(ROUTES)


def test_head_is_answered_like_get() -> None:
    found = find(ROUTES, "HEAD", "/api/v1/devices")
    assert found is not None and found.route.method == "GET"


# --- token specs ------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "name", "role"), [
    ("ops=secret-long-enough", "ops", TokenRole.ADMIN),  # as before roles: full rights
    ("secret-long-enough", "default", TokenRole.ADMIN),
    ("vic:viewer=secret=with=equals", "vic", TokenRole.VIEWER),
    ("olga:operator=secret-long-enough", "olga", TokenRole.OPERATOR),
    ("ada:admin=secret-long-enough", "ada", TokenRole.ADMIN),
])
def test_a_token_spec_gives_a_name_and_a_role(spec: str, name: str, role: TokenRole) -> None:
    assert parse_token(spec)[1] == Token(name, role)


@pytest.mark.parametrize(("spec", "expected"), [
    ("ops:root=secret-long-enough", "role 'root', which is not a role"),
    ("ops:Viewer=secret-long-enough", "role 'Viewer'"),
    ("ops:viewer=short", "shorter than 8"),
    ("o ps:viewer=secret-long-enough", "token name 'o ps'"),
    (":viewer=secret-long-enough", "token name ''"),
    ("bob\n:viewer=secret-long-enough", "token name 'bob\\n'"),  # fullmatch: no newline
    ("bob\n=secret-long-enough", "token name 'bob\\n'"),
    ("c2VjcmV0LXNlY3JldA==", "ends in '='"),  # a bare secret's padding
    ("sp:viewer= long-secret-here ", "spaces at an end"),  # HTTP strips them: never matches
    ("na:viewer=long-s\u00e9cret-here", "printable ASCII"),  # clients send UTF-8
])
def test_a_bad_token_spec_is_refused_naming_what_is_wrong(spec: str, expected: str) -> None:
    with pytest.raises(AuthError, match=re.escape(expected)) as caught:
        parse_token(spec)
    assert caught.value.hint


def test_one_secret_for_two_tokens_is_refused() -> None:
    with pytest.raises(AuthError, match="same secret"):
        parse_tokens(["a:viewer=secret-long-enough", "b=secret-long-enough"])


@pytest.mark.parametrize("specs", [
    ["alice:admin=secret-long-one", "alice:viewer=secret-long-two"],
    ["secret-long-one", "default:viewer=secret-long-two"],
    ["secret-long-one", "secret-long-two"],
])
def test_one_name_for_two_tokens_is_refused(specs: list[str]) -> None:
    with pytest.raises(AuthError, match="two tokens are named") as caught:
        parse_tokens(specs)
    assert "secret-long" not in str(caught.value) + caught.value.hint


def test_a_padded_bare_secret_is_never_shown_as_a_token_name() -> None:
    with pytest.raises(AuthError) as caught:
        parse_token("c2VjcmV0LXNlY3JldA==")
    assert "c2VjcmV0" not in str(caught.value) + caught.value.hint


def test_names_given_without_roles_are_admins() -> None:
    assert tokens_by_secret({"s" * 8: "alice"}) == {"s" * 8: Token("alice", TokenRole.ADMIN)}


def test_a_relayed_request_keeps_its_tokens_role_and_a_stored_actor_is_a_plain_name() -> None:
    request = OperatorRequest(1, "rollout.operate", {"rollout": "r1", "verb": "pause",
                                                     ROLE_KEY: "operator"}, "olga")
    actor = _actor(request)
    assert isinstance(actor, Actor) and actor == "olga" and actor.role == TokenRole.OPERATOR
    assert not isinstance(_actor(OperatorRequest(2, "x", {}, "controller")), Actor)
    import copy
    assert type(copy.deepcopy(Actor("olga", TokenRole.OPERATOR))) is str


@pytest.mark.parametrize(("path", "allow", "post"), [
    ("/api/v1/devices/group", "DELETE, POST", "/api/v1/devices/group"),
    ("/api/v1/devices/remove", "DELETE, POST", "/api/v1/devices/remove"),
    ("/api/v1/devices/cam-0", "DELETE", None), ("/api/v1/groups/x/delete", "POST",
                                                "/api/v1/groups/{name}/delete")])
def test_a_literal_path_wins_within_its_method_and_never_shadows_another_method(
        path: str, allow: str, post: str | None) -> None:
    """``/devices/group`` also fits ``/devices/{device_id}``: a POST there groups devices
    (the literal route wins), a DELETE removes the device whose id is ``group`` (no DELETE
    route is more specific), and its Allow names both."""
    assert allowed(ROUTES, path) == allow
    deleted = find(ROUTES, "DELETE", path)
    assert (deleted.params if deleted else None) == (
        {"device_id": path.rpartition("/")[2]} if "DELETE" in allow else None)
    posted = find(ROUTES, "POST", path)
    assert (posted.route.path if posted else None) == post


@pytest.mark.parametrize("device", ["group", "remove"])
def test_a_device_named_like_a_devices_route_is_removed_by_delete(caller: Caller, fleet: Fleet,
                                                                   device: str) -> None:
    controller = fleet.controller
    assert controller is not None
    # a removal clears the device's retained topics, so it needs the broker: wait for the
    # controller just started to be connected (it answered 503 'not connected' otherwise)
    wait_until(lambda: controller.mqtt is not None and controller.mqtt.connected, 15,
               what="the controller connected to the broker")
    for known in (device, "cam-7"):
        controller.registry.status(known, "online", 1)
    status, data = caller.call("DELETE", f"/api/v1/devices/{device}", TOKEN)
    assert status == 200, data
    assert data["removed"] == [device]
    assert controller.registry.get(device) is None
    assert controller.registry.get("cam-7") is not None, "only that device"
    status, data = caller.call("POST", f"/api/v1/devices/{device}", TOKEN,
                               json.dumps({"devices": ["cam-7"], "group": "north"}
                                          if device == "group" else {"devices": ["cam-7"]}
                                          ).encode())
    assert status == 200, data  # the literal route still answers POST
    assert (controller.registry.get("cam-7") is None) is (device == "remove")
