"""What the API takes in, checked before it reaches the controller: ids, groups and tags,
model keys, rollout ids, durations, list and object shapes. Each refusal is a 400
(:class:`RequestError`) naming the field, or a :class:`RolloutOptionError` for the model."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from edgefleet.agent.protocol.errors import RequestError
from edgefleet.agent.protocol.schema import NAME_PATTERN, SEMVER_PATTERN
from edgefleet.agent.protocol.topics import check_id
from edgefleet.fleet.durations import MAX_AGE_S
from edgefleet.fleet.rollout.validate import RolloutOptionError

__all__ = ["ID_PATTERN", "LABEL_PATTERN", "contract_id", "contract_ids", "invalid", "json_int",
           "json_list", "label", "label_map", "labels", "limit", "model_key", "only",
           "rollout_id", "seconds"]

_NAME, _SEMVER = re.compile(NAME_PATTERN), re.compile(SEMVER_PATTERN)
# what fleet/openapi.json states of the checks below (tests/test_api_contract.py holds the
# two together): a contract id, and a group, tag or label value. str.isprintable() refuses
# more than a schema pattern can list (every unassigned code point); the pattern names the
# characters of the Basic Multilingual Plane it refuses: controls, format characters
# (zero-width, bidirectional), separators but the space, surrogates and private use
ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LABEL_PATTERN = ("^[^\\u0000-\\u001f\\u007f-\\u00a0\\u00ad\\u0600-\\u0605\\u061c\\u06dd"
                 "\\u070f\\u0890\\u0891\\u08e2\\u1680\\u180e\\u2000-\\u200f\\u2028-\\u202f"
                 "\\u205f-\\u2064\\u2066-\\u206f\\u3000\\ud800-\\udfff\\ue000-\\uf8ff\\ufeff"
                 "\\ufff9-\\ufffb\\ufffe\\uffff]{1,64}$")
_INT_DIGITS = 4000  # below sys.get_int_max_str_digits()'s default of 4300


def invalid(message: str) -> RequestError:
    return RequestError(message, HTTPStatus.BAD_REQUEST, hint="see docs/fleet.md")


def seconds(value: object, what: str) -> int:
    """A whole number of seconds, 1 to ten years, from a query text or a JSON number."""
    text = value if isinstance(value, str) else None
    number = (int(text) if text is not None and text.isascii() and text.isdigit()
              and len(text) <= 10 else value)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_AGE_S:
        raise invalid(f"{what} must be a whole number of seconds from 1 to {MAX_AGE_S}, got "
                      f"{value!r:.40}")
    return number


def only(body: dict[str, Any], fields: tuple[str, ...], what: str) -> dict[str, Any]:
    """``body``, refused if it holds a field besides ``fields`` (a typo is never ignored)."""
    unknown = sorted(str(k) for k in body if k not in fields)
    if unknown:
        raise invalid(f"{what} takes {', '.join(fields)}; {unknown[0][:40]!r} is not one "
                      "of them")
    return body


def contract_id(value: object, what: str) -> str:
    """A contract id (1-64 of [A-Za-z0-9._-], starting with a letter or digit)."""
    if not isinstance(value, str):
        raise invalid(f"{what} must be a string, got {type(value).__name__}")
    try:
        return check_id(value, what)
    except ValueError as exc:
        raise invalid(str(exc)) from exc


def contract_ids(value: object, field: str, what: str) -> list[str]:
    if not isinstance(value, list):
        raise invalid(f"{field} must be a list of {what}s, got {type(value).__name__}")
    return [contract_id(item, what) for item in value]


def label(value: object, what: str) -> str:
    """A group or tag: free text for people (``north cams & co``), 1-64 printable characters."""
    if not isinstance(value, str):
        raise invalid(f"{what} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= 64 or not value.isprintable():
        raise invalid(f"{what} {value[:80]!r} is not allowed: use 1-64 printable characters")
    return value


def labels(value: object, field: str, what: str) -> list[str]:
    if not isinstance(value, list):
        raise invalid(f"{field} must be a list of {what}s, got {type(value).__name__}")
    return [label(item, what) for item in value]


def label_map(value: object) -> dict[str, str]:
    """Labels to set: ``{KEY: VALUE}``, keys as ids, values 1-64 printable characters."""
    if not isinstance(value, dict) or len(value) > 32:
        raise invalid("set must be an object of at most 32 labels, KEY: VALUE")
    return {contract_id(k, "label key"): label(v, "label value") for k, v in value.items()}


def json_list(value: object, field: str) -> list[object]:
    if not isinstance(value, list):
        raise invalid(f"{field} must be a list, got {type(value).__name__}")
    return value


def rollout_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise invalid(f"rollout id {value[:80]!r} is not allowed: ids look like r12")
    return value


def model_key(value: object) -> str:
    """``NAME:VERSION`` with the manifest's name and semver patterns."""
    name, _, version = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not (_NAME.match(name) and _SEMVER.match(version)):
        raise RolloutOptionError("model", f"must be NAME:VERSION (e.g. digits:1.2.0), got "
                                          f"{value!r:.80}", hint="see docs/fleet.md")
    return f"{name}:{version}"


def limit(text: str | None) -> int:
    text = text or ""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 10_000:
        raise invalid(f"limit must be a whole number from 1 to 10000, got {text!r:.40}")
    return int(text)


def json_int(text: str) -> int | float:
    """A JSON integer; one of more digits than Python reads (4300) is read as the float it
    overflows to (+-inf), which every check refuses as not finite, naming its field,
    instead of the whole body failing with Python's own message."""
    return int(text) if len(text) <= _INT_DIGITS else float(text)
