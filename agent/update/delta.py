"""The download step with a delta: rebuild the update's bundle from the device's own
bundle and a delta the fleet offers, else download the full bundle.

The delta is used only when all of these hold, in this order; at the first that does not,
the full bundle is downloaded (:func:`edgefleet.agent.update.download.fetch`), and nothing
the delta path wrote is kept:

1. the desired state offers one, and the device serves a bundle (its base);
2. the delta is at most :data:`~edgefleet.agent.protocol.delta.MAX_SHARE` of the bundle;
3. the base file's sha256 is the one the delta applies to (a base altered on the device,
   or another bundle than the fleet thought, never gets a delta);
4. the delta downloads (resuming with Range like a bundle: ``downloads/<sha256>.delta``)
   and its sha256 is the offered one;
5. it applies within the bounds of :func:`~edgefleet.agent.protocol.delta.apply_delta`
   (the output never beyond the bundle's size);
6. the rebuilt file's sha256 is that of the bundle file the fleet serves.

The rebuilt bundle then goes through the same verification as a downloaded one
(signature, sha256 of every file, health check): a delta never skips a check. That
verification runs here first (``verify``): a rebuilt bundle that fails it (a delta the
fleet built from a stale or poisoned record) is discarded and the full bundle is
downloaded once, then verified again by the update flow like any download.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.agent.protocol.delta import MAX_SHARE, DeltaError, apply_delta, worth_it
from edgefleet.agent.protocol.payloads import DeltaRef
from edgefleet.agent.update.disk import discard, guarded
from edgefleet.agent.update.download import DownloadStats, fetch
from edgefleet.agent.update.target import UpdateTarget

__all__ = ["DELTA_RETRIES", "DeltaStats", "fetch_bundle"]

log = logging.getLogger(__name__)
DELTA_RETRIES = 2  # fruitless attempts in a row before the full bundle is fetched instead


@dataclass
class DeltaStats:
    """What the delta path did over this agent's life: rebuilt bundles (and the bytes they
    downloaded against the full bundles' sizes), fallbacks by reason, and the last
    fallback's reason."""

    used: int = 0
    fallbacks: int = 0
    last_fallback: str = ""
    delta_bytes: int = 0  # downloaded for the bundles rebuilt from deltas
    full_bytes: int = 0  # what those bundles would have cost whole
    reasons: Counter[str] = field(default_factory=Counter)  # fallbacks by reason


def fetch_bundle(target: UpdateTarget, dest: Path, base: Path | None, *,
                 stats: DownloadStats, deltas: DeltaStats | None = None,
                 verify: Callable[[Path], object] = lambda path: None) -> Path:
    """Write the target's bundle file to ``dest``: rebuilt from ``base`` and the offered
    delta when that works and the rebuilt file passes ``verify`` (the update's own
    verification), else downloaded whole (once; the caller verifies that one)."""
    deltas = deltas if deltas is not None else DeltaStats()
    if target.delta is not None and base is not None:
        reason = ""
        try:
            rebuilt = _rebuild(target, target.delta, dest, base, stats)
            reason = "verify"
            verify(rebuilt)
        except Exception as exc:  # whatever failed, the full bundle is the safe way on
            with guarded(dest):
                discard(dest)  # a rebuilt file that failed verification is never kept
            _fell_back(deltas, target, reason if reason == "verify" else type(exc).__name__, exc)
        else:
            _used(deltas, target, target.delta)
            return rebuilt
    return fetch(target.url, dest, target.size or 0, stats=stats)


def _fell_back(deltas: DeltaStats, target: UpdateTarget, reason: str,
               exc: BaseException) -> None:
    deltas.fallbacks += 1
    deltas.reasons[reason] += 1
    deltas.last_fallback = str(exc)
    log.warning("delta for %s %s not used (%s), downloading the full bundle: %s",
                target.name, target.version, reason, exc)


def _used(deltas: DeltaStats, target: UpdateTarget, delta: DeltaRef) -> None:
    full = target.size or 0
    deltas.used += 1
    deltas.delta_bytes += delta.size
    deltas.full_bytes += full
    log.info("bundle %s %s rebuilt from a delta: %d bytes downloaded of the bundle's %d "
             "(%.3f)", target.name, target.version, delta.size, full,
             delta.size / full if full else 0.0)


def _rebuild(target: UpdateTarget, delta: DeltaRef, dest: Path, base: Path,
             stats: DownloadStats) -> Path:
    size = target.size or 0
    if not worth_it(delta.size, size):
        raise DeltaError(f"the delta is {delta.size} bytes, more than {MAX_SHARE:.0%} of the "
                         f"bundle's {size}", hint="the full bundle is downloaded instead")
    with guarded(base):
        base_bytes = base.read_bytes()
    if _sha256(base_bytes) != delta.base:
        raise DeltaError(f"the device's bundle {base} is not the delta's base "
                         f"{delta.base[:12]}", hint="the full bundle is downloaded instead")
    patch = dest.with_name(f"{target.sha256}.delta")
    try:
        delta_bytes = _download(delta, patch, stats)
        _write_rebuilt(base_bytes, delta_bytes, size, delta.result, dest)
    finally:
        with guarded(patch):
            discard(patch, patch.with_suffix(".delta.part"))
    return dest


def _download(delta: DeltaRef, patch: Path, stats: DownloadStats) -> bytes:
    fetch(delta.url, patch, delta.size, retries=DELTA_RETRIES, stats=stats)
    with guarded(patch):
        data = patch.read_bytes()
    if _sha256(data) != delta.sha256:
        raise DeltaError(f"the delta downloaded from {delta.url} is not the one offered "
                         f"(sha256 {_sha256(data)[:12]}, offered {delta.sha256[:12]})",
                         hint="the full bundle is downloaded instead")
    return data


def _write_rebuilt(base: bytes, delta: bytes, size: int, result: str, dest: Path) -> None:
    """Rebuild into a temp file, fsync, check its sha256, then rename it to ``dest``."""
    tmp = dest.with_name(dest.name + ".rebuild")
    digest = hashlib.sha256()
    try:
        with guarded(tmp), open(tmp, "wb") as out:
            def write(chunk: bytes) -> None:
                digest.update(chunk)
                out.write(chunk)

            apply_delta(base, delta, size, write)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != result:
            raise DeltaError(f"the delta rebuilt a file of sha256 {digest.hexdigest()[:12]}, "
                             f"not the bundle's {result[:12]}",
                             hint="the full bundle is downloaded instead")
        with guarded(dest):
            os.replace(tmp, dest)
    finally:
        discard(tmp)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
