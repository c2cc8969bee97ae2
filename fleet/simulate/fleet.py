"""``SimulatedFleet``: many simulated devices in one process, against a real broker.

Wiring only: one :class:`~fleet.simulate.loop.NetworkLoop` thread for every
connection and timer, a small worker pool for update steps, and the shared
model and download caches; the behaviour is in :mod:`edgefleet.fleet.simulate.device`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType, TracebackType

import numpy as np

from edgefleet.agent.protocol.payloads import STATUS_OFFLINE
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.agent.protocol.topics import Leaf, check_id
from edgefleet.agent.runtime.select import installed_runtimes
from edgefleet.fleet.simulate.delta import DeltaPath
from edgefleet.fleet.simulate.device import SimDevice
from edgefleet.fleet.simulate.download import Downloads
from edgefleet.fleet.simulate.env import FleetEnv
from edgefleet.fleet.simulate.loop import NetworkLoop
from edgefleet.fleet.simulate.models import ModelCache
from edgefleet.fleet.simulate.options import SimOptions, SimulationError, assign_traits
from edgefleet.fleet.simulate.pool import WorkPool
from edgefleet.fleet.simulate.tls import device_contexts, server_checker
from edgefleet.fleet.simulate.view import DeviceView

__all__ = ["SimulatedFleet"]

Devices = Mapping[str, DeviceView]
SWEEP_S = 0.05  # telemetry ticks happen in slices, this often


class SimulatedFleet:
    """``count`` devices of ``fleet`` on ``broker_url``, optionally starting on a bundle."""

    def __init__(self, broker_url: str, fleet: str, count: int, trusted: TrustedKeys,
                 options: SimOptions | None = None, initial_bundle: Path | None = None) -> None:
        if count < 1:
            raise SimulationError(f"a fleet needs at least one device, got {count}")
        self.fleet, self.options = check_id(fleet, "fleet"), options or SimOptions()
        self.models = ModelCache(trusted)
        options = self.options
        self.downloads = Downloads(share=options.share_downloads,
                                   tls=server_checker(options.ca_file) if options.tls else None)
        self._loop = NetworkLoop(broker_url, connect_rate=options.connect_rate,
                                 keepalive=options.keepalive_s, tls=options.tls,
                                 source_address=options.source_address)
        self._pool = WorkPool(self.options.workers, "edgefleet-sim-update")
        self._started = self._stopped = False
        self.deltas = DeltaPath(self.downloads, self.models)
        env = FleetEnv(self.fleet, self.options, self.models, self.downloads, self.deltas,
                       self._submit, self._loop, installed_runtimes(),
                       np.random.default_rng(self.options.seed))
        initial = self.models.profile(self.models.add_file(initial_bundle).sha256) \
            if initial_bundle else None
        if initial is not None:  # the base of the deltas offered to devices still on it
            self.downloads.keep(self.models.raw(initial.sha256))
        url = str(initial_bundle.resolve()) if initial_bundle else ""
        width = max(5, len(str(count)))
        ids = [check_id(f"{self.options.device_prefix}{i:0{width}d}", "device id")
               for i in range(1, count + 1)]
        self._tls = (device_contexts(ids, options.ca_file, options.certs_dir) if options.tls
                     else {})
        traits = assign_traits(self.options, ids)
        self._devices = [SimDevice(i, env, traits[i], initial, url) for i in ids]
        self.devices: Devices = MappingProxyType({d.id: DeviceView(d) for d in self._devices})

    def start(self) -> SimulatedFleet:
        """Connect every device (paced), start telemetry and the offline faults; returns now."""
        if self._started:
            return self
        self._started = True
        self._loop.start()
        now, options = time.monotonic(), self.options
        for index, device in enumerate(self._devices):
            link = self._loop.link(f"edgefleet-{self.fleet}-{device.id}",
                                   (device.topics[Leaf.STATUS], STATUS_OFFLINE.encode()),
                                   device.topics[Leaf.DESIRED], device,
                                   self._tls.get(device.id))
            device.outlet = link
            self._loop.connect(link)
            if device.traits.offline:
                turn = index / options.connect_rate
                self._loop.call_at(now + turn + options.offline_after_s,
                                   partial(self._loop.drop, link, options.offline_for_s))
        self._loop.call_at(now + SWEEP_S, self._sweeper(now + SWEEP_S, 0))
        return self

    def stop(self) -> None:
        """Every device publishes ``offline`` and disconnects cleanly; threads end."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self._pool.shutdown()  # steps in progress finish, queued ones are dropped
        self._loop.stop()
        self.models.close()

    def __enter__(self) -> SimulatedFleet:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def wait_until(self, predicate: Callable[[Devices], bool], timeout: float,
                   poll_s: float = 0.05) -> bool:
        """Poll ``predicate(devices)`` until it holds (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while not predicate(self.devices):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def _submit(self, job: Callable[[], None]) -> None:
        if not self._stopped:
            self._pool.submit(job)

    def _sweeper(self, due: float, turn: int) -> Callable[[], None]:
        """Tick one slice of the devices every ``SWEEP_S``: each device once an interval.

        One timer for the fleet, and ticks in batches: thousands of lone ticks, each
        after an idle wait, cost several times more CPU (cold caches) than batches.
        """
        slices = max(1, round(self.options.telemetry_interval_s / SWEEP_S))

        def sweep() -> None:
            if self._stopped:
                return
            for device in self._devices[turn % slices::slices]:
                device.tick()
            following = max(due + SWEEP_S, time.monotonic())
            self._loop.call_at(following, self._sweeper(following, turn + 1))

        return sweep
