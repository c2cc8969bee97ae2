"""MQTT topic builders: ``edgefleet/v1/{fleet}/{device}/{leaf}``.

Call sites never format topic strings themselves; they use these functions,
which also refuse ids that would break topic matching ("/", "+", "#").
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import Enum

from edgefleet.agent.protocol.errors import PayloadError

__all__ = [
    "FLEET_LEVEL",
    "PREFIX",
    "Leaf",
    "TopicAddress",
    "check_id",
    "device_topic",
    "fleet_filter",
    "keyring_topic",
    "parse_topic",
]

PREFIX = "edgefleet/v1"
FLEET_LEVEL = "_fleet"  # fleet-wide topics: no device id starts with "_", so never a device's
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Leaf(str, Enum):
    TELEMETRY = "telemetry"
    STATUS = "status"
    DESIRED = "state/desired"
    REPORTED = "state/reported"
    EVENTS = "events"


@dataclass(frozen=True)
class TopicAddress:
    fleet: str
    device: str
    leaf: Leaf


def check_id(value: str, what: str = "id") -> str:
    if not _ID.fullmatch(value):  # "$" alone would let a trailing "\n" through
        raise ValueError(
            f"{what} {value!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def device_topic(fleet: str, device: str, leaf: Leaf) -> str:
    return f"{PREFIX}/{check_id(fleet, 'fleet')}/{check_id(device, 'device id')}/{leaf.value}"


def keyring_topic(fleet: str) -> str:
    """Retained, written by the controller only: the fleet's signed keyring (docs/keys.md)."""
    return f"{PREFIX}/{check_id(fleet, 'fleet')}/{FLEET_LEVEL}/keyring"


def fleet_filter(fleet: str, leaf: Leaf | None = None) -> str:
    """A subscription filter for one leaf (or every leaf) of every device of a fleet."""
    base = f"{PREFIX}/{check_id(fleet, 'fleet')}/+"
    return f"{base}/{leaf.value}" if leaf else f"{base}/#"


@functools.lru_cache(maxsize=1 << 17)  # a fleet's topics repeat (10,000 devices: 40,000)
def parse_topic(topic: str) -> TopicAddress:
    """The fleet, device and leaf of a device topic; ``PayloadError`` if it is none."""
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:2]) != PREFIX:
        raise PayloadError(f"topic {topic!r} is not an edgefleet v1 topic")
    try:
        leaf = Leaf("/".join(parts[4:]))
        fleet, device = check_id(parts[2], "fleet"), check_id(parts[3], "device id")
    except ValueError as exc:  # an unknown leaf, or a level no device id can be ("_fleet")
        raise PayloadError(f"topic {topic[:200]!r}: {exc}") from exc
    return TopicAddress(fleet, device, leaf)
