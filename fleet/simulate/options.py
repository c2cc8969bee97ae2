"""What a simulated fleet does: one frozen :class:`SimOptions`, and which device gets which fault.

Faults are fractions (0-1) of the devices. One seeded shuffle of the device ids
hands them out in consecutive chunks (``fail_health``, then ``slow``, then
``disagree``, then ``offline``, then ``drifting``), so the same seed always picks the
same devices and the groups do not overlap while the fractions add up to at most 1.

Fault semantics (they apply to "new" bundles: every bundle but the one a device
started with):

- ``fail_health``: the health check of a new bundle fails with a detail naming
  the fault, so the update ends ``FAILED`` and the old model keeps serving.
- ``slow``: request latency on new bundles is multiplied by ``slow_factor``
  (and so is the health check's, which can then exceed the latency budget).
- ``disagree``: on new bundles, ``disagree_rate`` of the answers are wrong (the
  model's output rotated by one class), which lowers the probation agreement;
  ``disagree_error_rate`` of the requests fail outright (0 by default; above the
  settings' ``max_error_rate`` the device rolls back by itself, as a real one does).
- ``offline``: ``offline_after_s`` after its turn to connect, the device drops
  the TCP connection without a DISCONNECT (the broker publishes its will), keeps
  serving and spooling telemetry, and reconnects ``offline_for_s`` later (once),
  then receives the retained desired state it missed.
- ``drifting``: on every bundle, the device's inputs come from another world than
  the reference statistics in the bundle's manifest (its drift windows are drawn
  from shifted distributions, :mod:`edgefleet.fleet.simulate.drift`), so the controller
  raises drift alerts for it. Bundles without reference statistics report no drift.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.agent.protocol.payloads import ReportedState
from edgefleet.agent.update.device import UpdateSettings
from edgefleet.fleet.errors import FleetError

__all__ = ["DeviceTraits", "SimOptions", "SimulationError", "assign_traits"]

FAULTS = ("fail_health", "slow", "disagree", "offline", "drifting")


class SimulationError(FleetError):
    """The simulated fleet cannot run as asked (bad options, no initial bundle)."""


@dataclass(frozen=True)
class SimOptions:
    """Every knob of a simulated fleet; validated when built."""

    device_prefix: str = "sim-"
    profile: str = "generic-x86_64"
    labels: dict[str, str] = field(default_factory=dict)  # every device reports these
    seed: int = 0
    telemetry_interval_s: float = 5.0
    request_rate: float = 5.0  # synthetic requests per second per device
    latency_scale: float = 1.0  # device speed: measured latency here times this
    speed_spread: float = 0.2  # sigma of the per-device log-normal speed factor
    connect_rate: float = 500.0  # connection attempts per second, for the whole fleet
    keepalive_s: int = 30
    source_address: str = ""  # local address to connect from ("": any); see NetworkLoop
    workers: int = 4  # threads that run update steps (downloads, verification)
    share_downloads: bool = False  # True: one HTTP request per URL for the whole fleet
    deltas: bool = True  # use the deltas the fleet offers, as the agent does (False: an
    # agent that predates deltas, always the full bundle)
    spool_max_points: int = 100  # telemetry kept per device while offline
    settings: UpdateSettings = field(default_factory=UpdateSettings)
    fail_health: float = 0.0
    slow: float = 0.0
    slow_factor: float = 3.0
    disagree: float = 0.0
    disagree_rate: float = 0.5
    disagree_error_rate: float = 0.0
    offline: float = 0.0
    offline_after_s: float = 30.0
    offline_for_s: float = 30.0
    drifting: float = 0.0
    # secure mode (docs/security.md): the fleet CA checks the broker and https bundle URLs;
    # certs_dir holds each device's ID.crt and ID.key (edgefleet certs device)
    ca_file: Path | None = None
    certs_dir: Path | None = None

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or self.certs_dir is not None

    def __post_init__(self) -> None:
        for name in (*FAULTS, "disagree_rate", "disagree_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SimulationError(f"{name} is {value}, a fraction must be within 0-1",
                                      hint=f"pass {name} as 0.1 for 10 %")
        positive = ("telemetry_interval_s", "connect_rate", "latency_scale", "slow_factor",
                    "workers", "keepalive_s", "spool_max_points")
        for name in positive:
            if not getattr(self, name) > 0:
                raise SimulationError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("request_rate", "speed_spread", "offline_after_s", "offline_for_s"):
            if getattr(self, name) < 0:
                raise SimulationError(f"{name} must not be negative, got {getattr(self, name)}")
        self._check_labels()

    def _check_labels(self) -> None:
        """The labels every device reports, checked as its reported state will be."""
        try:
            ReportedState(fleet="f", device="d", agent_version="0", labels=self.labels or None)
        except ValueError:
            raise SimulationError(f"labels {self.labels!r:.80} cannot be reported",
                                  hint="KEY=VALUE: a key of letters, digits, '.', '_' or '-', "
                                       "a value of 1-64 printable characters") from None


@dataclass(frozen=True)
class DeviceTraits:
    """One device's faults and its speed (a latency multiplier)."""

    speed: float = 1.0
    fail_health: bool = False
    slow: bool = False
    disagree: bool = False
    offline: bool = False
    drifting: bool = False

    @property
    def faults(self) -> tuple[str, ...]:
        return tuple(name for name in FAULTS if getattr(self, name))


def assign_traits(options: SimOptions, ids: list[str]) -> dict[str, DeviceTraits]:
    """Deterministic from ``options.seed``: the same ids always get the same traits."""
    order = random.Random(options.seed).sample(ids, len(ids))
    picked: dict[str, set[str]] = {}
    cursor = 0
    for name in FAULTS:
        count = round(getattr(options, name) * len(ids))
        picked[name] = {order[(cursor + i) % len(order)] for i in range(count)}
        cursor += count
    return {device: DeviceTraits(speed=_speed(options, device),
                                 **{name: device in picked[name] for name in FAULTS})
            for device in ids}


def _speed(options: SimOptions, device: str) -> float:
    jitter = random.Random(f"{options.seed}:{device}").gauss(0.0, options.speed_spread)
    return options.latency_scale * math.exp(jitter)
