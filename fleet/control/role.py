"""Who executes rollouts: one interface, a variant for a controller alone and one for a
controller among several that share a lease (docs/scale-out.md).

A :class:`Role` answers everything that differs between the two: whether this
controller leads right now, what a rollout save is fenced with, what happens at start,
at every tick, with drift judgements, with bundles and with an operator's rollout
command. :class:`SingleRole` always leads and never relays; :class:`LeasedRole` renews
or contests the lease (:class:`edgefleet.fleet.scale.ScaleOut`) and, as a follower,
relays rollout commands to the leader.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
from collections.abc import Callable
from typing import Any, Protocol

from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.audit import SYSTEM, AuditTrail, Notify
from edgefleet.fleet.control.drift_desk import DriftDesk
from edgefleet.fleet.control.keyring import KeyringService
from edgefleet.fleet.drift import AlertChange, DriftView
from edgefleet.fleet.errors import FleetError
from edgefleet.fleet.lease import Fence, Turn
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.relay import OperatorRequest
from edgefleet.fleet.scale import ScaleOut, shared_filter
from edgefleet.fleet.telemetry import VersionKey

__all__ = ["LeasedRole", "LocalBundles", "Role", "SingleRole"]

log = logging.getLogger(CONTROLLER_LOG)

LocalBundles = Callable[[], dict[str, Callable[[], bytes]]]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def unique_suffix(name: str = "") -> str:
    """``NAME-PID-RANDOM`` (NAME: the host's when empty): tells this controller's
    connection apart from any other's, two in one process too, and names it in the
    broker's log."""
    name = _UNSAFE.sub("-", name or socket.gethostname())[:40] or "controller"
    return f"{name}-{os.getpid()}-{secrets.token_hex(3)}"


class Role(Protocol):
    """What differs between a controller alone and one of several."""

    @property
    def leading(self) -> bool:
        """This controller executes rollouts, writes devices and publishes desired states."""
        ...

    @property
    def relays(self) -> bool:
        """An operator's rollout command goes to another controller (the leader)."""
        ...

    @property
    def fence(self) -> Fence | None:
        """What a rollout save carries (raises LeaseLostError on a controller not leading)."""
        ...

    def client_id(self, fleet: str) -> str: ...
    def telemetry_filter(self, topic_filter: str) -> str:
        """The subscription for devices' telemetry: all of it, or this one's share."""
        ...
    def start(self, local_bundles: LocalBundles) -> None: ...
    def turn(self, registry: DeviceRegistry) -> bool:
        """This tick's share of the work before rollouts; True: go on and tick them."""
        ...
    def requests(self) -> list[OperatorRequest]: ...
    def finish(self, request: OperatorRequest, ok: bool, result: Any) -> None: ...
    def relay(self, kind: str, body: dict[str, Any], actor: str) -> Any: ...
    def judged(self, desk: DriftDesk, changes: list[AlertChange], now: int) -> None: ...
    def drift_view(self, desk: DriftDesk) -> DriftView: ...
    def catch_up(self, keyring: KeyringService) -> None:
        """Every few ticks: take in what another controller stored (its keyring)."""
        ...
    def desired_url(self, rollout_url: str, own_url: str) -> str: ...
    def share_bundle(self, sha256: str, read: Callable[[], bytes]) -> None: ...
    def fetch_bundle(self, sha256: str) -> bytes | None: ...
    def release(self) -> None: ...
    def status(self) -> dict[str, Any]: ...


class SingleRole:
    """The only controller: it always leads, and every command runs here."""

    leading = True
    relays = False
    fence = None

    def __init__(self, controller_id: str, take_office: Callable[[], None]) -> None:
        self.controller_id, self._take_office = controller_id, take_office
        self._suffix = unique_suffix(controller_id)

    def client_id(self, fleet: str) -> str:
        """Unique per controller, ``edgefleet-controller-FLEET-ID-PID-RANDOM`` (ID: the
        controller id, else the host name): a broker disconnects the older of two equal
        client ids, and two controllers of one fleet started alone (the same host name as
        their default id) would take the connection from each other in turn."""
        return f"edgefleet-controller-{fleet}-{self._suffix}"

    def telemetry_filter(self, topic_filter: str) -> str:
        return topic_filter

    def start(self, local_bundles: LocalBundles) -> None:
        self._take_office()

    def turn(self, registry: DeviceRegistry) -> bool:
        return True

    def requests(self) -> list[OperatorRequest]:
        return []

    def finish(self, request: OperatorRequest, ok: bool, result: Any) -> None:
        raise FleetError("a controller alone takes no relayed requests")

    def relay(self, kind: str, body: dict[str, Any], actor: str) -> Any:
        raise FleetError("a controller alone relays nothing")

    def judged(self, desk: DriftDesk, changes: list[AlertChange], now: int) -> None:
        desk.announce(changes)

    def drift_view(self, desk: DriftDesk) -> DriftView:
        return desk.view()

    def catch_up(self, keyring: KeyringService) -> None:
        return None

    def desired_url(self, rollout_url: str, own_url: str) -> str:
        return rollout_url

    def share_bundle(self, sha256: str, read: Callable[[], bytes]) -> None:
        return None

    def fetch_bundle(self, sha256: str) -> bytes | None:
        return None

    def release(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"id": self.controller_id or None, "role": "single",
                "leader": self.controller_id or None}


class LeasedRole:
    """One of several controllers on one store and one broker: it leads while it holds
    the lease; as a follower it keeps its registry from MQTT and relays commands."""

    def __init__(self, scale: ScaleOut, share_group: str | None, audit: AuditTrail,
                 notify: Notify, wanted: Callable[[], list[VersionKey]],
                 take_office: Callable[[], None], leave_office: Callable[[], None]) -> None:
        """``share_group``: telemetry is split between the controllers of this group (MQTT
        shared subscription); None: every controller takes all of it."""
        self.scale, self.share_group = scale, share_group
        self.audit, self.notify, self._wanted = audit, notify, wanted
        self._take_office, self._leave_office = take_office, leave_office

    @property
    def leading(self) -> bool:
        return self.scale.leading

    @property
    def relays(self) -> bool:
        return not self.scale.leading

    @property
    def fence(self) -> Fence | None:
        return self.scale.fence

    def client_id(self, fleet: str) -> str:
        """Unique per controller: a broker disconnects the older of two equal client ids."""
        return f"edgefleet-controller-{fleet}-{self.scale.controller_id}"

    def telemetry_filter(self, topic_filter: str) -> str:
        if self.share_group is None:
            return topic_filter
        return shared_filter(self.share_group, topic_filter)

    def start(self, local_bundles: LocalBundles) -> None:
        self.scale.share_bundles(local_bundles())
        self._take_turn()

    def turn(self, registry: DeviceRegistry) -> bool:
        """Renew or contest the lease, take in other controllers' label changes and share
        telemetry; a follower stops there (the leader handles newcomers)."""
        self._take_turn()
        self.scale.sync_labels(registry)
        if self.share_group is not None:
            self.scale.exchange_telemetry(self.wanted_keys())
        if not self.leading:
            registry.take_joined()
            return False
        return True

    def wanted_keys(self) -> list[VersionKey]:
        """The versions whose telemetry the leader's quality gates need from everyone."""
        if not self.leading or self.share_group is None:
            return []
        return self._wanted()

    def _take_turn(self) -> None:
        led = self.leading
        try:
            turn = self.scale.turn(self.wanted_keys())
        except FleetError:
            if led and not self.leading:
                self._leave_office()
            raise
        if turn == Turn.ELECTED:
            self._take_office()
            self.audit.record(SYSTEM, "controller.elected", self.scale.controller_id,
                              f"leads with lease generation "
                              f"{self.scale.leadership.generation}")
        elif turn == Turn.DEPOSED:
            self._leave_office()
        if turn in (Turn.ELECTED, Turn.DEPOSED):
            self.notify("controller", self.scale.status())

    def requests(self) -> list[OperatorRequest]:
        return self.scale.take_requests()

    def finish(self, request: OperatorRequest, ok: bool, result: Any) -> None:
        self.scale.finish(request, ok, result)

    def relay(self, kind: str, body: dict[str, Any], actor: str) -> Any:
        return self.scale.relay(kind, body, actor)

    def judged(self, desk: DriftDesk, changes: list[AlertChange], now: int) -> None:
        """The leader judges for everyone and says so once; a follower keeps its pools
        for a takeover and shows the leader's view."""
        if self.leading:
            desk.announce(changes)
            desk.write_view(now, bool(changes))
        else:
            desk.read_view()

    def drift_view(self, desk: DriftDesk) -> DriftView:
        return desk.view() if self.leading else desk.leader_view()

    def catch_up(self, keyring: KeyringService) -> None:
        keyring.follow()

    def desired_url(self, rollout_url: str, own_url: str) -> str:
        return own_url  # the leader that publishes serves it (or its balancer)

    def share_bundle(self, sha256: str, read: Callable[[], bytes]) -> None:
        self.scale.share_bundle(sha256, read())  # every controller may have to serve it

    def fetch_bundle(self, sha256: str) -> bytes | None:
        return self.scale.fetch_bundle(sha256)

    def release(self) -> None:
        try:
            self.scale.release()  # a follower takes over at its next tick
        except FleetError as exc:
            log.warning("could not release the lease (it expires by itself): %s", exc)

    def status(self) -> dict[str, Any]:
        return self.scale.status()
