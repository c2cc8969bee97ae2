"""Rollout options from outside, checked whole before anything is stored.

Options come as JSON from the API (``POST /api/v1/rollouts``), from the CLI's flags and
from a follower's relayed request. :func:`check_options` takes them as a mapping and
either returns the checked values or raises :class:`RolloutOptionError` naming the field
(and its CLI flag): every number must be a finite JSON number (never NaN, Infinity, a
string or a bool) within its range, every selector one the grammar reads
(:mod:`edgefleet.fleet.rollout.selector`: names of 1-64 printable characters, ``device:``
contract ids), ``start_at`` ISO 8601 with a zone and every window one
:func:`edgefleet.fleet.rollout.schedule.parse_window` reads, and there are at most
:data:`MAX_SELECTORS` selectors, :data:`MAX_WINDOWS` windows and :data:`MAX_WAVES`
waves. Unknown fields are refused (a typo would otherwise be ignored in silence).

The failure gates agree by default: ``min_success_pct`` left out is ``100 -
max_failures_pct`` (``--max-failures 20`` alone lets a wave with 20% failed devices
advance instead of aborting it on the first failure); both given so that the failures
one allows are refused by the other (``min_success_pct + max_failures_pct > 100``) is
refused, naming both.

Stored rollouts are not checked again when they are loaded: a store written by an
earlier edgefleet may hold options these checks refuse, and the controller stops such a
rollout when its tick fails instead of refusing to start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.fleet.errors import InvalidRolloutError
from edgefleet.fleet.rollout.schedule import (
    MAX_WINDOWS,
    Schedule,
    ScheduleError,
    parse_start_at,
    parse_window,
)
from edgefleet.fleet.rollout.selector import SelectorError, Target, parse_selector
from edgefleet.fleet.rollout.spec import WAVE, Gates, RolloutSpec, Wave

__all__ = ["MAX_DURATION_S", "MAX_EXPONENTIAL", "MAX_LABEL", "MAX_RATE_PER_MIN",
           "MAX_SELECTORS", "MAX_WAVES", "MAX_WAVE_DEVICES", "CheckedOptions",
           "RolloutOptionError", "check_options", "rollout_spec"]

MAX_SELECTORS = 1000
MAX_WAVES = 100
MAX_WAVE_DEVICES = 10_000_000  # a wave given as a count of devices
MAX_LABEL = 64  # characters of a group or tag selector
MAX_RATE_PER_MIN = 1_000_000.0
MAX_EXPONENTIAL = 10.0  # the rate of the last of 100 waves stays a finite number
MAX_DURATION_S = 30 * 24 * 3600.0  # device timeout and soak: 30 days
MAX_P95_RATIO = 1000.0
MAX_MIN_SAMPLES = 1_000_000_000
_T = TypeVar("_T")

FLAGS = {"selectors": "--to", "waves": "--waves", "rate_per_min": "--rate",
         "exponential": "--exponential", "device_timeout_s": "--device-timeout",
         "soak_s": "--soak", "gates": "--max-failures ...",
         "gates.max_failures_pct": "--max-failures", "gates.min_success_pct": "--min-success",
         "gates.max_p95_ratio": "--max-p95-ratio", "gates.max_error_rate_pct": "--max-error-rate",
         "gates.min_agreement_pct": "--min-agreement", "gates.min_samples": "--min-samples",
         "start_at": "--start-at", "windows": "--window"}
_OPTIONS = frozenset(f for f in FLAGS if "." not in f)
_GATES = frozenset(f.partition(".")[2] for f in FLAGS if f.startswith("gates."))


class RolloutOptionError(InvalidRolloutError):
    """One rollout option refused: ``field`` is its name in the API's JSON body."""

    def __init__(self, field: str, problem: str, hint: str = "") -> None:
        flag = FLAGS.get(field)
        super().__init__(f"rollout option {field}{f' ({flag})' if flag else ''} {problem}",
                         hint=hint or "see docs/fleet.md, rollout options")
        self.field = field


@dataclass(frozen=True)
class CheckedOptions:
    selectors: tuple[Target, ...]
    waves: tuple[Wave, ...]
    rate_per_min: float | None
    exponential: float
    device_timeout_s: float
    soak_s: float
    gates: Gates
    schedule: Schedule


def rollout_spec(options: Mapping[str, Any], model: BundleRef, url: str,
                 size: int) -> RolloutSpec:
    """The spec of a new rollout of ``model``, from options checked whole."""
    o = check_options(options)
    return RolloutSpec(model=model, url=url, size=size, selectors=o.selectors, waves=o.waves,
                       rate_per_min=o.rate_per_min, exponential=o.exponential,
                       device_timeout_s=o.device_timeout_s, soak_s=o.soak_s, gates=o.gates,
                       schedule=o.schedule)


def check_options(options: Mapping[str, Any]) -> CheckedOptions:
    """Every option checked, or :class:`RolloutOptionError` naming the first bad one."""
    _known(options, _OPTIONS, "")
    rate = options.get("rate_per_min")
    return CheckedOptions(
        selectors=_selectors(options.get("selectors")),
        waves=_waves(options.get("waves", ["100%"])),
        rate_per_min=None if rate is None else _number("rate_per_min", rate, 0.0,
                                                       MAX_RATE_PER_MIN, low_open=True),
        exponential=_number("exponential", options.get("exponential", 1.0), 1.0,
                            MAX_EXPONENTIAL),
        device_timeout_s=_number("device_timeout_s", options.get("device_timeout_s", 600.0),
                                 0.0, MAX_DURATION_S, low_open=True),
        soak_s=_number("soak_s", options.get("soak_s", 0.0), 0.0, MAX_DURATION_S),
        gates=_gates(options.get("gates")),
        schedule=_schedule(options.get("start_at"), options.get("windows")))


def _known(given: Mapping[str, Any], known: frozenset[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in given if k not in known)
    if unknown:
        raise RolloutOptionError(f"{prefix}{unknown[0][:40]}", "is not a rollout option",
                                 hint=f"known: {', '.join(sorted(known))}")


def _number(field: str, value: Any, low: float, high: float, *,
            low_open: bool = False) -> float:
    """A finite JSON number in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RolloutOptionError(field, f"must be a number, got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RolloutOptionError(field, f"must be a finite number, got {value}")
    if value < low or (low_open and value == low) or value > high:
        bound = f"above {low:g}" if low_open else f"at least {low:g}"
        raise RolloutOptionError(field, f"must be {bound} and at most {high:g}, "
                                        f"got {_figure(value)}")
    return float(value)


def _figure(value: int | float) -> str:
    """A number as the error shows it (a huge int is not turned into thousands of digits)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    return f"{value:g}"


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"int {_figure(value)}"
    return f"{type(value).__name__} {repr(value)[:40]}"


def _list(field: str, value: Any, most: int) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise RolloutOptionError(field, f"must be a non-empty list, got {_shown(value)}")
    if len(value) > most:
        raise RolloutOptionError(field, f"has {len(value)} entries; at most {most} are allowed")
    return value


def _selectors(value: Any) -> tuple[Target, ...]:
    items = _list("selectors", value, MAX_SELECTORS)
    return tuple(_selector(item) for item in items)


def _selector(item: Any) -> Target:
    if not isinstance(item, str):
        raise RolloutOptionError("selectors", f"entries must be strings, got {_shown(item)}")
    try:
        return parse_selector(item)
    except SelectorError as exc:
        raise RolloutOptionError("selectors", exc.message, hint=exc.hint) from None


def _schedule(start_at: Any, windows: Any) -> Schedule:
    start = None if start_at is None else _scheduled("start_at", parse_start_at, start_at)
    if windows is None:
        return Schedule(start)
    items = _list("windows", windows, MAX_WINDOWS)
    return Schedule(start, tuple(_scheduled("windows", parse_window, w) for w in items))


def _scheduled(field: str, parse: Callable[[str], _T], value: Any) -> _T:
    try:
        return parse(_text(field, value))
    except ScheduleError as exc:
        raise RolloutOptionError(field, exc.message, hint=exc.hint) from None


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RolloutOptionError(field, f"entries must be strings, got {_shown(value)}")
    return value


def _waves(value: Any) -> tuple[Wave, ...]:
    items = _list("waves", value, MAX_WAVES)
    waves = tuple(_wave(item) for item in items)
    if not (waves[-1].percent and waves[-1].value == 100):
        if len(waves) == MAX_WAVES:  # the spec adds a last wave of 100%
            raise RolloutOptionError("waves", f"must end at 100% within {MAX_WAVES} waves")
        waves = (*waves, Wave(100.0, True))
    return waves


def _wave(item: Any) -> Wave:
    # the whole entry: ASCII digits, no space or newline around them
    match = WAVE.fullmatch(item) if isinstance(item, str) else None
    if match is None:
        raise RolloutOptionError("waves", f"entry {_shown(item)} is not a count or a "
                                          "percentage of ASCII digits",
                                 hint="write waves like 1%,10%,50%,100%")
    value, percent = float(match.group(1)), bool(match.group(2))
    if value <= 0 or (percent and value > 100):
        raise RolloutOptionError("waves", f"entry {item!r} is out of range",
                                 hint="percentages are in (0, 100], counts above 0")
    if not percent and (value != int(value) or value > MAX_WAVE_DEVICES):
        raise RolloutOptionError("waves", f"entry {item!r} is not a whole number of "
                                          f"devices up to {MAX_WAVE_DEVICES}")
    return Wave(value, percent)


def _gates(value: Any) -> Gates:
    given = {} if value is None else value
    if not isinstance(given, dict):
        raise RolloutOptionError("gates", f"must be an object, got {_shown(given)}")
    _known(given, _GATES, "gates.")
    max_failures = _pct("max_failures_pct", given.get("max_failures_pct"), 0.0)
    min_success = _min_success(given.get("min_success_pct"), max_failures,
                               given.get("max_failures_pct") is not None)
    ratio = given.get("max_p95_ratio")
    return Gates(max_failures_pct=max_failures, min_success_pct=min_success,
                 max_p95_ratio=None if ratio is None else _number(
                     "gates.max_p95_ratio", ratio, 0.0, MAX_P95_RATIO, low_open=True),
                 max_error_rate_pct=_optional_pct("max_error_rate_pct", given),
                 min_agreement_pct=_optional_pct("min_agreement_pct", given),
                 min_samples=_count("gates.min_samples", given.get("min_samples", 20)))


def _pct(name: str, value: Any, default: float) -> float:
    return default if value is None else _number(f"gates.{name}", value, 0.0, 100.0)


def _optional_pct(name: str, given: Mapping[str, Any]) -> float | None:
    value = given.get(name)
    return None if value is None else _pct(name, value, 0.0)


def _min_success(value: Any, max_failures: float, failures_given: bool) -> float:
    """Left out: what ``max_failures`` allows. Given: it must not refuse what that allows."""
    if value is None:
        return 100.0 - max_failures
    min_success = _pct("min_success_pct", value, 100.0)
    if failures_given and min_success + max_failures > 100:
        raise RolloutOptionError(
            "gates.min_success_pct",
            f"{min_success:g} contradicts --max-failures {max_failures:g}: a wave with "
            f"{max_failures:g}% failed devices would pass --max-failures but abort below "
            f"--min-success", hint=f"pass --min-success {100 - max_failures:g} or less, or "
                                   "leave it out (it then follows --max-failures)")
    return min_success


def _count(field: str, value: Any) -> int:
    """A whole number: an int, or a float without a fraction (JSON has one number type)."""
    whole = isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not (isinstance(value, int) or whole):
        raise RolloutOptionError(field, f"must be a whole number, got {_shown(value)}")
    if not 0 <= value <= MAX_MIN_SAMPLES:
        raise RolloutOptionError(field, f"must be 0 to {MAX_MIN_SAMPLES}, got {_figure(value)}")
    return int(value)
