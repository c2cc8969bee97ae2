"""Prometheus metrics of the fleet (placeholder until the metrics land)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.controller import FleetController

__all__ = ["FleetMetrics"]


class FleetMetrics:
    def __init__(self, controller: FleetController) -> None:
        self.controller = controller

    def render(self) -> tuple[str, bytes]:
        """(content type, body) for ``GET /metrics``."""
        return "text/plain; version=0.0.4; charset=utf-8", b""
