"""Process CPU and memory, and the device temperature where the OS exposes it."""

from __future__ import annotations

from pathlib import Path

import psutil

__all__ = ["SystemProbe"]

_THERMAL = Path("/sys/class/thermal")


class SystemProbe:
    """CPU percent since the previous reading, RSS, temperature in °C (or None)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)

    def values(self) -> dict[str, float | int | None]:
        return {"cpu_percent": round(self._process.cpu_percent(None), 1),
                "rss_bytes": int(self._process.memory_info().rss),
                "temperature_c": temperature_c()}


def temperature_c() -> float | None:
    """The first thermal zone's reading (Raspberry Pi: the SoC), else psutil's sensors."""
    for zone in sorted(_THERMAL.glob("thermal_zone*/temp")):
        try:
            return round(int(zone.read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            continue
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    try:
        readings = sensors()
    except (OSError, RuntimeError):
        return None
    for entries in readings.values():
        if entries:
            return round(float(entries[0].current), 1)
    return None
