"""A fleet on one machine for the tests: ``edgefleet.local_fleet`` with the test keys, the
held-out digits as traffic, and a token named "alice"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefleet.local_fleet import LocalFleet, wait_until
from tests.conftest import Keys
from tests.models import load_digits

__all__ = ["TOKEN", "Fleet", "log_in", "wait_until"]

TOKEN = "ops-secret-token"


class Fleet(LocalFleet):
    def __init__(self, name: str, broker_url: str, root: Path, keys: Keys,
                 http_host: str = "127.0.0.1") -> None:
        super().__init__(name, broker_url, root, keys.trusted, load_digits().x_test,
                         token=TOKEN, token_name="alice", http_host=http_host)
        self.keys = keys

    def stop_traffic(self) -> None:
        """Stop every agent's sample traffic; the agents keep running and reporting (their
        telemetry windows then count no inference)."""
        self._stop.set()
        for thread in self._traffic:
            thread.join(timeout=5)


def _shown(driver: Any, element_id: str) -> bool:
    return bool(driver.execute_script(
        "const e = document.getElementById(arguments[0]); return !!e && !e.hidden;", element_id))


def log_in(driver: Any, url: str, token: str = TOKEN) -> None:
    """Open the web page at ``url`` (the controller's) and enter ``token`` in its form, as a
    person does (a token in the page's address is not used); returns once the page shows
    the token's name and role."""
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/dashboard/")
    wait_until(lambda: _shown(driver, "login"), 10, what="the token form")
    driver.find_element(By.ID, "login-token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait_until(lambda: _shown(driver, "whoami"), 10, what="the page open with the token")
