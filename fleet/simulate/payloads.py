"""Payloads of a simulated device, byte for byte in the agent's shapes.

A telemetry point is ``Agent.telemetry_values()`` plus what ``TelemetryReporter`` adds
(``schema_version``, ``seq``, process figures, spool counters). The process
figures are synthetic: ``cpu_percent`` is the busy share of one core implied by
the window's requests, ``rss_bytes`` a typical agent's, ``temperature_c`` null.
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgefleet.agent.telemetry.reporter import SCHEMA_VERSION

__all__ = ["SIM_RSS_BYTES", "telemetry_point"]

SIM_RSS_BYTES = 96 * 1024 * 1024


def telemetry_point(values: dict[str, Any], seq: int, cpu_percent: float,
                    spool_dropped: int, spool_pending: int) -> bytes:
    """One ``{"ts", "values"}`` point as ``TelemetryReporter._point`` builds it."""
    full = {**values, "schema_version": SCHEMA_VERSION, "seq": seq,
            "cpu_percent": cpu_percent, "rss_bytes": SIM_RSS_BYTES, "temperature_c": None,
            "spool_dropped": spool_dropped, "spool_pending": spool_pending}
    return json.dumps({"ts": int(time.time() * 1000), "values": full}).encode()
