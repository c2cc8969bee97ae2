"""The Mosquitto ACL of a fleet in secure mode (pure rendering; ``edgefleet fleet acl``).

The device's MQTT user name is its device id: the certificate's CN with
``use_identity_as_username true``, or its name in the password file. One file then serves
every device through ``pattern`` lines, where Mosquitto puts the user name in for ``%u``
(it refuses the substitution for a name holding ``+``, ``#`` or ``/``, which device ids
cannot hold anyway). Anything not granted is denied::

    a device  writes  edgefleet/v1/{fleet}/{itself}/telemetry, status, state/reported, events
              reads   edgefleet/v1/{fleet}/{itself}/state/desired
              reads   edgefleet/v1/{fleet}/_fleet/#          (fleet-wide, e.g. the keyring)
    the controller
              reads   edgefleet/v1/{fleet}/#
              writes  edgefleet/v1/{fleet}/+/state/desired   (the only writer)
              writes  edgefleet/v1/{fleet}/_fleet/#          (the only writer)
              writes  edgefleet/v1/{fleet}/+/status, +/state/reported
                      (only to clear them, empty and retained, when it decommissions
                      a device: ``fleet devices remove``)
              writes  edgefleet/v1/{fleet}/_clear/#          (the same clears, for the
                      copies leaf brokers keep: ``fleet.clears``)

Home Assistant discovery (``agent run --ha-discovery``) publishes retained configs on
``homeassistant/{component}/{node}/{object}/config`` where the node id is
``edgefleet_{fleet}_{device}_{hash}`` (:func:`edgefleet.agent.protocol.homeassistant.node_id`).
That id cannot be written with ``%u``, so ``ha_devices`` lists the devices allowed to
publish discovery, each in a ``user`` block naming exactly its own node, and
``ha_user`` is Home Assistant's own user: it reads the devices' ``telemetry`` and
``status`` and the discovery configs, and writes its birth message
(``homeassistant/status``). Without them, discovery is denied like any other topic
(Mosquitto drops such publishes silently).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edgefleet.agent.protocol.homeassistant import DISCOVERY_PREFIX, node_id
from edgefleet.agent.protocol.topics import FLEET_LEVEL, PREFIX, Leaf, check_id
from edgefleet.fleet.clears import clear_prefix

__all__ = ["CONTROLLER_USER", "Rule", "acl_rules", "check_devices", "render_acl"]

CONTROLLER_USER = "edgefleet-controller"  # the default; the CN of 'edgefleet certs controller'

_DEVICE_WRITES = (Leaf.TELEMETRY, Leaf.STATUS, Leaf.REPORTED, Leaf.EVENTS)
_HA_COMPONENTS = ("sensor", "binary_sensor")
_CLEARED = (Leaf.STATUS, Leaf.REPORTED)  # device-written retained topics


@dataclass(frozen=True)
class Rule:
    """One ACL line: ``who`` is ``*`` for a pattern (every user), else a user name."""

    who: str
    access: str  # read | write
    topic: str

    def line(self) -> str:
        if self.who == "*":
            return f"pattern {self.access} {self.topic}"
        return f"topic {self.access} {self.topic}"


def acl_rules(fleet: str, controller: str, ha_devices: Iterable[str] = (),
              ha_user: str | None = None) -> list[Rule]:
    """Every grant of the fleet's ACL, devices first."""
    check_id(fleet, "fleet")
    check_id(controller, "controller user name")
    if ha_user is not None:
        check_id(ha_user, "Home Assistant user name")
    base = f"{PREFIX}/{fleet}"
    rules = [Rule("*", "write", f"{base}/%u/{leaf.value}") for leaf in _DEVICE_WRITES]
    rules += [Rule("*", "read", f"{base}/%u/{Leaf.DESIRED.value}"),
              Rule("*", "read", f"{base}/{FLEET_LEVEL}/#")]
    listed = sorted(set(ha_devices))
    check_devices(listed, controller, ha_user)
    for device in listed:
        node = node_id(fleet, device)
        rules += [Rule(device, "write", f"{DISCOVERY_PREFIX}/{component}/{node}/+/config")
                  for component in _HA_COMPONENTS]
    if ha_user is not None:
        rules += [Rule(ha_user, "read", f"{base}/+/{Leaf.TELEMETRY.value}"),
                  Rule(ha_user, "read", f"{base}/+/{Leaf.STATUS.value}"),
                  Rule(ha_user, "read", f"{DISCOVERY_PREFIX}/#"),
                  Rule(ha_user, "write", f"{DISCOVERY_PREFIX}/status")]
    rules += [Rule(controller, "read", f"{base}/#"),
              Rule(controller, "write", f"{base}/+/{Leaf.DESIRED.value}"),
              Rule(controller, "write", f"{base}/{FLEET_LEVEL}/#")]
    # a decommission clears a device's retained topics (fleet.control.lifecycle)
    rules += [Rule(controller, "write", f"{base}/+/{leaf.value}") for leaf in _CLEARED]
    rules.append(Rule(controller, "write", f"{clear_prefix(fleet)}#"))  # leaves' copies
    return rules


def check_devices(devices: Iterable[str], *reserved: str | None) -> None:
    """ValueError for an id the topics refuse or that is another user's (the controller's)."""
    for device in devices:
        check_id(device, "device id")
        if device in reserved:
            raise ValueError(f"device id {device!r} is the user name of the controller or of "
                             "Home Assistant")


def render_acl(fleet: str, controller: str, ha_devices: Iterable[str] = (),
               ha_user: str | None = None) -> str:
    """The ``acl_file`` text: patterns first, then one ``user`` block per named user."""
    rules = acl_rules(fleet, controller, ha_devices, ha_user)
    out = [f"# edgefleet ACL for fleet {fleet!r} (written by 'edgefleet fleet acl').",
           "# Every device's user name is its device id (%u). Not granted = denied.",
           "", "# devices: their own topics, and the fleet-wide ones read-only"]
    out += [rule.line() for rule in rules if rule.who == "*"]
    users: dict[str, list[Rule]] = {}
    for rule in rules:
        if rule.who != "*":
            users.setdefault(rule.who, []).append(rule)
    for user, granted in users.items():
        what = ("the controller" if user == controller else "Home Assistant" if user == ha_user
                else f"Home Assistant discovery of device {user}")
        out += ["", f"# {what}", f"user {user}", *(rule.line() for rule in granted)]
    return "\n".join(out) + "\n"
