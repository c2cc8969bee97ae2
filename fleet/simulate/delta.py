"""The download step with a delta, for simulated devices: the agent's rules on bodies in
memory.

The checks are those of :func:`edgefleet.agent.update.delta.fetch_bundle`, in its order;
at the first that does not hold, the full bundle is downloaded
(:meth:`~edgefleet.fleet.simulate.download.Downloads.fetch`):

1. the desired state offers a delta, and the device serves a bundle (its base);
2. the delta is at most :data:`~edgefleet.agent.protocol.delta.MAX_SHARE` of the bundle;
3. the fleet holds a bundle body whose sha256 is the delta's ``base``
   (:meth:`~edgefleet.fleet.simulate.download.Downloads.held`: the initial bundle and
   every body downloaded or rebuilt), and it is the bundle this device serves;
4. the delta downloads (really, over HTTP, counted as ``delta``) and its sha256 is the
   offered one;
5. it applies (:func:`~edgefleet.agent.protocol.delta.apply_delta`, the agent's code);
6. the rebuilt body's sha256 is the delta's ``result``;
7. the rebuilt body verifies (signature, files) and its manifest is the target's.

The delta's body is dropped once applied; the rebuilt body is kept once per sha256, like
a downloaded one, so memory does not grow with the number of devices. With
``share_downloads`` only the first device to use a delta URL downloads and applies it
(checks 1-3 still run for every device), as only the first requests a bundle URL.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import replace

from edgefleet.agent.protocol.delta import MAX_SHARE, DeltaError, apply_delta, worth_it
from edgefleet.agent.protocol.errors import IntegrityError
from edgefleet.agent.protocol.payloads import BundleRef, DeltaRef
from edgefleet.agent.update.delta import DELTA_RETRIES, DeltaStats
from edgefleet.agent.update.target import UpdateTarget
from edgefleet.fleet.simulate.download import Downloads
from edgefleet.fleet.simulate.models import ModelCache

__all__ = ["DeltaPath"]

log = logging.getLogger(__name__)
_HINT = "the full bundle is downloaded instead"


class DeltaPath:
    """Fetches update bodies for every device of one simulated fleet, through a delta
    when one is offered and works; counts what it did (the agent's
    :class:`~edgefleet.agent.update.delta.DeltaStats`, for the whole fleet)."""

    def __init__(self, downloads: Downloads, models: ModelCache) -> None:
        self.downloads, self.models = downloads, models
        self._stats = DeltaStats()
        self._shared: dict[str, str] = {}  # delta URL -> rebuilt sha256 (share_downloads)
        self._lock = threading.Lock()

    def fetch(self, target: UpdateTarget, base: BundleRef | None) -> str:
        """The sha256 of the target's bundle body: rebuilt from ``base`` (the bundle the
        device serves) and the offered delta when that works, else downloaded whole."""
        if target.delta is not None and base is not None:
            reason = ""
            try:
                digest = self._rebuild(target, target.delta, base)
                reason = "verify"
                self._verify(target, digest)
            except Exception as exc:  # whatever failed, the full bundle is the safe way on
                self._fell_back(target, reason or type(exc).__name__, exc)
            else:
                self._used(target, target.delta, digest)
                return digest
        return self.downloads.fetch(target.url, target.size or 0)

    @property
    def stats(self) -> DeltaStats:
        """A copy of the counts so far."""
        with self._lock:
            return replace(self._stats, reasons=self._stats.reasons.copy())

    def _rebuild(self, target: UpdateTarget, delta: DeltaRef, base: BundleRef) -> str:
        size = target.size or 0
        if not worth_it(delta.size, size):
            raise DeltaError(f"the delta is {delta.size} bytes, more than {MAX_SHARE:.0%} of "
                             f"the bundle's {size}", hint=_HINT)
        base_body = self._base(delta, base)
        with self._lock:
            shared = self._shared.get(delta.url) if self.downloads.share else None
        if shared is not None:
            return shared
        patch = self.downloads.get(delta.url, delta.size, "delta", retries=DELTA_RETRIES)
        if _sha256(patch) != delta.sha256:
            raise DeltaError(f"the delta downloaded from {delta.url} is not the one offered "
                             f"(sha256 {_sha256(patch)[:12]}, offered {delta.sha256[:12]})",
                             hint=_HINT)
        return self.downloads.keep(_apply(base_body, patch, size, delta.result))

    def _base(self, delta: DeltaRef, base: BundleRef) -> bytes:
        """The body the delta applies to, if it is the bundle the device serves."""
        body = self.downloads.held(delta.base)
        if body is None or self.models.verify(delta.base, body).sha256 != base.sha256:
            raise DeltaError(f"the device's bundle {base.name} {base.version} is not the "
                             f"delta's base {delta.base[:12]}", hint=_HINT)
        return body

    def _verify(self, target: UpdateTarget, digest: str) -> None:
        """The update's own verification, before the rebuilt body is used (the flow's
        verify step checks it again, from the cache)."""
        bundle = self.models.verify(digest, self.downloads.body(digest))
        if bundle.sha256 != target.sha256:
            raise IntegrityError(f"the rebuilt bundle has manifest sha256 {bundle.sha256[:12]}, "
                                 f"the target names {target.sha256[:12]}", hint=_HINT)

    def _fell_back(self, target: UpdateTarget, reason: str, exc: Exception) -> None:
        with self._lock:
            self._stats.fallbacks += 1
            self._stats.reasons[reason] += 1
            self._stats.last_fallback = str(exc)
        log.debug("delta for %s %s not used (%s): %s", target.name, target.version, reason, exc)

    def _used(self, target: UpdateTarget, delta: DeltaRef, digest: str) -> None:
        with self._lock:
            self._shared[delta.url] = digest
            self._stats.used += 1
            self._stats.delta_bytes += delta.size
            self._stats.full_bytes += target.size or 0


def _apply(base: bytes, patch: bytes, size: int, result: str) -> bytes:
    """The rebuilt body (the agent's :func:`apply_delta`), checked against ``result``."""
    out, digest = bytearray(), hashlib.sha256()

    def write(chunk: bytes) -> None:
        digest.update(chunk)
        out.extend(chunk)

    apply_delta(base, patch, size, write)
    if digest.hexdigest() != result:
        raise DeltaError(f"the delta rebuilt a body of sha256 {digest.hexdigest()[:12]}, not "
                         f"the bundle's {result[:12]}", hint=_HINT)
    return bytes(out)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
