"""Acting on the fleet from the web page: a real controller and Mosquitto, simulated
devices, and the page in headless Chromium.

One browser session walks an operator through it: a token in the page's address dropped
and not used, the token entered in the page's form (its name and role shown), a rollout
created from the form (numbers that are not decimal refused in the form; a value the
controller refuses: its error, hint and field shown), a card's buttons kept across the
stream's refreshes, then paused, resumed, aborted and rolled back, each asked for in the
dialog (one cancelled: nothing happens) and each in the page's history under the token's
name. A page of another origin that tries to act is refused by the controller (its
preflight and its form post, both 403); a token the controller does not know brings the
token form back, and a viewer's token is offered no action. The HTTP tests below pin the
same rules without a browser: forged ``Origin`` and ``Sec-Fetch-Site``, no CORS allowance,
the page's CSP.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select

from edgefleet.agent.protocol.errors import RequestError
from edgefleet.fleet import dashboard
from edgefleet.fleet.access import Token, TokenRole
from edgefleet.fleet.mosquitto import MosquittoBroker
from edgefleet.fleet.same_origin import check_same_origin
from edgefleet.fleet.simulate import SimOptions, SimulatedFleet
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import TOKEN, Fleet, log_in, wait_until
from tests.models import TrainedModels

STATIC = Path(__file__).resolve().parents[1] / "fleet" / "dashboard" / "static"
VIEWER_TOKEN = "wall-screen-token"  # a token of the viewer role, named "wall"


@pytest.fixture(scope="module")
def v2(digits_models: TrainedModels, signing_keys: Keys,
       tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(digits_models.tflite, tmp_path_factory.mktemp("v2") / "v2.efb",
                       signing_keys, "2.0.0")


@pytest.fixture()
def controller(mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
               signing_keys: Keys) -> Iterator[Fleet]:
    harness = Fleet(fleet_name, mosquitto.url, tmp_path, signing_keys)
    harness.more_tokens = {VIEWER_TOKEN: Token("wall", TokenRole.VIEWER)}
    try:
        harness.start_controller()
        yield harness
    finally:
        harness.stop()


@pytest.fixture()
def fleet(controller: Fleet, mosquitto: MosquittoBroker, fleet_name: str, signing_keys: Keys,
          digits_bundles: dict[str, Path], v2: Path) -> Iterator[Fleet]:
    """Three simulated cameras on 1.0.0 in group "cams", and 2.0.0 pushed."""
    sim = SimulatedFleet(mosquitto.url, fleet_name, 3, signing_keys.trusted,
                         SimOptions(telemetry_interval_s=0.5, request_rate=20.0),
                         digits_bundles["tflite"]).start()
    try:
        client = controller.client()
        wait_until(lambda: len(_on(controller, "1.0.0")) == 3, 60, what="devices on 1.0.0")
        client.post("/api/v1/devices/group", {"devices": sorted(sim.devices), "group": "cams"})
        client.upload("/api/v1/models", v2.read_bytes())
        yield controller
    finally:
        sim.stop()


def _on(fleet: Fleet, version: str) -> set[str]:
    return {d["id"] for d in fleet.client().get("/api/v1/devices") if d["online"]
            and d["active"] and d["active"]["version"] == version
            and d["update_state"] in ("IDLE", "COMMITTED", "ROLLED_BACK")}


# --- in the page, read and clicked in one go: it re-renders as the stream speaks ----------

def _attr(driver: Chrome, selector: str, name: str) -> str | None:
    value = driver.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e ? e.getAttribute(arguments[1]) : null;", selector, name)
    return None if value is None else str(value)


def _text(driver: Chrome, selector: str) -> str:
    return str(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
        selector))


def _click(driver: Chrome, selector: str) -> None:
    found = driver.execute_script(
        "const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e;",
        selector)
    assert found, f"nothing to click at {selector}"


def _dialog(driver: Chrome) -> str:
    """The dialog's state: closed, asking, sending, refused."""
    return _attr(driver, "#confirm", "data-state") or "closed"


def _history(driver: Chrome) -> list[tuple[str, str, str, str]]:
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#history tr.history-entry')].map(r =>"
        " [r.dataset.actor, r.dataset.action, r.dataset.target, r.dataset.outcome]);")
    return [tuple(row) for row in rows]


def _state(fleet: Fleet, rollout: str) -> str:
    return str(fleet.client().get(f"/api/v1/rollouts/{rollout}")["state"])


def _act(driver: Chrome, fleet: Fleet, rollout: str, verb: str, state: str) -> str:
    """Click the rollout's ``verb`` button, confirm in the dialog; the page shows ``state``
    and the history the action. Returns what the dialog said."""
    _click(driver, f'[data-rollout="{rollout}"] button[data-verb="{verb}"]')
    wait_until(lambda: _dialog(driver) == "asking", 10, what=f"the {verb} dialog")
    said = _text(driver, "#confirm")
    driver.find_element(By.ID, "confirm-ok").click()
    wait_until(lambda: _dialog(driver) == "closed", 10, what=f"{verb} done")
    assert _state(fleet, rollout) == state
    wait_until(lambda: _attr(driver, f'article[data-rollout="{rollout}"]', "data-state")
               == state, 10, what=f"the card showing {state}")
    wait_until(lambda: ("alice", f"rollout.{verb}", rollout, "ok") in _history(driver), 10,
               what=f"{verb} in the page's history")
    return said


def _create(driver: Chrome, **fields: str) -> None:
    """Fill the new-rollout form and ask for it (the dialog opens)."""
    for name, value in fields.items():
        box = driver.find_element(By.ID, f"create-{name}")
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "create-submit").click()
    wait_until(lambda: _dialog(driver) == "asking", 10, what="the create dialog")


def _shown(driver: Chrome, selector: str) -> bool:
    return bool(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return !!e && !e.hidden;", selector))


def _kept_token(driver: Chrome) -> str | None:
    value = driver.execute_script("return sessionStorage.getItem('edgefleet-token')")
    return None if value is None else str(value)


def _open_as_the_operator(driver: Chrome, url: str) -> None:
    # a token in the page's address: taken out of the address at once and not used
    driver.get(f"{url}/dashboard/?token={TOKEN}#/")
    wait_until(lambda: _shown(driver, "#login"), 10, what="the token form")
    assert TOKEN not in driver.current_url and driver.current_url.endswith("/dashboard/#/")
    said = _text(driver, "#login-error")
    assert "address is not used" in said and "Enter the token in the form" in said, said
    assert _kept_token(driver) is None
    log_in(driver, url)
    wait_until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "[data-device]")) == 3, 20,
               what="the fleet view with three devices")
    assert TOKEN not in driver.current_url
    assert _text(driver, "#whoami") == "alice · admin"  # the harness's token: no role given


def test_an_operator_creates_pauses_resumes_aborts_and_rolls_back_from_the_page(
        fleet: Fleet, browser: Chrome, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    assert fleet.api is not None
    url = fleet.api.url
    _open_as_the_operator(browser, url)

    # the form: a value the controller refuses first, shown with its hint and field
    browser.find_element(By.ID, "new-rollout").click()
    wait_until(lambda: "digits:2.0.0" in [o.get_attribute("value") for o in Select(
        browser.find_element(By.ID, "create-model")).options], 10, what="the model list")
    Select(browser.find_element(By.ID, "create-model")).select_by_value("digits:2.0.0")
    # numbers are decimal digits: what JavaScript's Number() would also take is refused in
    # the form, naming the field, and no dialog opens
    for typed in ("0x1", "1e1", "-5", "0b11"):
        box = browser.find_element(By.ID, "create-soak")
        box.clear()
        box.send_keys(typed)
        browser.find_element(By.ID, "create-submit").click()
        said = _text(browser, "#create-error")
        assert said.startswith(f'Soak (s): "{typed}" is not a number'), said
        assert _attr(browser, "#create-soak", "aria-invalid") == "true"
        assert _dialog(browser) == "closed"
    _create(browser, selectors="group:cams", waves="1,100%", soak="600",
            **{"max-failures": "0", "min-success": "150"})
    asked = _text(browser, "#confirm")
    browser.save_screenshot(str(tmp_path / "create-dialog.png"))
    assert "digits 2.0.0" in asked and "group:cams" in asked and "3 of the devices" in asked
    assert _text(browser, "#create-error") == "" and _attr(browser, "#create-soak",
                                                             "aria-invalid") is None
    browser.find_element(By.ID, "confirm-ok").click()
    wait_until(lambda: _dialog(browser) == "refused", 10, what="the refusal")
    error = _text(browser, "#confirm-error")
    assert "(400)" in error and "gates.min_success_pct (--min-success)" in error, error
    assert "got 150" in error and "docs/fleet.md" in _text(browser, "#confirm-hint")
    assert _attr(browser, "#create-min-success", "aria-invalid") == "true"
    browser.save_screenshot(str(tmp_path / "create-refused.png"))
    browser.find_element(By.ID, "confirm-cancel").click()
    assert fleet.client().get("/api/v1/rollouts") == []

    _create(browser, **{"min-success": "100"})
    browser.find_element(By.ID, "confirm-ok").click()
    wait_until(lambda: _dialog(browser) == "closed", 10, what="the rollout created")
    (created,) = fleet.client().get("/api/v1/rollouts")
    rollout = created["id"]
    assert created["spec"]["waves"] == ["1", "100%"] and created["spec"]["soak_s"] == 600
    assert created["spec"]["gates"]["min_success_pct"] == 100
    assert created["created_by"] == "alice"
    assert f"Rollout {rollout} created" in _text(browser, "#notice")
    wait_until(lambda: ("alice", "rollout.create", rollout, "ok") in _history(browser), 10,
               what="the creation in the history")
    assert browser.find_element(By.ID, "create-panel").is_displayed() is False

    # the stream re-renders the rollouts: a button stays the same element (a click on it is
    # not lost), known by a property set on it
    pause = f'[data-rollout="{rollout}"] button[data-verb="pause"]'
    wait_until(lambda: _attr(browser, pause, "data-verb"), 10, what="the pause button")
    browser.execute_script("document.querySelector(arguments[0]).keptAcross = 'yes'", pause)
    renders = int(_attr(browser, "#rollouts", "data-renders") or 0)
    wait_until(lambda: int(_attr(browser, "#rollouts", "data-renders") or 0) >= renders + 2, 15,
               what="the rollouts rendered again")
    assert browser.execute_script(
        "const b = document.querySelector(arguments[0]); return b && b.keptAcross;",
        pause) == "yes"

    # a dialog cancelled does nothing
    _click(browser, f'[data-rollout="{rollout}"] button[data-verb="pause"]')
    wait_until(lambda: _dialog(browser) == "asking", 10, what="the pause dialog")
    browser.find_element(By.ID, "confirm-cancel").click()
    assert _dialog(browser) == "closed" and _state(fleet, rollout) == "RUNNING"

    said = _act(browser, fleet, rollout, "pause", "PAUSED")
    assert f"Pause rollout {rollout}?" in said and "none is committed" in said
    browser.save_screenshot(str(tmp_path / "paused.png"))
    assert "goes on sending" in _act(browser, fleet, rollout, "resume", "RUNNING")
    assert _text(browser, "#notice").startswith(f"Rollout {rollout} resumed")

    # a page of another origin tries to act: refused by the controller, nothing changes
    before = fleet.client().get("/api/v1/history")
    with _AttackerPage(url, rollout) as attacker, caplog.at_level(logging.INFO):
        browser.get(attacker.url)
        wait_until(lambda: browser.title.startswith("fetch"), 10, what="the forged fetch")
        assert browser.title.startswith("fetch blocked"), browser.title  # the preflight
        browser.execute_script("document.getElementById('forged').submit()")
        wait_until(lambda: "cross-site" in browser.find_element(By.TAG_NAME, "body").text, 10,
                   what="the controller's answer to the forged form")
        answer = json.loads(browser.find_element(By.TAG_NAME, "body").text)
    assert answer["error"].startswith("cross-site request refused"), answer
    refused = [r.getMessage() for r in caplog.records if "cross-site" in r.getMessage()]
    assert any(m.startswith(f"refused OPTIONS /api/v1/rollouts/{rollout}/pause") for m in refused)
    assert any(m.startswith(f"refused POST /api/v1/rollouts/{rollout}/abort") for m in refused)
    assert _state(fleet, rollout) == "RUNNING"
    assert fleet.client().get("/api/v1/history") == before

    browser.get(f"{url}/dashboard/")  # the tab still holds the token
    wait_until(lambda: _attr(browser, f'article[data-rollout="{rollout}"]', "data-state")
               == "RUNNING", 20, what="the page back, no token asked")
    assert "rolled back" in _act(browser, fleet, rollout, "abort", "ABORTED")
    assert "cannot be undone" in _act(browser, fleet, rollout, "rollback", "ROLLED_BACK")
    wait_until(lambda: len(_on(fleet, "1.0.0")) == 3, 30, what="every device on 1.0.0 again")
    assert browser.find_elements(By.CSS_SELECTOR, f'[data-rollout="{rollout}"] button') == []

    # a token the controller does not know (replaced while the page was open): the
    # controller's error shown in the dialog, nothing created
    browser.find_element(By.ID, "new-rollout").click()
    _create(browser, selectors="group:cams", **{"max-failures": "10", "min-success": ""})
    assert "at least 90% of a wave succeeded" in _text(browser, "#confirm")  # 100 − 10
    browser.execute_script("sessionStorage.setItem('edgefleet-token', 'not-a-known-token')")
    browser.find_element(By.ID, "confirm-ok").click()
    wait_until(lambda: _shown(browser, "#login"), 10, what="the token form again")
    assert _text(browser, "#login-error") == (
        "The controller does not know this token (any more): enter a token.")
    assert _dialog(browser) == "closed" and _kept_token(browser) is None
    assert not _shown(browser, "#fleet-view") and not _shown(browser, "#whoami")
    assert len(fleet.client().get("/api/v1/rollouts")) == 1

    # a viewer's token (a wall screen): its name and role shown, no action offered where an
    # operator's token has some
    other = fleet.client().post("/api/v1/rollouts", {"model": "digits:2.0.0",
                                                     "selectors": ["group:nobody-here"]})
    log_in(browser, url, VIEWER_TOKEN)
    card = f'article[data-rollout="{other["id"]}"]'
    wait_until(lambda: _attr(browser, card, "data-state"), 20, what="the other rollout's card")
    assert _attr(browser, card, "data-state") != "ROLLED_BACK"  # an operator could act on it
    assert _text(browser, "#whoami") == "wall · viewer"
    assert browser.find_elements(By.CSS_SELECTOR, "#rollouts button") == []
    assert not _shown(browser, "#new-rollout")

    # a read refused the same way: a device moved to another group, the page reads the list
    browser.execute_script("sessionStorage.setItem('edgefleet-token', 'not-a-known-token')")
    moved = sorted(d["id"] for d in fleet.client().get("/api/v1/devices"))[:1]
    fleet.client().post("/api/v1/devices/group", {"devices": moved, "group": "lobby"})
    wait_until(lambda: _shown(browser, "#login"), 15, what="the token form after a read")
    assert "does not know this token (any more)" in _text(browser, "#login-error")
    assert _kept_token(browser) is None

    # the page's own: no script error, nothing its CSP blocked (the 400 and 401 answers
    # above are logged by the browser; so is the other page's fetch that it blocked)
    problems = [e["message"] for e in _severe(browser) if not (
        "Failed to load resource" in e["message"] or e["message"].startswith(attacker.url))]
    assert problems == []


def _severe(driver: Chrome) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e for e in entries if e["level"] == "SEVERE"]


class _AttackerPage:
    """A page on another origin (``localhost`` and another port, so another site) that
    fetches a pause with the operator's token, and holds a form that posts an abort."""

    def __init__(self, controller: str, rollout: str) -> None:
        base = f"{controller}/api/v1/rollouts/{rollout}"
        page = f"""<!doctype html><title>loading</title>
<form id="forged" method="POST" action="{base}/abort" enctype="text/plain">
<input type="hidden" name='{{"a":"' value='"}}'></form>
<script>
fetch("{base}/pause", {{method: "POST", headers: {{Authorization: "Bearer {TOKEN}"}}}})
  .then(r => {{ document.title = "fetch answered " + r.status; }},
        e => {{ document.title = "fetch blocked: " + e; }});
</script>""".encode()

        class Page(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://localhost:{self._httpd.server_address[1]}/"

    def __enter__(self) -> _AttackerPage:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# --- the same rules over plain HTTP -------------------------------------------------------

def _call(url: str, method: str = "POST", headers: dict[str, str] | None = None,
          body: bytes = b"{}") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=None if method in ("GET", "HEAD") else body,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_writes_from_another_origin_are_refused_before_the_token_is_looked_at(
        controller: Fleet) -> None:
    assert controller.api is not None
    url = controller.api.url
    pause = f"{url}/api/v1/rollouts/r1/pause"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for forged in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                   {"Origin": f"http://localhost:{controller.api.port}"},
                   {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                   {"Origin": url, "Sec-Fetch-Site": "cross-site"}):
        for token in (bearer, {}):
            status, headers, raw = _call(pause, headers={**forged, **token})
            assert status == 403, (forged, token, raw)
            error = json.loads(raw)
            assert error["error"].startswith("cross-site request refused"), error
            assert "/dashboard/" in error["hint"]
    for method in ("PUT", "DELETE", "OPTIONS"):
        status, headers, _ = _call(pause, method, {"Origin": "http://evil.example", **bearer,
                                                   "Access-Control-Request-Method": "POST"})
        assert status == 403 and not any(h.lower().startswith("access-control-") for h in headers)
    # the page's own origin, the CLI (no Origin) and a typed address pass on to the API
    for own in ({"Origin": url}, {"Origin": url, "Sec-Fetch-Site": "same-origin"}, {},
                {"Sec-Fetch-Site": "none"}):
        status, _, raw = _call(pause, headers={**own, **bearer})
        assert status == 404 and b"no rollout 'r1'" in raw, (own, raw)
    # ?token= is for GET alone (the event stream): a write needs the header
    status, _, raw = _call(f"{pause}?token={TOKEN}", headers={"Origin": url})
    assert status == 401 and b"needs a token" in raw
    # reads allow no other origin either: no CORS header, whoever asks
    status, headers, _ = _call(f"{url}/api/v1/overview", "GET",
                               {"Origin": "http://evil.example", **bearer})
    assert status == 200 and not any(h.lower().startswith("access-control-") for h in headers)


def test_the_page_is_served_with_a_policy_that_allows_only_its_own_files(
        controller: Fleet) -> None:
    assert controller.api is not None
    for name in ("", "app.js", "style.css"):
        status, headers, _ = _call(f"{controller.api.url}/dashboard/{name}", "GET")
        assert status == 200
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe" not in csp and "default-src 'none'" in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
    assert headers == {**headers, **dashboard.PAGE_HEADERS}


def test_the_page_has_no_inline_script_and_sets_outside_text_as_text() -> None:
    html = (STATIC / "index.html").read_text()
    assert html.count("<script") == 1 and '<script src="app.js"></script>' in html
    assert " style=" not in html and not any(f" on{e}=" in html for e in ("click", "load",
                                                                          "submit", "error"))
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", 'setAttribute("style"'):
        assert sink not in script, sink


# --- the origin check alone ---------------------------------------------------------------

def _check(headers: dict[str, str], scheme: str = "http",
           public_url: str | list[str] = "http://10.0.0.2:8600", method: str = "POST") -> bool:
    """True when the write passes, False when refused as cross-site."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        check_same_origin(method, lambda name: lowered.get(name.lower()), scheme, public_url)
    except RequestError as exc:
        assert exc.status == 403
        return False
    return True


def test_the_origin_check_knows_the_controller_by_its_host_or_its_public_url() -> None:
    assert _check({"Origin": "http://ctrl.lan:8600", "Host": "ctrl.lan:8600"})
    assert _check({"Origin": "http://CTRL.lan:8600", "Host": "ctrl.LAN:8600"})
    assert _check({"Origin": "https://ctrl.lan", "Host": "ctrl.lan:443"}, "https")
    assert _check({"Origin": "http://10.0.0.2:8600", "Host": "127.0.0.1:8600"})  # public URL
    # a TLS proxy in front: the page's origin is the public URL's
    assert _check({"Origin": "https://fleet.example", "Host": "127.0.0.1:8600"},
                  public_url="https://fleet.example/")
    assert not _check({"Origin": "https://ctrl.lan", "Host": "ctrl.lan"})  # 443 is not 80
    assert not _check({"Origin": "http://ctrl.lan:8601", "Host": "ctrl.lan:8600"})
    assert not _check({"Origin": "http://user@ctrl.lan:8600", "Host": "ctrl.lan:8600"})
    assert not _check({"Origin": "file://", "Host": "ctrl.lan:8600"})
    assert not _check({"Origin": "http://ctrl.lan:8600"})  # no Host: only the public URL
    assert _check({"Origin": "http://evil.example"}, method="GET")  # reads: not this check


@settings(max_examples=150, deadline=200)
@given(origin=st.text(max_size=200), host=st.text(max_size=100),
       site=st.sampled_from(["", "same-origin", "none", "same-site", "cross-site", "x"]))
def test_any_origin_host_or_fetch_site_text_is_let_through_or_refused_with_403(
        origin: str, host: str, site: str) -> None:
    headers = {"Origin": origin, "Host": host, "Sec-Fetch-Site": site}
    passed = _check(headers)
    if site in ("same-site", "cross-site", "x"):
        assert not passed
    if not origin.strip() and site in ("", "same-origin", "none"):
        assert passed


# --- refusals, caching, accepted origins --------------------------------------------------

def test_a_rolled_back_rollout_refuses_every_action_in_plain_words(
        controller: Fleet, v2: Path) -> None:
    assert controller.api is not None
    client = controller.client()
    client.upload("/api/v1/models", v2.read_bytes())
    created = client.post("/api/v1/rollouts", {"model": "digits:2.0.0",
                                               "selectors": ["group:nobody-here"]})
    rollout = created["id"]
    assert client.post(f"/api/v1/rollouts/{rollout}/rollback")["state"] == "ROLLED_BACK"
    said = {}
    bearer = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for verb in ("pause", "resume", "abort", "rollback"):
        status, headers, raw = _call(f"{controller.api.url}/api/v1/rollouts/{rollout}/{verb}",
                                     headers=bearer)
        assert status == 409, (verb, raw)
        assert headers["Cache-Control"] == "no-store"
        said[verb] = json.loads(raw)
    assert said["pause"]["error"] == f"cannot pause rollout {rollout}: it is ROLLED_BACK"
    assert said["pause"]["hint"] == "only a rollout that is RUNNING or WAITING can be paused"
    assert said["resume"]["error"] == f"cannot resume rollout {rollout}: it is ROLLED_BACK"
    assert said["resume"]["hint"] == "only a paused rollout can be resumed"
    assert said["abort"]["error"] == f"cannot abort rollout {rollout}: it is ROLLED_BACK"
    assert said["abort"]["hint"] == "it has already ended"
    assert said["rollback"]["error"] == f"cannot roll back rollout {rollout}: it is ROLLED_BACK"
    assert "already been rolled back" in said["rollback"]["hint"]
    history = [(e["action"], e["outcome"]) for e in client.get(f"/api/v1/history?target={rollout}")]
    assert history.count(("rollout.rollback", "ok")) == 1
    assert ("rollout.rollback", "refused") in history


def test_the_page_and_the_api_answers_are_never_stored_by_the_browser(
        controller: Fleet) -> None:
    assert controller.api is not None
    url = controller.api.url
    for path in ("/dashboard/", "/dashboard/app.js"):
        assert _call(f"{url}{path}", "GET")[1]["Cache-Control"] == "no-store"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/api/v1/overview", "/api/v1/devices", "/api/v1/nothing-here"):
        assert _call(f"{url}{path}", "GET", bearer)[1]["Cache-Control"] == "no-store", path
    assert _call(f"{url}/api/v1/overview", "GET")[1]["Cache-Control"] == "no-store"  # 401


def test_allow_origin_names_the_pages_that_may_act_apart_from_the_public_url() -> None:
    # a TLS proxy that keeps Host: the page is https://ctrl.lan, the request comes over http
    proxied = {"Origin": "https://ctrl.lan", "Host": "ctrl.lan"}
    assert not _check(proxied)
    assert _check(proxied, public_url=["https://ctrl.lan"])
    # with --allow-origin the public URL (where devices download) no longer decides
    devices = {"Origin": "http://10.0.0.2:8600", "Host": "127.0.0.1:8600"}
    assert _check(devices)
    assert not _check(devices, public_url=["https://fleet.example"])
    assert _check({"Origin": "https://fleet.example", "Host": "127.0.0.1:8600"},
                  public_url=["https://a.example", "https://fleet.example/"])
    # the page's own Host still passes
    assert _check({"Origin": "http://ctrl.lan:8600", "Host": "ctrl.lan:8600"},
                  public_url=["https://fleet.example"])


def test_fleet_serve_refuses_an_allow_origin_that_is_no_origin(tmp_path: Path,
                                                              signing_keys: Keys) -> None:
    import socket

    from typer.testing import CliRunner

    from edgefleet.cli import app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(app, ["fleet", "serve", "--fleet", "f1",
                                      "--trusted-key", str(signing_keys.public),
                                      "--token", f"alice={TOKEN}",
                                      "--allow-origin", "fleet.example",
                                      "--data-dir", str(tmp_path / "d"),
                                      "--http", f"127.0.0.1:{port}"])
    assert result.exit_code != 0
    assert "--allow-origin 'fleet.example' is not an http(s) origin" in result.output


def test_a_comma_between_selectors_is_refused_with_one_selector_per_line_as_the_hint() -> None:
    from edgefleet.fleet.rollout.selector import SelectorError, parse_selector

    with pytest.raises(SelectorError) as refused:
        parse_selector("group:a, group:b")
    assert "',' does not separate selectors" in refused.value.message
    assert "one selector per line" in (refused.value.hint or "")
