"""Process CPU and memory, and the device temperature where the OS exposes it."""

from __future__ import annotations

from pathlib import Path

import psutil

__all__ = ["SystemProbe", "temperature_c"]

_THERMAL = Path("/sys/class/thermal")
_PLAUSIBLE_C = (-40.0, 150.0)  # outside this a sensor reports an error code, not a temperature


class SystemProbe:
    """CPU percent since the previous reading, RSS, temperature in °C (or None)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)

    def values(self) -> dict[str, float | int | None]:
        return {
            "cpu_percent": round(self._process.cpu_percent(None), 1),
            "rss_bytes": int(self._process.memory_info().rss),
            "temperature_c": temperature_c(),
        }


def temperature_c(thermal_root: Path = _THERMAL) -> float | None:
    """The first thermal zone's reading (Raspberry Pi: the SoC), else psutil's sensors."""
    for zone in sorted(thermal_root.glob("thermal_zone*/temp")):
        try:
            celsius = int(zone.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if _plausible(celsius):
            return round(celsius, 1)
    return _psutil_temperature()


def _psutil_temperature() -> float | None:
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    try:
        readings = sensors()
    except (OSError, RuntimeError):
        return None
    for entries in readings.values():
        for entry in entries:
            if _plausible(float(entry.current)):
                return round(float(entry.current), 1)
    return None


def _plausible(celsius: float) -> bool:
    return _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1]
