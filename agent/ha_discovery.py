"""Publish this device's Home Assistant discovery configs (``edgefleet agent run --ha-discovery``).

Called from the MQTT client's on-connect hook, so on every (re)connection: the configs
are retained (QoS 1), a Home Assistant that starts later still finds them, and one
that restarted with a clean broker gets them back at the device's next connection.
The configs themselves are built by :mod:`edgefleet.agent.protocol.homeassistant`.
"""

from __future__ import annotations

import logging

from edgefleet.agent import __version__
from edgefleet.agent.mqtt import MqttClient
from edgefleet.agent.protocol.homeassistant import DiscoveredDevice, discovery_configs

__all__ = ["publish_discovery"]

log = logging.getLogger(__name__)


def publish_discovery(client: MqttClient, fleet: str, device: str,
                      profile: str | None = None) -> int:
    """Queue every config (never waits: safe on the network thread); how many were queued."""
    configs = discovery_configs(DiscoveredDevice(fleet, device, __version__, profile))
    queued = sum(client.publish(c.topic, c.payload, qos=1, retain=True) for c in configs)
    if queued < len(configs):
        log.warning("queued %d of %d Home Assistant discovery configs; the rest follow at "
                    "the next connection", queued, len(configs))
    return queued
