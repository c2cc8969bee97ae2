"""A rollout's plan, validated once when it is created and never parsed during a tick.

``RolloutSpec`` says what goes where and how: the bundle, the selectors (groups, tags,
device ids, labels and what devices report: :mod:`edgefleet.fleet.rollout.selector`),
when bundles may be sent (a start time, maintenance windows:
:mod:`edgefleet.fleet.rollout.schedule`), the waves (cumulative percentages or counts
of the selected devices, or a canary count then everyone), a start rate in devices per
minute that may grow exponentially from wave to wave, a per-device timeout, and the gates.

Gates fire strictly above (or, for minimums, strictly below) their value; exactly at the
value they do not. Percentages are 0-100.

Options from outside (API, CLI, a relayed request) are checked whole by
:mod:`edgefleet.fleet.rollout.validate` before a spec is built and stored: finite numbers, ranges,
lengths and counts. The checks here are only those a stored spec must pass to be loaded
(a store written by an earlier edgefleet may hold what ``validate`` now refuses).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.fleet.domain import Device, ref_from_dict, ref_to_dict
from edgefleet.fleet.errors import InvalidRolloutError
from edgefleet.fleet.rollout.schedule import Schedule, parse_window
from edgefleet.fleet.rollout.selector import (
    Selector,
    SelectorError,
    Target,
    Unreadable,
    parse_selector,
    parse_stored_selector,
)

__all__ = ["WAVE", "Gates", "RolloutSpec", "Schedule", "Selector", "Target", "Wave",
           "parse_duration", "parse_selector", "parse_waves", "wave_bounds"]

# ASCII digits only ("\d" would take "٣" and "²"), bounded: never inf; matched whole
# (no "$", which lets a trailing newline through)
_DURATION = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,6})?)(ms|s|m|h)?", re.ASCII)
WAVE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)(%?)", re.ASCII)  # a count or a percentage
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``500ms``, ``30s``, ``5m``, ``1h`` or a bare number of seconds -> seconds."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise InvalidRolloutError(f"duration {text[:40]!r} is not understood",
                                  hint="write it like 90s, 5m, 1h or 500ms")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Wave:
    """Where a wave ends: a cumulative percentage of the selected devices, or a count."""

    value: float
    percent: bool

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{self.value:g}"


def parse_waves(text: str) -> tuple[Wave, ...]:
    """``1%,10%,50%,100%`` or ``5,50,100%``: cumulative, growing, the last one reaching all."""
    waves = []
    # lenient on purpose: it reads stored specs too, which an earlier edgefleet may have
    # written with what validate (WAVE, ASCII digits) now refuses; such a rollout loads,
    # and the controller stops it when its tick fails
    for part in (p.strip() for p in text.split(",") if p.strip()):
        percent = part.endswith("%")
        try:
            value = float(part.rstrip("%"))
        except ValueError:
            raise InvalidRolloutError(f"wave {part[:40]!r} is not a number or a percentage",
                                      hint="write waves like 1%,10%,50%,100%") from None
        waves.append(Wave(value, percent))
    return _checked_waves(tuple(waves))


def _checked_waves(waves: tuple[Wave, ...]) -> tuple[Wave, ...]:
    if not waves:
        raise InvalidRolloutError("a rollout needs at least one wave", hint="e.g. --waves 100%")
    for wave in waves:
        if wave.value <= 0 or (wave.percent and wave.value > 100):
            raise InvalidRolloutError(f"wave {wave} is out of range",
                                      hint="percentages are in (0, 100], counts above 0")
        if not wave.percent and wave.value != int(wave.value):
            raise InvalidRolloutError(f"wave {wave} is not a whole number of devices")
    if not (waves[-1].percent and waves[-1].value == 100):
        waves = (*waves, Wave(100.0, True))  # everyone is reached in the end
    return waves


def wave_bounds(waves: tuple[Wave, ...], total: int) -> list[int]:
    """Cumulative device counts at the end of each wave (never shrinking, last = total).

    Percentages round up, so 1% of 10 devices is a canary of one.
    """
    bounds, reached = [], 0
    for wave in waves:
        count = math.ceil(wave.value * total / 100 - 1e-9) if wave.percent else int(wave.value)
        reached = min(total, max(reached, count))
        bounds.append(reached)
    return bounds


@dataclass(frozen=True)
class Gates:
    """When to stop, when to go on, and the quality the new version must keep."""

    max_failures_pct: float = 0.0  # failed / devices of the waves so far, above this aborts
    min_success_pct: float = 100.0  # a wave advances only with at least this many succeeded
    max_p95_ratio: float | None = None  # new p95 / baseline p95 above this aborts
    max_error_rate_pct: float | None = None  # new version's errors / requests, in %
    min_agreement_pct: float | None = None  # top-1 agreement with the previous model, in %
    min_samples: int = 20  # inferences on the new version before quality gates may fire

    def check(self) -> None:
        for name in ("max_failures_pct", "min_success_pct", "max_error_rate_pct",
                     "min_agreement_pct"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 100:
                raise InvalidRolloutError(f"{name.replace('_', '-')} {value} is not in 0-100")
        if self.max_p95_ratio is not None and self.max_p95_ratio <= 0:
            raise InvalidRolloutError(f"max-p95-ratio {self.max_p95_ratio} must be above 0",
                                      hint="1.5 allows the new p95 to be 50% slower")
        if self.min_samples < 0:
            raise InvalidRolloutError("min-samples must be 0 or more")


@dataclass(frozen=True)
class RolloutSpec:
    model: BundleRef
    url: str
    size: int
    selectors: tuple[Target, ...]  # a device matches if any does
    waves: tuple[Wave, ...] = (Wave(100.0, True),)
    rate_per_min: float | None = None  # devices started per minute in wave 0
    exponential: float = 1.0  # the rate of wave k is rate * exponential**k
    device_timeout_s: float = 600.0
    soak_s: float = 0.0  # how long a device stays in probation before it is committed
    gates: Gates = field(default_factory=Gates)
    schedule: Schedule = field(default_factory=Schedule)  # when bundles may be sent

    def __post_init__(self) -> None:
        if not self.selectors:
            raise InvalidRolloutError("a rollout needs a target",
                                      hint="--to group:NAME, tag:NAME or device:ID")
        object.__setattr__(self, "waves", _checked_waves(self.waves))
        if self.rate_per_min is not None and self.rate_per_min <= 0:
            raise InvalidRolloutError("--rate must be above 0 devices per minute")
        if self.exponential < 1:
            raise InvalidRolloutError(f"--exponential {self.exponential} must be 1 or more",
                                      hint="2 doubles the rate at every wave")
        if self.device_timeout_s <= 0:
            raise InvalidRolloutError("--device-timeout must be above 0")
        if self.soak_s < 0:
            raise InvalidRolloutError("--soak must be 0 or more")
        self.gates.check()

    def matches(self, device: Device) -> bool:
        return any(selector.matches(device) for selector in self.selectors)

    def unreadable(self) -> str | None:
        """What is wrong with a stored selector that did not read back (None: all did)."""
        problems = [f"selector {s.text[:80]!r} cannot be read ({s.problem})"
                    for s in self.selectors if isinstance(s, Unreadable)]
        return "; ".join(problems) or None

    def rate(self, wave: int) -> float | None:
        return None if self.rate_per_min is None else self.rate_per_min * self.exponential**wave

    def as_dict(self) -> dict[str, Any]:
        return {"model": ref_to_dict(self.model), "url": self.url, "size": self.size,
                "selectors": [str(s) for s in self.selectors],
                "waves": [str(w) for w in self.waves], "rate_per_min": self.rate_per_min,
                "exponential": self.exponential, "device_timeout_s": self.device_timeout_s,
                "soak_s": self.soak_s, "gates": asdict(self.gates),
                "start_at_ms": self.schedule.start_at_ms,
                "windows": [str(w) for w in self.schedule.windows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutSpec:
        model = ref_from_dict(data["model"])
        if model is None:
            raise InvalidRolloutError("a rollout needs a model")
        return cls(model=model, url=str(data["url"]), size=int(data["size"]),
                   selectors=tuple(_stored_selector(s) for s in data["selectors"]),
                   waves=parse_waves(",".join(data.get("waves") or ["100%"])),
                   rate_per_min=data.get("rate_per_min"),
                   exponential=float(data.get("exponential", 1.0)),
                   device_timeout_s=float(data.get("device_timeout_s", 600.0)),
                   soak_s=float(data.get("soak_s", 0.0)),
                   gates=Gates(**(data.get("gates") or {})),
                   schedule=Schedule(data.get("start_at_ms"),
                                     tuple(parse_window(w) for w in data.get("windows") or ())))


def _stored_selector(text: Any) -> Target:
    """A stored selector, or :class:`Unreadable` holding its text: a rollout whose selector
    does not read back still loads (listed, counted, stopped by its tick) instead of
    failing whatever reads the store."""
    if not isinstance(text, str):
        return Unreadable(repr(text)[:200], "a selector is text")
    try:
        return parse_stored_selector(text)
    except SelectorError as exc:
        return Unreadable(text, exc.message)
