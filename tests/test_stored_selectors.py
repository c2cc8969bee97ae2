"""Stored selectors always read back (issue 18): a rollout whose selector, stored
canonically (spaces around ``&``/``|``, parentheses, saved groups expanded), passes the
bounds for what people write is listed, counted in /metrics, aborted and loaded again
after a restart; one that does not read back is shown, stopped and never breaks them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.protocol.payloads import ReportedState
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.rollout.selector import (
    MAX_DEPTH,
    MAX_TEXT,
    Selector,
    Unreadable,
    parse_selector,
)
from edgefleet.fleet.rollout.spec import RolloutSpec
from edgefleet.fleet.rollout.state import Rollout, RolloutState
from edgefleet.fleet.store import Store, open_store
from tests.conftest import Keys

TOKEN = "stored-selectors-token"
LATER = "2030-01-01T00:00:00Z"  # held back: the rollout waits, unfinished
LONG = "label:site=nowhere|" + "|".join(f"tag:t{i:03d}" for i in range(98))  # 999 characters
DEEP = "tag:a|(" * MAX_DEPTH + "device:b-00004&tag:c|device:b-00004" + ")" * MAX_DEPTH


class Served:
    def __init__(self, root: Path, keys: Keys, bundle: bytes) -> None:
        self.root, self.keys = root, keys
        self.store: Store = open_store(f"sqlite:///{root / 'fleet.db'}")
        self.ctl = self._controller()
        self.ctl.push(bundle, "alice")
        # one device both selectors below match: their rollouts wait for their start
        self.ctl.registry.reported(ReportedState(
            fleet="f", device="b-00004", agent_version="0.9.0", profile="raspberry-pi-4",
            runtimes={"litert": "2.3.0"}, labels={"site": "nowhere"}), 1_000)
        self.ctl.device_book.flush()
        self.api = ApiServer(self.ctl, {TOKEN: "alice"}, port=0).start()

    def _controller(self) -> FleetController:
        config = ControllerConfig(fleet="f", broker_url="mqtt://127.0.0.1:1",
                                  data_dir=self.root / "controller",
                                  public_url="http://127.0.0.1:1", trusted=self.keys.trusted)
        return FleetController(config, self.store)

    def restart(self) -> None:
        """A new controller on the same store, as after a restart: it loads the rollouts."""
        self.api.stop()
        self.ctl = self._controller()
        self.ctl.runner.load()
        self.api = ApiServer(self.ctl, {TOKEN: "alice"}, port=0).start()

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = HTTPConnection("127.0.0.1", self.api.port, timeout=30)
        try:
            conn.request(method, path, None if body is None else json.dumps(body).encode(),
                         {"Authorization": f"Bearer {TOKEN}",
                          "Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            kind = response.getheader("Content-Type") or ""
            return response.status, json.loads(data) if "json" in kind else data.decode()
        finally:
            conn.close()


@pytest.fixture
def served(tmp_path: Path, signing_keys: Keys,
           digits_bundles: dict[str, Path]) -> Iterator[Served]:
    served = Served(tmp_path, signing_keys, digits_bundles["onnx"].read_bytes())
    yield served
    served.api.stop()
    served.store.close()


def _create(served: Served, selectors: list[str]) -> dict[str, Any]:
    status, rollout = served.call("POST", "/api/v1/rollouts", {
        "model": "digits:1.0.0", "selectors": selectors, "start_at": LATER})
    assert status == 201, rollout
    return dict(rollout)


def _listed(served: Served) -> dict[str, dict[str, Any]]:
    status, rollouts = served.call("GET", "/api/v1/rollouts")
    assert status == 200, rollouts
    return {r["id"]: r for r in rollouts}


@pytest.mark.parametrize("text", [LONG, DEEP], ids=["999-characters", "16-deep"])
def test_a_rollout_whose_stored_selector_passes_the_bounds_for_people_lists_and_restarts(
        served: Served, text: str) -> None:
    tree = parse_selector(text)
    assert len(str(tree)) > MAX_TEXT or text == DEEP  # its stored form passes the bounds
    rollout = _create(served, [text])
    assert rollout["spec"]["selectors"] == [str(tree)]
    assert _listed(served)[rollout["id"]]["spec"]["selectors"] == [str(tree)]
    status, metrics = served.call("GET", "/metrics")
    assert status == 200 and "edgefleet_rollout" in metrics
    served.restart()
    assert _listed(served)[rollout["id"]]["spec"]["selectors"] == [str(tree)]
    loaded = served.ctl.actions.rollout(rollout["id"])
    assert loaded.spec.selectors == (tree,)  # the same tree: never one tag of the rest
    assert not isinstance(loaded.spec.selectors[0], Selector | Unreadable)
    status, aborted = served.call("POST", f"/api/v1/rollouts/{rollout['id']}/abort")
    assert status == 200 and aborted["state"] == "ABORTED", aborted


def test_a_rollout_to_a_dynamic_group_that_expands_past_1000_characters_lists_and_restarts(
        served: Served) -> None:
    lines = " | ".join(f"tag:plant-b-line-{i:02d}" for i in range(45))  # 987 characters
    assert served.call("POST", "/api/v1/groups", {"name": "lines", "where": lines})[0] == 201
    assert served.call("POST", "/api/v1/groups",
                       {"name": "both", "where": "group:lines | device:b-00004"})[0] == 201
    rollout = _create(served, ["group:both"])
    (stored,) = rollout["spec"]["selectors"]
    assert len(stored) > MAX_TEXT and "group:" not in stored
    served.restart()
    assert _listed(served)[rollout["id"]]["spec"]["selectors"] == [stored]
    assert served.call("GET", "/metrics")[0] == 200


def test_a_stored_selector_that_does_not_read_back_is_shown_and_its_rollout_stopped(
        served: Served) -> None:
    good = _create(served, ["tag:cams"])
    spec = served.ctl.actions.rollout(good["id"]).spec
    broken = RolloutSpec(model=spec.model, url=spec.url, size=spec.size,
                         selectors=(Unreadable("label:site=(", "damaged"),),
                         schedule=spec.schedule)
    served.store.save_rollout(Rollout("r-broken", broken, state=RolloutState.RUNNING,
                                      created_ms=1, updated_ms=1))
    damaged = Rollout("r-damaged", spec, state=RolloutState.RUNNING, created_ms=1,
                      updated_ms=1)
    served.store.save_rollout(damaged)
    served.store.save_rollout(Rollout("r-torn", spec, state=RolloutState.RUNNING,
                                      created_ms=1, updated_ms=1))
    with closing(sqlite3.connect(served.root / "fleet.db")) as db, db:
        db.execute("UPDATE rollouts SET spec = ? WHERE id = ?",  # no edgefleet reads it
                   (json.dumps({"model": None}), "r-damaged"))
        db.execute("UPDATE rollouts SET spec = ? WHERE id = ?",  # not even JSON
                   ("{not json", "r-torn"))
    served.restart()  # the controller starts
    listed = _listed(served)
    assert set(listed) == {good["id"], "r-broken"}
    assert listed["r-broken"]["spec"]["selectors"] == ["label:site=("]
    assert served.call("GET", "/metrics")[0] == 200
    served.ctl.runner.tick_all(set(), served.ctl.clock(), "controller")
    stopped = _listed(served)["r-broken"]
    assert stopped["state"] == "ABORTED" and "cannot be read" in stopped["reason"], stopped
    assert stopped["spec"]["selectors"] == ["label:site=("]  # kept as it was
    assert _listed(served)[good["id"]]["state"] != "ABORTED"
