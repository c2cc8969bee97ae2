"""Leadership of a scaled-out controller: a lease row in the store, renewed every tick.

Several controllers may share one store and one broker (docs/scale-out.md); exactly one
of them, the leader, executes rollouts: it ticks the executor, saves rollouts and
publishes desired states. The others (followers) ingest, keep their registry, answer the
API and relay operator actions to the leader through the store (:mod:`edgefleet.fleet.relay`).

The lease is one row (``leases``): holder id, the holder's per-process ``nonce``, a
``generation`` that grows at every change of holder, and an expiry written in the
**database's clock** (so the controllers' wall clocks never need to agree). Every tick,
each controller runs one compare-and-swap transaction (:meth:`LeaseStore.acquire_lease`):
the holder extends its expiry; anybody else takes the row only once it has expired, with
``generation + 1``.

Safety rests on two rules:

- **Local deadline.** The holder counts its lease valid until ``lease_s x SAFETY`` after
  the moment it *sent* its last successful renewal, on its own monotonic clock; the store
  counts it valid until ``lease_s`` after it *received* it. The holder therefore stops
  acting before anyone else may start, as long as the two clocks' rates differ by less
  than ``1 - SAFETY`` (20 %; real clocks differ by parts per million). A controller that
  was paused (GC, SIGSTOP, a VM migration) or cut off from the store finds its deadline
  passed and publishes nothing more.
- **Fencing.** Every rollout save carries the holder's ``(nonce, generation)``
  (:class:`Fence`); the store checks it against the lease row in the same transaction
  and refuses a stale one (:class:`LeaseLostError`): a leader that wakes from a pause
  after somebody else took over cannot overwrite the new leader's rollouts.

A killed leader's lease is taken over at the first tick of a follower after it expires:
at most ``lease_s + tick_s`` after its last renewal. A leader that stops cleanly releases
the lease (expiry set to 0), so a follower takes over at its next tick.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from edgefleet.fleet.errors import ConflictError

__all__ = ["SAFETY", "Fence", "Leadership", "Lease", "LeaseLostError", "LeaseStore", "Turn"]

log = logging.getLogger(__name__)

SAFETY = 0.8  # the holder's own view of its lease ends at this fraction of lease_s
ROLLOUTS_LEASE = "rollouts"


class LeaseLostError(ConflictError):
    """This controller no longer holds the lease: another one leads (or will shortly)."""

    transient = True


@dataclass(frozen=True)
class Lease:
    """The lease row as one transaction saw it; times in the database's clock (ms)."""

    name: str
    holder: str  # controller id ("" before anyone held it)
    nonce: str  # the holder process's random id
    generation: int
    expires_ms: int
    acquired_ms: int  # when this holder took it
    url: str  # the holder's API, for operators
    wanted: str  # JSON: what the holder asks the others to share (see fleet.telemetry)
    now_ms: int  # the database's clock when it was read

    @property
    def expired(self) -> bool:
        return self.expires_ms < self.now_ms


@dataclass(frozen=True)
class Fence:
    """What a leader's writes carry: the store refuses them unless the lease is still this."""

    name: str
    nonce: str
    generation: int


class LeaseStore(Protocol):
    def acquire_lease(self, name: str, holder: str, nonce: str, ttl_ms: int, url: str = "",
                      wanted: str = "") -> Lease: ...
    def release_lease(self, name: str, nonce: str) -> None: ...


class Turn(str, Enum):
    """What one renewal changed for this controller."""

    ELECTED = "elected"  # it leads now (or again, after its own lease lapsed): load state
    KEPT = "kept"  # it led and still does
    DEPOSED = "deposed"  # it led and does not any more: drop what it was doing
    FOLLOWING = "following"  # it follows, as before


class Leadership:
    """One controller's side of the lease; not thread-safe (the controller's lock guards it)."""

    def __init__(self, store: LeaseStore, controller_id: str, lease_s: float, url: str = "",
                 name: str = ROLLOUTS_LEASE,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store, self.controller_id, self.lease_s = store, controller_id, lease_s
        self.url, self.name, self._monotonic = url, name, monotonic
        self.nonce = secrets.token_hex(8)
        self.generation = 0  # of the lease while this controller holds it; 0 otherwise
        self.current: Lease | None = None  # the row as last seen
        self._valid_until = 0.0

    @property
    def leading(self) -> bool:
        """Holds the lease and its local deadline has not passed."""
        return self.generation > 0 and self._monotonic() < self._valid_until

    @property
    def fence(self) -> Fence:
        if not self.leading:
            raise LeaseLostError(f"controller {self.controller_id} does not lead",
                                 hint=self._hint())
        return Fence(self.name, self.nonce, self.generation)

    def renew(self, wanted: str = "") -> Turn:
        """One compare-and-swap on the lease row; ``wanted`` goes in it while leading."""
        led = self.generation > 0
        started = self._monotonic()
        try:
            lease = self.store.acquire_lease(self.name, self.controller_id, self.nonce,
                                             round(self.lease_s * 1000), self.url, wanted)
        except Exception:
            if led and not self.leading:  # could not renew in time: stop acting
                self.generation = 0
                log.warning("controller %s: the lease lapsed (the store did not answer)",
                            self.controller_id)
            raise
        self.current = lease
        if lease.nonce == self.nonce:
            self._valid_until = started + self.lease_s * SAFETY
            turn = Turn.KEPT if led and lease.generation == self.generation else Turn.ELECTED
            self.generation = lease.generation
            return turn
        self.generation = 0
        return Turn.DEPOSED if led else Turn.FOLLOWING

    def release(self) -> None:
        """A clean stop: let a follower take over at its next tick."""
        if self.generation > 0:
            self.generation = 0
            self.store.release_lease(self.name, self.nonce)

    def wanted(self) -> list[Any]:
        """What the leader asked every controller to share (parsed from the lease row)."""
        lease = self.current
        if lease is None or lease.expired or not lease.wanted:
            return []
        try:
            data = json.loads(lease.wanted)
        except ValueError:
            return []
        return data if isinstance(data, list) else []

    def status(self) -> dict[str, Any]:
        """For /healthz, the overview and ``fleet top``."""
        lease = self.current
        live = lease is not None and lease.holder and not lease.expired
        return {"id": self.controller_id, "role": "leader" if self.leading else "follower",
                "leader": lease.holder if live and lease else None,
                "leader_url": lease.url if live and lease else None,
                "generation": lease.generation if lease else 0, "lease_s": self.lease_s,
                "expires_in_ms": max(lease.expires_ms - lease.now_ms, 0) if lease else 0}

    def _hint(self) -> str:
        lease = self.current
        if lease is not None and lease.holder and not lease.expired:
            return f"controller {lease.holder} leads ({lease.url or 'no URL'}); retry there"
        return f"no controller leads right now; retry within {self.lease_s:g} s"
