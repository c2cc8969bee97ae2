"""A token refused in a loop cannot fill the history (issue 18): at most one
``api.refused`` row per token and route a minute, the refusals in between counted in the
next row; ``fleet history --action`` shows one action; ``/metrics`` counts every refusal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.fleet.access import Token, TokenRole
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.control.audit import REFUSALS_EVERY_MS
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.store import open_store
from tests.conftest import Keys
from tests.test_fleet_metrics import promtool_problems

VIEWER, ADMIN = "viewer-secret-1", "admin-secret-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def served(tmp_path: Path, signing_keys: Keys) -> Iterator[tuple[FleetController, ApiServer,
                                                                  Clock]]:
    clock = Clock()
    config = ControllerConfig(fleet="f", broker_url="mqtt://127.0.0.1:1",
                              data_dir=tmp_path / "controller", public_url="http://127.0.0.1:1",
                              trusted=signing_keys.trusted)
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    ctl = FleetController(config, store, clock=clock)
    api = ApiServer(ctl, {VIEWER: Token("wall", TokenRole.VIEWER),
                          ADMIN: Token("ada", TokenRole.ADMIN)}, port=0).start()
    yield ctl, api, clock
    api.stop()
    store.close()


def _post(api: ApiServer, path: str, token: str) -> int:
    conn = HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        conn.request("POST", path, b"{}", {"Authorization": f"Bearer {token}",
                                           "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_a_token_refused_in_a_loop_writes_one_row_per_route_a_minute(
        served: tuple[FleetController, ApiServer, Clock]) -> None:
    ctl, api, clock = served
    for _ in range(50):
        assert _post(api, "/api/v1/rollouts/r1/abort", VIEWER) == 403
    for _ in range(5):  # another route: its own row
        assert _post(api, "/api/v1/rollouts/r2/pause", VIEWER) == 403
    rows = ctl.history(1000, action="api.refused")
    assert [r.target for r in rows] == ["POST /api/v1/rollouts/r2/pause",
                                        "POST /api/v1/rollouts/r1/abort"]
    assert ctl.audit.refusals_unwritten == 49 + 4
    clock.now += REFUSALS_EVERY_MS
    assert _post(api, "/api/v1/rollouts/r3/abort", VIEWER) == 403
    newest = ctl.history(1, action="api.refused")[0]
    assert newest.target == "POST /api/v1/rollouts/r3/abort"
    assert newest.detail["refused_since"] == 49 and newest.detail["role"] == "viewer"
    assert len(ctl.history(1000)) == 3  # nothing else was written


def test_the_history_shows_one_action_through_the_api_and_the_cli(
        served: tuple[FleetController, ApiServer, Clock]) -> None:
    ctl, api, _ = served
    assert _post(api, "/api/v1/rollouts/r1/abort", VIEWER) == 403
    ctl.audit.record("ada", "group.create", "group:x", "tag:x")
    shown = CliRunner().invoke(app, ["fleet", "history", "--action", "api.refused", "--json",
                                     "--controller", api.url, "--token", ADMIN])
    assert shown.exit_code == 0, shown.output
    assert [e["action"] for e in json.loads(shown.stdout)] == ["api.refused"]
    shown = CliRunner().invoke(app, ["fleet", "history", "--json", "--controller", api.url,
                                     "--token", ADMIN])
    assert [e["action"] for e in json.loads(shown.stdout)] == ["group.create", "api.refused"]


def _refusals(api: ApiServer) -> tuple[str, dict[tuple[str, str], float]]:
    """``/metrics`` as text, and its ``edgefleet_api_refusals_total`` per (token, route)."""
    with urlopen(f"{api.url}/metrics", timeout=10) as response:
        text = str(response.read().decode())
    counts = {(s.labels["token"], s.labels["route"]): s.value
              for family in text_string_to_metric_families(text)
              if family.name == "edgefleet_api_refusals"
              for s in family.samples if s.name.endswith("_total")}
    return text, counts


def test_every_refusal_is_counted_on_metrics_by_token_name_and_route(
        served: tuple[FleetController, ApiServer, Clock]) -> None:
    """Rows are written once a minute, the counter counts each refusal; it names the token
    (never its secret) and the route template (never a rollout id)."""
    _, api, clock = served
    assert _refusals(api)[1] == {}
    for _ in range(3):
        assert _post(api, "/api/v1/rollouts/r1/abort", VIEWER) == 403
    assert _post(api, "/api/v1/rollouts/r2/abort", VIEWER) == 403
    clock.now += REFUSALS_EVERY_MS
    assert _post(api, "/api/v1/models", VIEWER) == 403
    text, counts = _refusals(api)
    assert counts == {("wall", "POST /api/v1/rollouts/{rollout_id}/abort"): 4,
                      ("wall", "POST /api/v1/models"): 1}
    assert VIEWER not in text and "r1" not in text
    assert promtool_problems(text) == ""
