"""A fleet on one machine for the tests: ``edgefleet.local_fleet`` with the test keys, the
held-out digits as traffic, and a token named "alice"."""

from __future__ import annotations

from pathlib import Path

from edgefleet.local_fleet import LocalFleet, wait_until
from tests.conftest import Keys
from tests.models import load_digits

__all__ = ["TOKEN", "Fleet", "wait_until"]

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
