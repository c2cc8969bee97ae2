"""A live agent's telemetry keeps ThingsBoard's shape, also when a backlog is replayed.

ThingsBoard (and the dashboards in docs/dashboards.md) take ``{"ts": ms, "values": {...}}``
or a JSON array of those; nothing else may sit at the top level.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.fleet.mosquitto import MosquittoBroker
from tests.brokers import Subscriber
from tests.conftest import Keys


def _is_point(data: Any, since_ms: int, until_ms: int) -> bool:
    return (isinstance(data, dict) and set(data) == {"ts", "values"}
            and type(data["ts"]) is int and since_ms <= data["ts"] <= until_ms
            and isinstance(data["values"], dict) and data["values"].get("seq", 0) > 0)


def test_single_points_and_a_replayed_batch_keep_the_ts_values_shape(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.TELEMETRY)
    sub = Subscriber(mosquitto.url, [topic], client_id=f"{fleet_name}-sub", persistent=True)
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles["tflite"])
    service = AgentService(ServiceConfig(fleet=fleet_name, device_id="dev-1",
                                         data_dir=tmp_path / "agent", broker_url=mosquitto.url,
                                         telemetry_interval_s=0.1), agent)
    since_ms = int(time.time() * 1000)
    service.start()
    try:
        assert sub.wait_for(lambda ms: len(ms) >= 2)
        mosquitto.stop()
        time.sleep(1.0)  # about ten points go to the spool
        mosquitto.start()
        assert sub.wait_for(lambda ms: any(m.payload.startswith(b"[") for m in ms), 30)
    finally:
        service.stop()
    until_ms = int(time.time() * 1000)
    decoded = [json.loads(m.payload) for m in sub.messages]
    singles = [d for d in decoded if not isinstance(d, list)]
    batches = [d for d in decoded if isinstance(d, list)]
    assert len(singles) >= 2 and batches
    assert all(_is_point(d, since_ms, until_ms) for d in singles)
    for batch in batches:
        assert batch and all(_is_point(p, since_ms, until_ms) for p in batch)
        assert [p["ts"] for p in batch] == sorted(p["ts"] for p in batch), "oldest first"
    sub.close()
