"""The Grafana dashboard (dashboards/grafana/edgefleet.json) and its provisioning example:
the JSON's structure as file provisioning needs it (a datasource variable, no import
inputs), the provisioning YAMLs, and every panel's query against a live controller,
both by name (``/metrics``) and run by a real Prometheus scraping it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from tests.brokers import Subscriber
from tests.fleet_harness import Fleet, wait_until
from tests.test_fleet_metrics import (
    Prometheus,
    _parse,
    _rollout,
    _start,
    metrics_text,
    reject_a_message,
    versions,
)

__all__ = ["versions"]  # the module fixture, shared with tests/test_fleet_metrics.py

GRAFANA = Path(__file__).resolve().parents[1] / "dashboards" / "grafana"
DASHBOARD = GRAFANA / "edgefleet.json"
PROVISIONING = GRAFANA / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's variables, as the dashboard would send them with "All" selected
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
_NOT_METRICS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
# panels whose queries may rightly answer nothing on the live fleet below: none
ALLOWED_EMPTY: frozenset[str] = frozenset()


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", expr):
        if not expr[match.end():].lstrip().startswith("(") and match[0] not in _NOT_METRICS:
            names.add(match[0])
    return names


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _queries() -> list[tuple[str, str]]:
    """(panel title and refId, PromQL with Grafana's variables filled in) of every target."""
    found = []
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((f"{panel['title']} {target['refId']}", expr))
    return found


def _yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), f"{path}: not a mapping"
    return loaded


# --- the JSON and the provisioning files ------------------------------------------------

def test_promql_metric_names_leave_out_functions_labels_keywords_and_durations() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le, version) '
                        '(rate(x_ms_bucket{a="b", c=~"$m"}[$__rate_interval])))') == {"x_ms_bucket"}
    assert metric_names('sum(a{online="true"}) or vector(0)') == {"a"}
    assert metric_names("b / on (rollout) group_left (state) c > bool 1e3 offset 5m") == {"b",
                                                                                           "c"}


def test_every_panel_and_target_reads_the_datasource_variable() -> None:
    dashboard = _dashboard()
    assert "__inputs" not in dashboard and "${DS_" not in DASHBOARD.read_text()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] == "edgefleet"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {k: variables["datasource"][k] for k in ("type", "query")} == {
        "type": "datasource", "query": "prometheus"}
    assert all(v["datasource"] == DATASOURCE for v in variables.values() if v["type"] == "query")
    panels = dashboard["panels"]
    assert all(p["datasource"] == DATASOURCE for p in panels)
    assert all(t["datasource"] == DATASOURCE for p in panels for t in p["targets"])
    assert all(p["targets"] for p in panels)


def test_panels_have_unique_ids_and_fit_the_grid_without_overlapping() -> None:
    panels = _dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "xywh") and grid["w"] > 0 < grid["h"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_the_provisioning_example_declares_a_prometheus_and_a_file_provider() -> None:
    sources = _yaml(PROVISIONING / "datasources" / "edgefleet.yaml")
    assert sources["apiVersion"] == 1
    # the dashboard's variable lists data sources of this type
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]
    assert sources["datasources"][0]["url"].startswith("http")
    providers = _yaml(PROVISIONING / "dashboards" / "edgefleet.yaml")
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# --- a live controller, scraped by a real Prometheus ------------------------------------

def _live_fleet(fleet: Fleet, versions: dict[str, Path]) -> None:
    """Two devices, a canary held in probation (agreement measured), a rejected message and
    an offline device: every panel has something to show."""
    _start(fleet, versions, ["cam-0", "cam-1"])
    _rollout(fleet, soak_s=600)
    reject_a_message(fleet, "cam-0")
    publisher = Subscriber(fleet.broker_url, [])
    try:
        publisher.publish(f"edgefleet/v1/{fleet.name}/cam-gone/status", b"offline")
    finally:
        publisher.close()


def _exposed(fleet: Fleet) -> set[str]:
    """The sample names on ``/metrics`` (a histogram's as _bucket, _gsum and _gcount)."""
    return set(_parse(metrics_text(fleet)))


def test_every_panel_query_reads_exposed_metrics_and_answers_on_a_real_prometheus(
        fleet: Fleet, versions: dict[str, Path], tmp_path: Path) -> None:
    wanted = {name for _, expr in _queries() for name in metric_names(expr)}
    assert {"edgefleet_latency_p50_seconds_bucket", "edgefleet_agreement_top1_ratio"} <= wanted
    _live_fleet(fleet, versions)
    missing: list[set[str]] = []

    def all_exposed() -> bool:
        missing.append(wanted - _exposed(fleet))
        return not missing[-1]

    try:
        wait_until(all_exposed, 60, every=0.5, what="every dashboard metric with samples")
    except TimeoutError:
        pytest.fail(f"the dashboard queries metrics /metrics does not expose: {missing[-1]}")
    assert fleet.api is not None
    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{fleet.api.port}")
    try:
        wait_until(prometheus.ready, 30, what="Prometheus ready")
        empty: list[list[str]] = []

        def all_answer() -> bool:  # prometheus.query fails the test on any PromQL error
            empty.append([name for name, expr in _queries() if not prometheus.query(expr)])
            return set(empty[-1]) <= ALLOWED_EMPTY

        try:
            wait_until(all_answer, 60, every=1, what="every panel query answering series")
        except TimeoutError:
            pytest.fail(f"panel queries with no series on a real Prometheus: {empty[-1]}")
        p50 = prometheus.query(
            "histogram_quantile(0.5, sum by (le, version) (edgefleet_latency_p50_seconds_bucket))")
        # seconds: a digits CNN answers in well under a second on any device here
        assert all(0 < float(r["value"][1]) < 1 for r in p50), p50
    finally:
        prometheus.stop()
