"""The REST API keeps its contract, ``fleet/openapi.json``.

The route table (``fleet.api.ROUTES``) and the document list the same operations, and
schemathesis fuzzes every operation against a live controller (a real Mosquitto, a SQLite
store, a real agent, a pushed bundle, a rollout and a keyring, so that the answers carry
data) with a valid token: no answer is a 5xx, and every status, content type, header and
body is one the document describes. The event stream, which never ends by itself, is
read here by hand instead.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import schemathesis
from schemathesis import Case

from edgefleet.agent.protocol.errors import RequestError
from edgefleet.agent.protocol.keyring import build_keyring
from edgefleet.fleet import api_types, contract
from edgefleet.fleet.api import ROUTES
from edgefleet.fleet.client import FleetClient, error_for_status
from edgefleet.fleet.errors import (
    ApiError,
    AuthError,
    ConflictError,
    FleetError,
    ForbiddenError,
    InvalidRolloutError,
    NotFoundError,
    RefusedError,
    UnavailableError,
)
from edgefleet.fleet.handlers import _checks as check
from edgefleet.fleet.rollout.state import FINISHED
from edgefleet.fleet.routing import find
from tests.brokers import MosquittoBroker
from tests.conftest import Keys
from tests.fleet_harness import TOKEN, Fleet, wait_until

ROOT = Path(__file__).resolve().parents[1]
_FINISHED = frozenset(state.value for state in FINISHED)

EXAMPLES = 12  # per operation and phase: the whole fuzz stays near a minute on 2 cores
CHECKS = {name: {"enabled": True} for name in (
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance", "response_headers_conformance", "negative_data_rejection",
    "ignored_auth", "missing_required_header", "unsupported_method")}


def test_the_route_table_and_the_document_list_the_same_operations() -> None:
    routes = {(r.method, r.path) for r in ROUTES}
    documented = set(contract.operations())
    assert not routes - documented, (
        f"routes in fleet/api.py that fleet/openapi.json does not describe: "
        f"{sorted(routes - documented)}: add them under 'paths'")
    assert not documented - routes, (
        f"operations in fleet/openapi.json that fleet/api.py does not route: "
        f"{sorted(documented - routes)}")


def test_every_route_answers_its_own_template_with_its_parameters() -> None:
    for route in ROUTES:
        path = route.path
        for number, name in enumerate(route.params):
            path = path.replace(f"{{{name}}}", f"v{number}")
        found = find(ROUTES, route.method, path)
        assert found is not None and found.route is route, route.path
        assert found.params == {n: f"v{i}" for i, n in enumerate(route.params)}, route.path


def test_every_operation_has_an_id_a_summary_and_its_token_rule() -> None:
    public = {(r.method, r.path) for r in ROUTES if r.public}
    for key, operation in contract.operations().items():
        assert operation.get("operationId") and operation.get("summary"), key
        assert (operation.get("security") == []) == (key in public), (
            f"{key}: 'security': [] marks exactly the routes that need no token")
        if key not in public:
            assert "401" in operation["responses"], key


BROWSER_ONLY = {"home", "dashboard_redirect", "dashboard", "dashboard_file", "stream"}


def test_the_client_has_a_method_for_every_operation() -> None:
    """``FleetClient.<operationId>``, the browser's page and event stream aside."""
    ids = {op["operationId"] for op in contract.operations().values()}
    missing = sorted(i for i in ids - BROWSER_ONLY if not callable(getattr(FleetClient, i, None)))
    assert not missing, f"FleetClient has no method for the operations {missing}"


def test_the_client_types_name_the_fields_of_the_document_schemas() -> None:
    schemas = contract.document()["components"]["schemas"]
    typed = {name: getattr(api_types, name) for name in api_types.__all__}
    shared = sorted(set(typed) & set(schemas))
    assert len(shared) >= 20, shared
    for name in shared:
        fields = set(get_type_hints(typed[name]))
        assert fields == set(schemas[name].get("properties", {})), name
        if schemas[name].get("additionalProperties") is False:
            assert set(schemas[name]["required"]) == set(typed[name].__required_keys__), name


# where the document states a check of fleet/handlers/_checks.py (a JSON pointer's parts)
_LABELS = [("components", "schemas", "TagsRequest", "properties", "add", "items"),
           ("components", "schemas", "TagsRequest", "properties", "remove", "items"),
           ("components", "schemas", "GroupRequest", "properties", "group", "oneOf", 0),
           ("components", "schemas", "RollbackRequest", "properties", "group"),
           ("components", "schemas", "LabelsRequest", "properties", "set",
            "additionalProperties"),
           ("paths", "/api/v1/groups/{name}/delete", "post", "parameters", 0, "schema")]
_IDS = [("components", "schemas", "LabelsRequest", "properties", "set", "propertyNames"),
        ("components", "schemas", "LabelsRequest", "properties", "remove", "items"),
        ("components", "schemas", "GroupCreate", "properties", "name"),
        ("components", "schemas", "RemoveRequest", "properties", "devices", "items"),
        ("paths", "/api/v1/devices/{device_id}", "delete", "parameters", 0, "schema")]


def _at(document: Any, pointer: tuple[str | int, ...]) -> Any:
    for part in pointer:
        document = document[part]
    return document


@pytest.mark.parametrize("pointer", _LABELS + _IDS, ids=lambda p: "/".join(map(str, p)))
def test_the_document_states_the_pattern_the_server_checks(
        pointer: tuple[str | int, ...]) -> None:
    """Groups, tags and label values are checked printable, label keys and names as ids:
    the schema says so (a client or a fuzzer reads what is refused from it)."""
    wanted = check.LABEL_PATTERN if pointer in _LABELS else check.ID_PATTERN
    assert _at(contract.document(), pointer).get("pattern") == wanted


def test_the_document_states_how_many_labels_one_call_sets() -> None:
    labels = _at(contract.document(), ("components", "schemas", "LabelsRequest", "properties",
                                       "set"))
    assert labels["maxProperties"] == 32


@pytest.mark.parametrize("text", [
    "north cams & co", "Zürich-Süd", "北", "cam 🙂", " ", "a" * 64, "a" * 65, "", "tab\there",
    "line\nbreak", "nul\x00", "del\x7f", "c1\x85", "nbsp\xa0", "soft\xadhyphen",
    "zero\u200bwidth", "rtl\u202eoverride", "line\u2028sep", "bom\ufeff", "lone\ud800",
    "private\ue000", "ideographic\u3000space", "tag\U000e0041", "unassigned\U0003ffff"])
def test_the_label_pattern_refuses_nothing_the_server_takes(text: str) -> None:
    """What the pattern refuses, ``check.label`` refuses (never stricter than the server);
    it refuses every control, format and separator character of the BMP, as the server
    does (only unassigned and astral ones are left to the server)."""
    def server_takes() -> bool:
        try:
            check.label(text, "group")
        except RequestError:
            return False
        return True

    schema_takes = re.search(check.LABEL_PATTERN, text) is not None
    assert schema_takes or not server_takes(), "the schema refuses what the server takes"
    if all(ord(c) < 0x10000 for c in text):
        assert schema_takes is server_takes(), "the schema must say what the server checks"


@pytest.mark.parametrize("status, family", [
    (400, InvalidRolloutError), (401, AuthError), (403, ForbiddenError), (404, NotFoundError),
    (405, RefusedError), (409, ConflictError), (411, RefusedError), (413, RefusedError),
    (416, RefusedError), (422, RefusedError), (503, UnavailableError), (500, ApiError)])
def test_an_error_answer_raises_its_family_with_the_servers_message_and_hint(
        status: int, family: type[FleetError]) -> None:
    raw = json.dumps({"error": "what went wrong", "hint": "the fix", "kind": "X"}).encode()
    error = error_for_status(status, raw)
    assert type(error) is family
    assert (error.message, error.hint, error.transient) == (
        "what went wrong", "the fix", status >= 500)


def test_every_error_status_the_document_names_has_its_own_family() -> None:
    statuses = {int(code) for op in contract.operations().values()
                for code in op["responses"] if int(code) >= 400}
    plain = sorted(s for s in statuses if type(error_for_status(s, b"")) is ApiError)
    assert plain == [500], f"statuses the client raises as a bare ApiError: {plain}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, signing_keys: Keys,
         digits_bundles: dict[str, Path]) -> Iterator[Fleet]:
    """A controller with a device, a pushed version, a finished rollout and a keyring."""
    root = tmp_path_factory.mktemp("contract")
    broker = MosquittoBroker(workdir=root / "mosquitto").start()
    fleet = Fleet("tcontract", broker.url, root, signing_keys)
    try:
        client = fleet.start_controller()
        fleet.add_agent("cam-0", digits_bundles["tflite"], traffic=False)
        wait_until(lambda: client.get("/api/v1/devices"), 30, what="cam-0 registered")
        client.upload_file("/api/v1/models", digits_bundles["tflite"])
        client.post("/api/v1/devices/group", {"devices": ["cam-0"], "group": "cams"})
        first = client.create_rollout("digits:1.0.0", {"selectors": ["group:cams"]})
        wait_until(lambda: client.rollout(first["id"])["state"] in _FINISHED, 30,
                   what="the first rollout to end")
        signer = signing_keys.signer
        client.upload("/api/v1/keyring", build_keyring(
            [("dev", signer.private_key.public_key())], 1, [signer]))
        yield fleet
    finally:
        fleet.stop()
        broker.stop()


def test_the_client_example_in_the_docs_runs(live: Fleet, digits_bundles: dict[str, Path],
                                              tmp_path: Path) -> None:
    """The block under "The Python client" in docs/fleet.md, as a user runs it."""
    assert live.api is not None
    text = (ROOT / "docs" / "fleet.md").read_text()
    section = text[text.index("### The Python client"):]
    code = section[section.index("```python\n") + 10:section.index("\n```\n")]
    shutil.copy(digits_bundles["tflite"], tmp_path / "digits-1.0.0.efb")
    env = {**os.environ, "EDGEFLEET_CONTROLLER": live.api.url, "EDGEFLEET_TOKEN": TOKEN,
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "pushed digits:1.0.0 (already there)", lines
    assert lines[1].endswith(" 1 devices") and lines[1].split()[1] in ("PENDING", "RUNNING",
                                                                       "SUCCEEDED"), lines
    assert lines[2] == "NotFoundError no rollout 'r999'", lines


# The package's document: the one the controller serves (the test below checks they are one).
schema = schemathesis.openapi.from_dict(contract.document(), config=schemathesis.Config.from_dict({
    "cache": {"enabled": False}, "suppress-health-check": ["all"],
    "generation": {"max-examples": EXAMPLES, "mode": "all", "database": "none",
                   "deterministic": True, "allow-extra-parameters": False},
    "phases": {"stateful": {"enabled": False}}, "checks": {"enabled": False, **CHECKS}}))


@schema.exclude(path="/api/v1/stream").parametrize()
def test_every_operation_answers_as_the_contract_says(case: Case[Any], live: Fleet) -> None:
    assert live.api is not None
    case.call_and_validate(base_url=live.api.url, headers={"Authorization": f"Bearer {TOKEN}"})


def _get(fleet: Fleet, path: str, token: str | None,
         headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    assert fleet.api is not None
    conn = http.client.HTTPConnection("127.0.0.1", fleet.api.port, timeout=20)
    try:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers={**auth, **(headers or {})})
        response = conn.getresponse()
        body = response.read(200) if "event-stream" in (response.getheader(
            "Content-Type") or "") else response.read()
        return response.status, response.getheader("Content-Type") or "", body
    finally:
        conn.close()


def test_a_pushed_bundle_downloads_whole_and_in_part(live: Fleet,
                                                    digits_bundles: dict[str, Path]) -> None:
    client = live.client()
    sha256 = client.model("digits", "1.0.0")["sha256"]
    assert client.bundle(sha256) == digits_bundles["tflite"].read_bytes()
    status, _, body = _get(live, f"/bundles/{sha256}.efb", None, {"Range": "bytes=0-9"})
    assert (status, body) == (206, digits_bundles["tflite"].read_bytes()[:10])


def test_the_document_is_served_without_a_token_as_it_is_kept(live: Fleet) -> None:
    status, content_type, body = _get(live, "/openapi.json", None)
    assert (status, content_type) == (200, "application/json")
    assert body == (Path(contract.__file__).parent / "openapi.json").read_bytes()
    assert json.loads(body)["openapi"] == "3.1.0"


def test_the_event_stream_needs_the_token_and_streams_events(live: Fleet) -> None:
    status, _, body = _get(live, "/api/v1/stream", None)
    assert status == 401 and json.loads(body)["kind"] == "AuthError"
    status, content_type, body = _get(live, "/api/v1/stream", TOKEN)
    documented: dict[str, Any] = contract.operations()[("GET", "/api/v1/stream")]
    assert status == 200 and content_type in documented["responses"]["200"]["content"]
    assert body.startswith((b"retry:", b"event:", b"data:", b":")), body
