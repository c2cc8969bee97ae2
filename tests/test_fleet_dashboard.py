"""The live dashboard in real headless Chromium, on a controller with real agents.

The page is loaded while a rollout runs; it must show the devices and the rollout with
its waves, follow the rollout to its end through the event stream (no reload), draw the
per-version charts, open a device page with the device's events, and log no error to
the browser console. Screenshots go to the test's tmp dir; with
``EDGEFLEET_UPDATE_SCREENSHOT=1`` the fleet view is also copied to ``docs/dashboard.png``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By

from edgefleet.fleet import dashboard
from edgefleet.fleet.mosquitto import MosquittoBroker
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, log_in, wait_until
from tests.models import TrainedModels

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
DEVICES = ["cam-0", "cam-1", "cam-2"]


@pytest.fixture(scope="module")
def bundles(digits_models: TrainedModels, signing_keys: Keys,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dashboard-bundles")
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            # the same format as v1: the probation agreement needs the same input names
            "v2": make_bundle(digits_models.tflite, root / "v2.efb", signing_keys, "2.0.0")}


@pytest.fixture()
def fleet(mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
          signing_keys: Keys, bundles: dict[str, Path]) -> Iterator[Fleet]:
    """Three cameras on 1.0.0 in group "cams", 2.0.0 pushed, the dashboard journal attached,
    and a few chart buckets of 1.0.0 before anything changes."""
    harness = Fleet(fleet_name, mosquitto.url, tmp_path, signing_keys)
    try:
        client = harness.start_controller()
        assert harness.controller is not None
        dashboard.attach(harness.controller)  # keep device events from the start
        for device in DEVICES:
            harness.add_agent(device, bundles["v1"])
        wait_until(lambda: _on(harness, "1.0.0") == set(DEVICES), 30, what="devices on 1.0.0")
        client.post("/api/v1/devices/group", {"devices": DEVICES, "group": "cams"})
        client.upload("/api/v1/models", bundles["v2"].read_bytes())
        telemetry = harness.controller.telemetry
        wait_until(lambda: len(telemetry.series().get("digits:1.0.0", [])) >= 3, 30,
                   what="some chart history of 1.0.0")
        yield harness
    finally:
        harness.stop()


def _on(fleet: Fleet, version: str) -> set[str]:
    devices = fleet.client().get("/api/v1/devices")
    return {d["id"] for d in devices if d["active"] and d["active"]["version"] == version
            and d["update_state"] in ("IDLE", "COMMITTED")}


def _attr(driver: Chrome, selector: str, name: str) -> str | None:
    """Read in the page, in one go: the page re-renders as the stream speaks."""
    value = driver.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e ? e.getAttribute(arguments[1]) : null;", selector, name)
    return None if value is None else str(value)


def _texts(driver: Chrome, selector: str) -> list[str]:
    found = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText.trim());",
        selector)
    return [str(text) for text in found]


def _severe(driver: Chrome) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e for e in entries if e["level"] == "SEVERE"]


def _screenshot(driver: Chrome, path: Path) -> Path:
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1920, max(1080, height))
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 20_000, "the screenshot is suspiciously small"
    return path


def test_the_dashboard_follows_a_rollout_live_and_shows_device_events(
        fleet: Fleet, browser: Chrome, tmp_path: Path) -> None:
    rollout = fleet.client().post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["group:cams"], "waves": ["1", "100%"],
        "device_timeout_s": 60, "soak_s": 4})
    assert fleet.api is not None
    log_in(browser, fleet.api.url)
    card = f'[data-rollout="{rollout["id"]}"]'

    wait_until(lambda: len(_texts(browser, "[data-device]")) == 3, 15, what="device tiles")
    wait_until(lambda: len(_texts(browser, f"{card} .wave")) == 2, 15, what="the waves")
    first_state = _attr(browser, card, "data-state")
    assert first_state in ("PENDING", "RUNNING"), first_state
    assert _texts(browser, "#kpi-online .value") == ["3 / 3"]
    assert "digits → 2.0.0" in _texts(browser, f"{card} .model")
    browser.execute_script("window.sameDocument = true")

    # the stream alone moves the page on: the rollout ends, the devices switch
    wait_until(lambda: _attr(browser, card, "data-state") == "SUCCEEDED", 60,
               what="the page showing the rollout succeeded")
    wait_until(lambda: {_attr(browser, f'[data-device="{d}"]', "data-version")
                        for d in DEVICES} == {"digits:2.0.0"}, 15, what="tiles on 2.0.0")
    wait_until(lambda: set(_texts(browser, "[data-device] .st")) == {"COMMITTED"}, 15,
               what="tiles showing the devices committed")
    assert browser.execute_script("return window.sameDocument") is True
    assert _texts(browser, f"{card} .done-count") == ["3 / 3"]
    assert int(_attr(browser, "#live", "data-messages") or 0) > 3
    wait_until(lambda: int(_attr(browser, "#chart-p95_ms", "data-lines") or 0) == 2, 15,
               what="p95 lines of both versions")
    assert _attr(browser, "#chart-agreement_pct", "data-lines") == "1"  # measured in probation
    fleet_png = _screenshot(browser, tmp_path / "dashboard.png")

    canary = next(d["device"] for d in rollout["devices"] if d["state"] == "TARGETED")
    browser.find_element(By.CSS_SELECTOR, f'[data-device="{canary}"]').click()
    wait_until(lambda: "COMMITTED" in _texts(browser, "#device-events tr.event td"), 15,
               what="the canary's events")
    states = _texts(browser, "#device-events tr.event td:nth-child(4)")
    assert states[-1] == "DOWNLOADING" and states[0] == "COMMITTED", states  # newest first
    assert "serving digits 2.0.0" in _texts(browser, "#device-events")[0]
    assert _texts(browser, ".device-head h1") == [canary]
    assert "SUCCEEDED" in _texts(browser, "#device table.list td")
    assert browser.execute_script("return window.sameDocument") is True
    _screenshot(browser, tmp_path / "device.png")

    assert _severe(browser) == []
    if os.environ.get("EDGEFLEET_UPDATE_SCREENSHOT"):
        shutil.copyfile(fleet_png, DOCS_SCREENSHOT)


def test_the_page_files_are_served_and_nothing_else() -> None:
    page = dashboard.static_file("/")
    assert page is not None and page[0].startswith("text/html") and b"app.js" in page[1]
    assert dashboard.static_file("") == page
    for name in ("/app.js", "/style.css", "/favicon.svg"):
        found = dashboard.static_file(name)
        assert found is not None
        assert not re.search(rb"""(src|href)=["']?(https?:)?//|@import|url\(""", found[1]), name
    for bad in ("/../__init__.py", "/_stream.py", "/static/app.js", "/nope.js", "/%2e%2e/x"):
        assert dashboard.static_file(bad) is None
