"""What every simulated device shares: options, caches, the worker pool and the clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgefleet.fleet.simulate.delta import DeltaPath
from edgefleet.fleet.simulate.download import Downloads
from edgefleet.fleet.simulate.models import ModelCache
from edgefleet.fleet.simulate.options import SimOptions

__all__ = ["FleetEnv", "Outlet", "Scheduler"]


class Outlet(Protocol):
    """A device's way out to the broker (:class:`edgefleet.fleet.simulate.loop.Link`)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool: ...


class Scheduler(Protocol):
    """Runs a call later on the network thread
    (:class:`edgefleet.fleet.simulate.loop.NetworkLoop`)."""

    def call_later(self, delay: float, call: Callable[[], None]) -> None: ...


@dataclass(frozen=True)
class FleetEnv:
    """Shared by all devices of one simulated fleet."""

    fleet: str
    options: SimOptions
    models: ModelCache
    downloads: Downloads
    deltas: DeltaPath  # update bodies through a delta when offered (options.deltas)
    submit: Callable[[Callable[[], None]], None]  # run on the update worker pool
    scheduler: Scheduler
    runtimes: dict[str, str]  # what the reported state names (installed_runtimes())
    rng: np.random.Generator  # used on the network thread only
