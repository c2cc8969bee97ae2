"""What a fleet controller is told at start: its fleet, broker, folders and scale-out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.mqtt import MqttSecurity
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.fleet.errors import FleetError
from edgefleet.fleet.scale import check_group

__all__ = ["ControllerConfig", "now_ms"]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ControllerConfig:
    fleet: str
    broker_url: str
    data_dir: Path
    public_url: str  # how devices reach this controller's HTTP server, e.g. http://10.0.0.2:8600
    trusted: TrustedKeys  # the keys trusted at start; the keyring may replace them later
    tick_s: float = 1.0
    mqtt_security: MqttSecurity | None = None  # TLS files, client certificate, user/password
    quality_window_ms: int = 300_000
    # scale-out (docs/scale-out.md): several controllers on one store and one broker
    controller_id: str = ""  # unique among them; shown in /healthz
    lease_s: float | None = None  # None: the only controller (no lease)
    shared_telemetry: str | None = None  # share group: telemetry split between controllers
    # the origins (scheme://host[:port]) whose page may act; empty: --public-url's
    allow_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.lease_s is not None and self.lease_s < 3 * self.tick_s - 1e-9:
            raise FleetError(f"a lease of {self.lease_s:g} s is shorter than 3 ticks "
                             f"({self.tick_s:g} s each)",
                             hint="pass --lease-s of at least 3 x --tick, e.g. "
                                  f"--lease-s {max(3 * self.tick_s, 5):g}")
        if self.lease_s is not None and not self.controller_id:
            raise FleetError("scaled-out controllers need an id each",
                             hint="pass --controller-id NAME (unique among them)")
        if self.shared_telemetry is not None:
            if self.lease_s is None:
                raise FleetError("--shared-telemetry splits telemetry between several "
                                 "controllers, and they need a leader",
                                 hint="pass --lease-s too (docs/scale-out.md)")
            try:
                check_group(self.shared_telemetry)
            except ValueError as exc:
                raise FleetError(str(exc), hint="e.g. --shared-telemetry edgefleet") from exc
