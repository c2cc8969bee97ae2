"""What a controller does besides its own work when several share one store and one broker.

:class:`ScaleOut` is owned by the controller's leased role
(:class:`edgefleet.fleet.control.role.LeasedRole`) when scale-out is configured
(``--lease-s``, docs/scale-out.md); one controller alone on SQLite never makes one and
pays nothing. Every tick, under the controller's lock, it:

1. renews or contests the lease (:class:`edgefleet.fleet.lease.Leadership`), telling the controller
   whether it was just elected or deposed; the leader writes into the lease row the
   version keys its quality gates need (``wanted``);
2. applies the group and tag changes operators made through any controller
   (``labels_seq``, one small query);
3. with shared telemetry: writes what this controller ingested of the wanted keys, and
   on a follower every drift window it was handed, as one batch (one row), and, on the
   leader, merges the other controllers' batches into its telemetry book and its drift
   monitor (one query); the leader prunes the batches to the quality window.

Followers relay rollout commands to the leader through the store
(:mod:`edgefleet.fleet.relay`); the leader takes them at step 4 of its tick and runs each
from the command table (:mod:`edgefleet.fleet.control.commands`), as it runs its own
operators' commands. Bundle bytes go into the store at push, so any controller can serve
(and inspect) any bundle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from edgefleet.fleet.drift import DriftMonitor
from edgefleet.fleet.lease import Fence, Leadership, Turn
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.relay import OperatorRequest, relay
from edgefleet.fleet.store import Store
from edgefleet.fleet.telemetry import TelemetryBook, VersionKey

__all__ = ["ScaleOut", "check_group", "shared_filter"]

log = logging.getLogger(__name__)
_ONLY_THE_SEQUENCE = 2**62  # labels_since() above every sequence: no rows, just the number
_PRUNE_EVERY_MS = 30_000
_REQUESTS_KEPT_MS = 24 * 3600 * 1000


def check_group(group: str) -> str:
    """A share group name: non-empty, without ``/``, ``+``, ``#`` or ``:``."""
    if not group or any(c in group for c in "/+#:") or len(group) > 64:
        raise ValueError(f"{group!r} is not a shared subscription group: use 1-64 characters "
                         "without '/', '+', '#' or ':'")
    return group


def shared_filter(group: str, topic_filter: str) -> str:
    """``topic_filter`` as a shared subscription of ``group`` (``$share/GROUP/FILTER``):
    the broker hands each matching message to one member of the group (MQTT 5; Mosquitto
    2, EMQX, HiveMQ and VerneMQ accept it from MQTT 3.1.1 clients too). Messages arrive
    under their real topic; :func:`edgefleet.agent.mqtt.topic_matches` routes them by FILTER."""
    return f"$share/{check_group(group)}/{topic_filter}"


class ScaleOut:
    """One controller's part in a group of controllers on one store and one broker."""

    def __init__(self, store: Store, telemetry: TelemetryBook, drift: DriftMonitor,
                 controller_id: str, lease_s: float, tick_s: float, url: str,
                 share_group: str | None, clock: Callable[[], int]) -> None:
        self.store, self.telemetry, self.drift = store, telemetry, drift
        self.controller_id, self.lease_s, self.tick_s = controller_id, lease_s, tick_s
        self.share_group, self.clock = share_group, clock
        self.leadership = Leadership(store, controller_id, lease_s, url)
        self.stream = f"{controller_id}-{self.leadership.nonce}"  # this process's shares
        # read before the controller reads its registry: changes in between come again
        self._labels_seq = store.labels_since(_ONLY_THE_SEQUENCE)[0]
        self._shared_keys: set[VersionKey] = set()
        self._share_seq = 0
        self._cursors: dict[str, int] = {}  # stream -> last seq merged (leader)
        self._cursor_seen: dict[str, int] = {}
        self._pruned_ms = 0

    @property
    def leading(self) -> bool:
        return self.leadership.leading

    @property
    def fence(self) -> Fence:
        return self.leadership.fence

    @property
    def relay_timeout_s(self) -> float:
        """Long enough for a takeover (lease + a tick) and the new leader's tick."""
        return self.lease_s + 3 * self.tick_s + 2.0

    # --- every tick ---------------------------------------------------------------------

    def turn(self, wanted: Iterable[VersionKey]) -> Turn:
        """Renew or contest the lease; ``wanted`` goes in the row while this one leads."""
        keys = [list(k) for k in sorted(set(wanted))] if self.leadership.generation else []
        turn = self.leadership.renew(json.dumps(keys) if keys else "")
        if turn == Turn.ELECTED:
            self._cursors.clear()  # read every share still kept: they are new to a leader
            log.warning("controller %s leads now (lease generation %d)", self.controller_id,
                        self.leadership.generation)
        elif turn == Turn.DEPOSED:
            lease = self.leadership.current
            log.warning("controller %s lost the lease to %s: it follows now",
                        self.controller_id, lease.holder if lease else "?")
        return turn

    def sync_labels(self, registry: DeviceRegistry) -> None:
        """Group, tag and label changes operators made (through any controller) since
        last time."""
        seq, changes = self.store.labels_since(self._labels_seq)
        self._labels_seq = seq
        labels = self.store.labels_of([device for device, _, _ in changes]) if changes else {}
        for device, group, tags in changes:
            registry.relabel(device, group, tags, labels.get(device, {}))

    def exchange_telemetry(self, wanted: Iterable[VersionKey]) -> None:
        """Share what the leader wants; the leader merges what the others shared."""
        keys = set(wanted) if self.leading else {
            (str(k[0]), str(k[1])) for k in self.leadership.wanted()
            if isinstance(k, list) and len(k) == 2}
        share: dict[str, Any] = dict(self.telemetry.take_share(keys, keys - self._shared_keys))
        self._shared_keys = keys
        drift = self.drift.take_journal()
        if drift and not self.leading:  # the leader judges drift for everyone
            share["d"] = drift
        if share["w"] or share["a"] or share.get("d"):
            self._share_seq += 1
            self.store.share_telemetry(self.stream, self._share_seq,
                                       json.dumps(share, separators=(",", ":")))
        if self.leading:
            self._merge_shares()

    def _merge_shares(self) -> None:
        now = self.clock()
        for stream, seq, body in self.store.shared_telemetry(self.stream, self._cursors):
            try:
                shared = json.loads(body)
                self.telemetry.merge(shared)
                self.drift.merge(shared.get("d", []))
            except (ValueError, TypeError, AttributeError) as exc:
                log.warning("dropped telemetry share %s#%d: %s", stream, seq, exc)
            self._cursors[stream], self._cursor_seen[stream] = seq, now
        if now - self._pruned_ms >= _PRUNE_EVERY_MS:
            self._pruned_ms = now
            self.store.prune_shared(self.telemetry.window_ms, _REQUESTS_KEPT_MS)
            for stream, seen in list(self._cursor_seen.items()):
                if now - seen > self.telemetry.window_ms:  # its shares are pruned by now
                    self._cursors.pop(stream, None)
                    self._cursor_seen.pop(stream, None)

    # --- operator requests --------------------------------------------------------------

    def relay(self, kind: str, body: dict[str, Any], actor: str) -> Any:
        """A follower's operator action, done by the leader (blocks up to a takeover)."""
        return relay(self.store, kind, body, actor, self.clock(), self.relay_timeout_s)

    def take_requests(self) -> list[OperatorRequest]:
        return self.store.take_requests(self.fence, self.controller_id)

    def finish(self, request: OperatorRequest, ok: bool, result: Any) -> None:
        self.store.finish_request(request.id, ok, result)

    # --- bundles ------------------------------------------------------------------------

    def share_bundle(self, sha256: str, data: bytes) -> None:
        self.store.put_bundle(sha256, data)

    def share_bundles(self, local: dict[str, Callable[[], bytes]]) -> int:
        """Put the bundles only this controller holds into the store (a single controller
        that became one of several); returns how many."""
        missing = set(local) - self.store.bundle_shas()
        for sha256 in sorted(missing):
            self.store.put_bundle(sha256, local[sha256]())
        return len(missing)

    def fetch_bundle(self, sha256: str) -> bytes | None:
        return self.store.bundle_data(sha256)

    # --- life ---------------------------------------------------------------------------

    def release(self) -> None:
        self.leadership.release()

    def status(self) -> dict[str, Any]:
        return {**self.leadership.status(), "shared_telemetry": self.share_group,
                "telemetry_merged": self.telemetry.merged}
