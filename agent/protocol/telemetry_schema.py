"""The schema of a telemetry point's ``values``: what the agent publishes, checked on arrival.

The agent builds ``values`` in ``agent/core.py`` (``Agent.telemetry_values``: a
``versions`` map of per-version windows, the active version's window again as flat keys,
``drift``, running totals, probation ``agreement``) and ``agent/telemetry/reporter.py``
(``schema_version``, ``seq``, process figures, spool counters). Every field is optional
(an agent serving nothing sends no ``model``); a field that is present must be of its
kind:

=========================  ===================================================================
count                      null or a JSON integer, 0 to 2**53 (``seq``, ``inferences``, ``errors``,
                           ``inferences_total``, ``errors_total``, ``rss_bytes``,
                           ``spool_dropped``, ``spool_pending``, agreement ``samples`` and
                           ``dropped``)
measure                    null or a finite number, 0 to 1e12 (``latency_p50_ms``,
                           ``latency_p95_ms``, ``latency_p99_ms``, ``throughput_rps``,
                           ``cpu_percent``)
``temperature_c``          null or a finite number, -273.15 to 1000
``top1``                   null or a finite number, 0 to 1; ``cosine`` -1 to 1
``model``                  a bundle name (``NAME_PATTERN``)
``model_version``          a semantic version of at most 128 characters; so are the keys
                           of ``versions`` (at most :data:`MAX_VERSIONS` of them)
``versions``               an object: version -> window (the counts and measures above,
                           and ``agreement``)
``agreement``              an object: ``against`` (a version), ``samples``, ``dropped``,
                           ``top1``, ``cosine``
``models``                 an object: model name (``NAME_PATTERN``) -> that model's values,
                           at most :data:`MAX_MODELS` of them (an agent of several models);
                           each is checked exactly as the point's own values (bar
                           ``models``), its ``model`` (when present) is its key, and a bad
                           one refuses the point whole
``drift``                  an object of finite numbers, lists and short strings, at most
                           :data:`MAX_DRIFT_DEPTH` deep, beside ``model`` and
                           ``model_version``; a window that is not is dropped alone
                           (:func:`drift_problem`): it summarises what the device was sent,
                           and the point's counts are still good
=========================  ===================================================================

Unknown fields are allowed (a newer agent may add some) and read by nobody. NaN and
Infinity are not JSON: a point carrying them where a number is expected is refused,
never averaged. The checks are by hand and cost a few microseconds a point: a
controller takes in thousands of points a second.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from edgefleet.agent.protocol.errors import PayloadError, SchemaVersionError
from edgefleet.agent.protocol.payloads import MAX_MODELS, Telemetry
from edgefleet.agent.protocol.schema import NAME_PATTERN, SEMVER_PATTERN, is_supported

__all__ = ["MAX_BATCH", "MAX_COUNT", "MAX_DRIFT_DEPTH", "MAX_MODELS", "MAX_VERSIONS",
           "TelemetrySchemaError", "check_points", "check_values", "drift_problem"]

MAX_COUNT = 2**53  # integers JSON readers everywhere keep exactly
MAX_BATCH = 1000  # points in one message (the agent replays its spool 50 at a time)
MAX_MEASURE = 1e12
MAX_VERSIONS = 64
MAX_VERSION_TEXT = 128
MAX_DRIFT_DEPTH = 6
MAX_DRIFT_TEXT = 256
_NAME, _SEMVER = re.compile(NAME_PATTERN), re.compile(SEMVER_PATTERN)
_NUMBER = (int, float)
SUPPORTED_VERSIONS = Telemetry.SUPPORTED_VERSIONS  # of ``values`` (agent.telemetry.reporter)


class TelemetrySchemaError(PayloadError):
    """A telemetry point whose ``values`` break the schema; ``field`` is the path to it."""

    def __init__(self, field: str, value: Any, expected: str = "") -> None:
        shown = type(value).__name__ if isinstance(value, dict | list) else repr(value)[:60]
        expected = expected or _EXPECTED.get(_leaf(field), "valid")
        super().__init__(f"telemetry value {field} is not {expected}, got {shown}",
                         hint="see docs/protocol.md, telemetry")
        self.field = field


def _leaf(field: str) -> str:
    return field.rpartition(".")[2]


def _top1(value: Any) -> bool:
    return value is None or (type(value) in _NUMBER and 0 <= value <= 1)


def _cosine(value: Any) -> bool:
    return value is None or (type(value) in _NUMBER and -1 <= value <= 1)


def _temperature(value: Any) -> bool:
    return value is None or (type(value) in _NUMBER and -273.15 <= value <= 1000)


# names and versions that matched already (a few per fleet), each kind in its own set: a
# name such as "x" is no version
_KNOWN_NAMES: set[str] = set()
_KNOWN_VERSIONS: set[str] = set()
_KNOWN_MAX = 4096


def _name(value: Any) -> bool:
    return type(value) is str and (
        value in _KNOWN_NAMES or _learn(_KNOWN_NAMES, value, _NAME.match(value)))


def _version(value: Any) -> bool:
    return type(value) is str and (value in _KNOWN_VERSIONS or (
        len(value) <= MAX_VERSION_TEXT
        and _learn(_KNOWN_VERSIONS, value, _SEMVER.match(value))))


def _learn(known: set[str], value: str, match: re.Match[str] | None) -> bool:
    if match is None:
        return False
    if len(known) >= _KNOWN_MAX:
        known.clear()
    known.add(value)
    return True


# field tables: a key checked by kind in one inline loop each (no call per field: the
# controller checks every field of thousands of points a second)
_COUNTS = ("seq", "inferences", "errors", "inferences_total", "errors_total", "rss_bytes",
           "spool_dropped", "spool_pending")
_MEASURES = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "throughput_rps",
             "cpu_percent")
_WINDOW_COUNTS = ("inferences", "errors")
_WINDOW_MEASURES = _MEASURES[:4]
_AGREEMENT_COUNTS = ("samples", "dropped")
_OTHERS: dict[str, Callable[[Any], bool]] = {
    "model": _name, "model_version": _version, "temperature_c": _temperature}
_EXPECTED = {**dict.fromkeys(("inferences", "errors", "seq", "inferences_total",
                              "errors_total", "rss_bytes", "spool_dropped", "spool_pending",
                              "samples", "dropped"), "a whole number from 0 to 2**53"),
             **dict.fromkeys(("latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
                              "throughput_rps", "cpu_percent"),
                             "null or a finite number from 0 to 1e12"),
             "temperature_c": "null or a finite number of degrees Celsius",
             "top1": "null or a number from 0 to 1", "cosine": "null or a number from -1 to 1",
             "model": "a bundle name", "model_version": "a semantic version",
             "against": "a semantic version", "versions": "an object of version windows",
             "agreement": "an object", "models": "an object of model windows"}


def check_points(data: Any) -> list[tuple[int, dict[str, Any]]]:
    """``(ts, values)`` of a decoded telemetry message: one ``{"ts", "values"}`` point or a
    batch (a JSON array of at most :data:`MAX_BATCH`), every point checked whole."""
    items = data if type(data) is list else [data]
    if len(items) > MAX_BATCH:
        raise PayloadError(f"telemetry batch of {len(items)} points; at most {MAX_BATCH}",
                           hint="replay a spool in smaller batches")
    return [_point(item) for item in items]


def _point(item: Any) -> tuple[int, dict[str, Any]]:
    values = item.get("values") if type(item) is dict else None
    if type(values) is not dict:
        raise PayloadError('telemetry point must be {"ts": ms, "values": {...}}',
                           hint="see docs/protocol.md, telemetry")
    ts = item.get("ts")
    if type(ts) is not int or not 0 <= ts <= MAX_COUNT:
        raise PayloadError(f"telemetry ts must be a whole number of milliseconds from 0 to "
                           f"2**53, got {repr(ts)[:40]}", hint="see docs/protocol.md, telemetry")
    version = values.get("schema_version")
    if not is_supported(version, SUPPORTED_VERSIONS):
        raise SchemaVersionError(
            f"telemetry has schema_version {repr(version)[:40]}; this edgefleet reads "
            f"{sorted(SUPPORTED_VERSIONS)}", hint="upgrade edgefleet on this side, or produce "
                                                  "the document with a matching version")
    check_values(values)
    return ts, values


def check_values(values: dict[str, Any]) -> None:
    """Raise :class:`TelemetrySchemaError` naming the first field of ``values`` that
    breaks the schema (``schema_version`` is checked by the caller). Each window of
    ``models`` is checked as ``values`` itself is."""
    _window(values, "")
    models = values.get("models")
    if models is not None:
        _models(models)


def _window(values: dict[str, Any], prefix: str) -> None:
    _fields(values, _COUNTS, _MEASURES, prefix)
    for key, check in _OTHERS.items():
        if key in values and not check(values[key]):
            raise TelemetrySchemaError(f"{prefix}{key}", values[key])
    versions = values.get("versions")
    if versions is not None:
        _versions(versions, prefix)
    agreement = values.get("agreement")
    if agreement is not None:
        _agreement(agreement, f"{prefix}agreement")


def _models(models: Any) -> None:
    """``models``: name -> the values of that model, each a point's values bar ``models``."""
    if type(models) is not dict or len(models) > MAX_MODELS:
        raise TelemetrySchemaError("models", models)
    for name, window in models.items():
        if not _name(name):
            raise TelemetrySchemaError("models key", name)
        if type(window) is not dict or "models" in window:
            raise TelemetrySchemaError(f"models.{name}", window)
        _window(window, f"models.{name}.")
        if "model" in window and window["model"] != name:
            raise TelemetrySchemaError(f"models.{name}.model", window["model"],
                                       f"its key {name!r} (a window names its own model)")


def drift_problem(values: dict[str, Any]) -> str:
    """Why the point's ``drift`` window cannot be used ("" when it can, or has none).

    Not a reason to refuse the point: a drift window summarises what the device was
    sent (one request of Infinity makes its input statistics infinite), and its counts
    and latencies are still good. The window alone is dropped.
    """
    drift = values.get("drift")
    if drift is None:
        return ""
    if not (type(drift) is dict and _plain(drift, MAX_DRIFT_DEPTH)):
        return ("drift must be an object of finite numbers, short strings, lists and "
                f"objects at most {MAX_DRIFT_DEPTH} levels deep")
    if "model" not in values or "model_version" not in values:
        return "a drift window needs model and model_version beside it"
    return ""


def _fields(values: dict[str, Any], counts: tuple[str, ...], measures: tuple[str, ...],
            prefix: str) -> None:
    """Counts and measures of ``values`` (null or absent: not reported)."""
    get = values.get
    for key in counts:
        value = get(key)
        if value is not None and not (type(value) is int and 0 <= value <= MAX_COUNT):
            raise TelemetrySchemaError(f"{prefix}{key}", value)
    for key in measures:  # NaN fails both comparisons, Infinity the upper one
        value = get(key)
        if value is not None and not (type(value) in _NUMBER and 0 <= value <= MAX_MEASURE):
            raise TelemetrySchemaError(f"{prefix}{key}", value)


def _versions(versions: Any, prefix: str) -> None:
    if type(versions) is not dict or len(versions) > MAX_VERSIONS:
        raise TelemetrySchemaError(f"{prefix}versions", versions)
    for version, window in versions.items():
        if not _version(version):
            raise TelemetrySchemaError(f"{prefix}versions key", version)
        field = f"{prefix}versions.{version}"
        if type(window) is not dict:
            raise TelemetrySchemaError(field, window)
        _fields(window, _WINDOW_COUNTS, _WINDOW_MEASURES, f"{field}.")
        agreement = window.get("agreement")
        if agreement is not None:
            _agreement(agreement, f"{field}.agreement")


def _agreement(agreement: Any, field: str) -> None:
    if type(agreement) is not dict:
        raise TelemetrySchemaError(field, agreement)
    _fields(agreement, _AGREEMENT_COUNTS, (), f"{field}.")
    top1, cosine, against = agreement.get("top1"), agreement.get("cosine"), agreement.get(
        "against")
    if not _top1(top1):
        raise TelemetrySchemaError(f"{field}.top1", top1)
    if not _cosine(cosine):
        raise TelemetrySchemaError(f"{field}.cosine", cosine)
    if against is not None and not _version(against):
        raise TelemetrySchemaError(f"{field}.against", against)


def _plain(value: Any, depth: int) -> bool:
    """Finite numbers (integers within 2**53), booleans, nulls, short strings, lists and
    objects, ``depth`` deep."""
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    if kind is int:
        return bool(-MAX_COUNT <= value <= MAX_COUNT)
    if kind is bool or value is None:
        return True
    if kind is str:
        return len(value) <= MAX_DRIFT_TEXT
    if depth <= 0:
        return False
    if kind is list:
        return all(_plain(item, depth - 1) for item in value)
    if kind is dict:
        return all(len(k) <= MAX_DRIFT_TEXT and _plain(v, depth - 1) for k, v in value.items())
    return False
