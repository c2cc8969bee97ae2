"""``SimOptions.source_address``: a simulated fleet connects from the local address it is given
(paho binds every socket before connecting, so one address holds at most one connection per
ephemeral port; the scale bench gives each simulator process its own)."""

from __future__ import annotations

import re
from pathlib import Path

from edgefleet.fleet.mosquitto import MosquittoBroker
from edgefleet.fleet.simulate import SimOptions, SimulatedFleet
from tests.conftest import Keys


def connected_from(broker: MosquittoBroker, fleet: str) -> dict[str, str]:
    """Client id -> the address it connected from, as the broker logged it."""
    assert broker.workdir is not None
    log = (Path(broker.workdir) / "mosquitto.log").read_text()
    pattern = rf"New client connected from ([\d.]+):\d+ as (edgefleet-{fleet}-\S+)"
    return {client: address for address, client in re.findall(pattern, log)}


def test_every_device_connects_from_the_given_source_address(
        mosquitto: MosquittoBroker, fleet_name: str, signing_keys: Keys,
        digits_bundles: dict[str, Path]) -> None:
    options = SimOptions(source_address="127.0.0.2", request_rate=0.0)
    with SimulatedFleet(mosquitto.url, fleet_name, 3, signing_keys.trusted, options,
                        digits_bundles["tflite"]) as sim:
        assert sim.wait_until(lambda d: all(v.online for v in d.values()), 10)
    addresses = connected_from(mosquitto, fleet_name)
    assert sorted(addresses) == [f"edgefleet-{fleet_name}-{d}" for d in sim.devices]
    assert set(addresses.values()) == {"127.0.0.2"}
