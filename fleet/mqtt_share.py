"""The controller's MQTT client: :class:`agent.mqtt.MqttClient` plus shared subscriptions.

A shared subscription (``$share/GROUP/FILTER``, MQTT 5, also accepted from MQTT 3.1.1
clients by Mosquitto 2, EMQX, HiveMQ and VerneMQ) hands each matching message to one
member of the group only, so scaled-out controllers split the telemetry between them.
The broker delivers such a message under its real topic, which the ``$share`` filter does
not match; so a shared filter is registered here under its plain form (messages are
routed by it, as for any subscription) and only the SUBSCRIBE sent to the broker, after
every (re)connection, carries the ``$share/GROUP/`` prefix.
"""

from __future__ import annotations

from typing import Any

from agent.mqtt import MqttClient

__all__ = ["SharingMqttClient", "check_group"]


def check_group(group: str) -> str:
    """A share group name: non-empty, without ``/``, ``+``, ``#`` or ``:``."""
    if not group or any(c in group for c in "/+#:") or len(group) > 64:
        raise ValueError(f"{group!r} is not a shared subscription group: use 1-64 characters "
                         "without '/', '+', '#' or ':'")
    return group


class SharingMqttClient(MqttClient):
    """An :class:`MqttClient` whose filters marked with :meth:`share` are shared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared: dict[str, str] = {}

    @classmethod
    def from_url(cls, client_id: str, url: str, **options: Any) -> SharingMqttClient:
        client = super().from_url(client_id, url, **options)
        assert isinstance(client, SharingMqttClient)  # the base builds a ``cls``
        return client

    def share(self, topic_filter: str, group: str) -> None:
        """Subscribe to ``topic_filter`` as a member of ``group`` (call before ``subscribe``)."""
        self._shared[topic_filter] = f"$share/{check_group(group)}/{topic_filter}"

    def _subscribe(self, topic_filter: str, qos: int) -> None:
        super()._subscribe(self._shared.get(topic_filter, topic_filter), qos)
