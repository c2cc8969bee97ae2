"""Where a decommission's clears go, so that they reach the leaves of a tree of brokers.

A device's ``status`` and ``state/reported`` are retained where the device wrote them: on
its leaf broker too when it connects to a leaf (docs/scale-out.md). The bridge carries
them up (``out``), so an empty retained message the controller publishes on the root
clears the root's copy only; the leaf keeps its copy, and sends it up again the next time
its bridge connects (a leaf restart), which brings the removed device back. ``both`` would
carry clears down, but also every device's reports to every other leaf.

So the controller also publishes each clear under ``edgefleet/v1/{fleet}/_clear/{device}/
{leaf}``, a level no device or controller subscribes to, and every leaf's bridge maps that
down onto the device's own topic (``topic +/status in 1 <local> <remote>`` in
:func:`edgefleet.fleet.mosquitto.bridge_lines`): the leaf drops its retained copy (and its
``out`` line passes the empty message up once more, which changes nothing). Without a tree
nothing subscribes to these topics and nothing is retained there.
"""

from __future__ import annotations

from edgefleet.agent.protocol.topics import PREFIX, Leaf, check_id

__all__ = ["CLEAR_LEVEL", "DEVICE_RETAINED", "clear_prefix", "clear_topic"]

CLEAR_LEVEL = "_clear"  # no device id starts with "_"
DEVICE_RETAINED = (Leaf.REPORTED, Leaf.STATUS)  # retained topics devices write


def clear_prefix(fleet: str) -> str:
    """The root-side prefix a leaf's bridge maps onto ``edgefleet/v1/{fleet}/``."""
    return f"{PREFIX}/{check_id(fleet, 'fleet')}/{CLEAR_LEVEL}/"


def clear_topic(fleet: str, device: str, leaf: Leaf) -> str:
    """Where a clear of ``device``'s retained ``leaf`` is published for the leaves."""
    return f"{clear_prefix(fleet)}{check_id(device, 'device id')}/{leaf.value}"
