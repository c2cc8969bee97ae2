"""Home Assistant MQTT discovery for one device: config topics and payloads (pure).

Each config is published retained on
``homeassistant/{component}/{node_id}/{object_id}/config``; Home Assistant then reads
the device's own edgefleet topics, nothing is published twice:

- the sensors read the ``telemetry`` topic through a ``value_template``. Telemetry is
  ThingsBoard's ``{"ts", "values"}``, or a JSON array of those when a spooled backlog is
  replayed; the template takes the last (newest) point of an array. It indexes with
  ``['values']``: in Jinja, ``value_json.values`` is the dict's ``values`` method, so
  ``value_json.values.latency_p50_ms`` renders empty. A missing or null value renders
  ``None``, which Home Assistant shows as unknown;
- availability is bound to the retained ``status`` topic (``online``, and ``offline``
  as the last will), and a connectivity binary sensor shows the same topic.

Home Assistant allows only ``[a-zA-Z0-9_-]`` in a node id, edgefleet ids also allow
``.``: the node id is a readable slug plus a short hash of the exact fleet and device ids,
so two devices never share one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from edgefleet.agent.protocol.payloads import STATUS_OFFLINE, STATUS_ONLINE
from edgefleet.agent.protocol.topics import Leaf, check_id, device_topic

__all__ = [
    "DISCOVERY_PREFIX",
    "SENSORS",
    "DiscoveredDevice",
    "DiscoveryConfig",
    "Sensor",
    "discovery_configs",
    "discovery_topic",
    "node_id",
    "value_template",
]

DISCOVERY_PREFIX = "homeassistant"
_COMPONENTS = ("sensor", "binary_sensor")
_POINT = "{% set p = value_json if value_json is mapping else value_json | last %}"


@dataclass(frozen=True)
class Sensor:
    """One telemetry value shown as a Home Assistant sensor; ``key`` is its ``values`` key."""

    key: str
    name: str
    unit: str | None = None
    state_class: str | None = None
    device_class: str | None = None
    icon: str | None = None


SENSORS: tuple[Sensor, ...] = (
    Sensor("latency_p50_ms", "Latency p50", "ms", "measurement", "duration"),
    Sensor("latency_p95_ms", "Latency p95", "ms", "measurement", "duration"),
    Sensor("throughput_rps", "Throughput", "req/s", "measurement", icon="mdi:speedometer"),
    Sensor("model_version", "Model version", icon="mdi:tag-outline"),
    Sensor("inferences_total", "Inferences", state_class="total_increasing",
           icon="mdi:counter"),
    Sensor("errors_total", "Errors", state_class="total_increasing", icon="mdi:alert-circle"),
)


@dataclass(frozen=True)
class DiscoveredDevice:
    """What Home Assistant's device registry shows: ``model`` is the device profile."""

    fleet: str
    device: str
    agent_version: str
    profile: str | None = None


@dataclass(frozen=True)
class DiscoveryConfig:
    """One retained discovery message."""

    topic: str
    config: dict[str, Any]

    @property
    def payload(self) -> bytes:
        return json.dumps(self.config, sort_keys=True).encode()


def node_id(fleet: str, device: str) -> str:
    """``edgefleet_{fleet}_{device}_{hash}`` with ``.`` as ``_``: only ``[a-zA-Z0-9_-]``."""
    exact = f"{check_id(fleet, 'fleet')}/{check_id(device, 'device id')}"
    digest = hashlib.sha256(exact.encode()).hexdigest()[:8]
    return f"edgefleet_{fleet}_{device}_{digest}".replace(".", "_")


def discovery_topic(component: str, node: str, object_id: str,
                    prefix: str = DISCOVERY_PREFIX) -> str:
    if component not in _COMPONENTS:
        raise ValueError(f"component {component!r} is not one of {', '.join(_COMPONENTS)}")
    return f"{prefix}/{component}/{node}/{object_id}/config"


def value_template(key: str) -> str:
    """``values[key]`` of a point, or of the newest point of a replayed batch."""
    return f"{_POINT}{{{{ p['values']['{key}'] | default(none) }}}}"


def discovery_configs(device: DiscoveredDevice,
                      prefix: str = DISCOVERY_PREFIX) -> list[DiscoveryConfig]:
    """Every config of ``device``: the ``SENSORS`` and its connectivity."""
    node = node_id(device.fleet, device.device)
    common = {"device": _device_block(device, node),
              "origin": {"name": "edgefleet", "sw_version": device.agent_version}}
    status = device_topic(device.fleet, device.device, Leaf.STATUS)
    configs = [DiscoveryConfig(discovery_topic("sensor", node, s.key, prefix),
                               {**common, **_sensor(s, node, device, status)})
               for s in SENSORS]
    configs.append(DiscoveryConfig(discovery_topic("binary_sensor", node, "status", prefix),
                                   {**common, **_connectivity(node, status)}))
    return configs


def _sensor(sensor: Sensor, node: str, device: DiscoveredDevice,
            status: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": sensor.name, "unique_id": f"{node}_{sensor.key}", "has_entity_name": True,
        "state_topic": device_topic(device.fleet, device.device, Leaf.TELEMETRY), "qos": 1,
        "value_template": value_template(sensor.key),
        "availability_topic": status, "payload_available": STATUS_ONLINE,
        "payload_not_available": STATUS_OFFLINE,
        "unit_of_measurement": sensor.unit, "state_class": sensor.state_class,
        "device_class": sensor.device_class, "icon": sensor.icon}
    return {key: value for key, value in config.items() if value is not None}


def _connectivity(node: str, status: str) -> dict[str, Any]:
    """The ``status`` topic itself, so it shows offline instead of unavailable."""
    return {"name": "Status", "unique_id": f"{node}_status", "has_entity_name": True,
            "state_topic": status, "qos": 1, "payload_on": STATUS_ONLINE,
            "payload_off": STATUS_OFFLINE, "device_class": "connectivity",
            "entity_category": "diagnostic"}


def _device_block(device: DiscoveredDevice, node: str) -> dict[str, Any]:
    return {"identifiers": [node], "name": device.device, "manufacturer": "edgefleet",
            "model": device.profile or "edgefleet agent", "sw_version": device.agent_version}
