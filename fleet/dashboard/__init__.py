"""The live fleet page served by the controller (placeholder until the page lands)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.controller import FleetController

__all__ = ["static_file", "stream"]


def static_file(path: str) -> tuple[str, bytes] | None:
    """(content type, bytes) of a page file at ``path`` ("/" is the page), or None."""
    return None


def stream(controller: FleetController, write: Callable[[bytes], None],
           stop: threading.Event) -> None:
    """Write server-sent events until ``stop`` is set or ``write`` raises."""
    write(b": no stream yet\n\n")
