"""Deltas between pushed bundles: built once per pair, kept by content address, offered
in a desired state when worth it (docs/deltas.md).

A delta is named by the pair of bundles it joins, ``{from}-{to}`` (the sha256 of each
manifest), and kept in ``<data>/bundles/deltas/`` beside a small record: the delta
file's sha256 and size, and the sha256 of the two bundle files (the device checks its
base and the rebuilt file against those). A pair whose delta is not at most
:data:`~edgefleet.agent.protocol.delta.MAX_SHARE` of the full bundle is recorded as
such and never built again; neither is a pair that failed to build.

A pair is built when a desired state first needs it: in practice when the rollout is
created, whose first tick sends the first wave (measured in BENCHMARKS.md, "Delta
updates"). ``/deltas/{from}-{to}`` (no token) serves only what was built; a request never
starts a build, so nobody can make the controller diff bundles by asking (scaled out, a
controller that did not make the offer answers 404 and the device downloads the bundle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgefleet.agent.protocol.delta import build_delta, worth_it
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.protocol.payloads import DeltaRef
from edgefleet.fleet.control import CONTROLLER_LOG

__all__ = ["DELTA_PATH", "MAX_BUILD_BYTES", "DeltaRecord", "DeltaShelf"]

log = logging.getLogger(CONTROLLER_LOG)
# the largest bundle a delta is built for: the build holds both bundles and zstd's level-19
# tables over a window as large as the old bundle in memory; larger ones go whole
MAX_BUILD_BYTES = 256 * 1024 * 1024
# a pair whose bundles are not both held is looked up again only after this long (a fleet
# of devices flashed with a bundle never pushed must not cost a store query each)
_RETRY_S = 60.0
DELTA_PATH = re.compile(r"^/deltas/([0-9a-f]{64})-([0-9a-f]{64})$")


@dataclass(frozen=True)
class DeltaRecord:
    """What one pair's build gave: the delta (sha256, size), or why there is none."""

    base_file: str  # sha256 of the base bundle's file
    result_file: str  # sha256 of the target bundle's file
    full_size: int
    sha256: str = ""  # of the delta file; empty: no delta for this pair
    size: int = 0
    build_ms: float = 0.0
    none: str = ""  # why there is no delta (too large, failed)

    @property
    def usable(self) -> bool:
        return bool(self.sha256) and worth_it(self.size, self.full_size)


class DeltaShelf:
    """The deltas of one controller's artifacts folder."""

    def __init__(self, folder: Path, bundle_path: Callable[[str], Path | None],
                 public_url: str, build: Callable[[bytes, bytes], bytes] = build_delta) -> None:
        self.folder, self.bundle_path, self.public_url = folder, bundle_path, public_url
        self._build_delta = build
        self._records: dict[tuple[str, str], DeltaRecord] = {}
        self._missing: dict[tuple[str, str], float] = {}  # pairs not held, and since when
        self._building: set[tuple[str, str]] = set()  # pairs being built (outside the lock)
        self._unread: dict[tuple[str, str], float] = {}  # requests found no good record
        self._lock = threading.Condition()

    def url(self, base: str, target: str) -> str:
        return f"{self.public_url.rstrip('/')}/deltas/{base}-{target}"

    def offer(self, base: str, target: str) -> DeltaRef | None:
        """The delta a device serving bundle ``base`` may rebuild ``target`` from, or None
        (not both bundles held here, or no delta worth it)."""
        record = self.record(base, target)
        if record is None or not record.usable:
            return None
        return DeltaRef(url=self.url(base, target), sha256=record.sha256, size=record.size,
                        base=record.base_file, result=record.result_file)

    def path(self, base: str, target: str) -> Path | None:
        """The delta file to serve: only one this controller built or holds (a request,
        which needs no token, never starts a build)."""
        key, now = (base, target), time.monotonic()
        with self._lock:
            record, busy = self._records.get(key), key in self._building
            tried = self._unread.get(key)
        if record is None and not busy and (tried is None or now - tried >= _RETRY_S):
            record = self._load(base, target)  # hashes the bundles: at most once a while
            with self._lock:
                if record is None:
                    self._unread[key] = now
                else:
                    record = self._records.setdefault(key, record)
        file = self._file(base, target)
        return file if record is not None and record.sha256 and file.exists() else None

    def record(self, base: str, target: str) -> DeltaRecord | None:
        """The pair's record: remembered, read from disk, or built now (None: one of the
        bundles is not held here). A build runs outside the lock, once per pair: other
        pairs are answered meanwhile, the same pair waits for it."""
        key = (base, target)
        with self._lock:
            while True:
                if key in self._records:
                    return self._records[key]
                missed = self._missing.get(key)
                if missed is not None and time.monotonic() - missed < _RETRY_S:
                    return None
                if key not in self._building:
                    self._building.add(key)
                    break
                self._lock.wait()
        record: DeltaRecord | None = None
        try:
            record = self._load(base, target) or self._build(base, target)
        finally:
            with self._lock:
                self._building.discard(key)
                if record is not None:
                    self._records[key] = record
                else:  # not held: looked up again a while later
                    self._missing[key] = time.monotonic()
                self._lock.notify_all()
        return record

    def _file(self, base: str, target: str) -> Path:
        return self.folder / f"{base}-{target}.zst"

    def _record_file(self, base: str, target: str) -> Path:
        return self.folder / f"{base}-{target}.json"

    def _load(self, base: str, target: str) -> DeltaRecord | None:
        """The pair's record on disk, only if it matches the bundles held here and the
        delta file beside it (a stale or altered record is built again, never trusted)."""
        try:
            record = DeltaRecord(**json.loads(self._record_file(base, target).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if not self._matches(base, target, record):
            log.warning("delta record %s -> %s does not match the bundles or the delta "
                        "held; building it again", base[:12], target[:12])
            return None
        return record

    def _matches(self, base: str, target: str, record: DeltaRecord) -> bool:
        paths = self.bundle_path(base), self.bundle_path(target)
        if paths[0] is None or paths[1] is None:
            return False
        if not record.base_file and not record.sha256:  # over MAX_BUILD_BYTES: nothing built
            return record.full_size == paths[1].stat().st_size
        if (_file_sha256(paths[0]), _file_sha256(paths[1])) != (record.base_file,
                                                                 record.result_file):
            return False
        if record.full_size != paths[1].stat().st_size:
            return False
        file = self._file(base, target)
        return not record.sha256 or (file.exists() and file.stat().st_size == record.size
                                     and _file_sha256(file) == record.sha256)

    def _build(self, base: str, target: str) -> DeltaRecord | None:
        paths = self.bundle_path(base), self.bundle_path(target)
        if paths[0] is None or paths[1] is None or base == target:
            return None
        if max(paths[0].stat().st_size, paths[1].stat().st_size) > MAX_BUILD_BYTES:
            record = DeltaRecord("", "", paths[1].stat().st_size)
            return self._keep(base, target, record, none="a bundle is over MAX_BUILD_BYTES")
        old, new = paths[0].read_bytes(), paths[1].read_bytes()
        record = DeltaRecord(_sha256(old), _sha256(new), len(new))
        started = time.perf_counter()
        try:
            delta = self._build_delta(old, new)
        except Exception as exc:  # a pair that cannot be built is served whole, and logged
            log.exception("delta %s -> %s not built", base[:12], target[:12])
            return self._keep(base, target, record, none=f"build failed: {exc}")
        spent = round((time.perf_counter() - started) * 1000, 1)
        if not worth_it(len(delta), len(new)):
            return self._keep(base, target, record, none="not smaller than the share",
                              size=len(delta), build_ms=spent)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._file(base, target), delta)
        log.info("delta %s -> %s: %d of %d bytes (%.3f) in %.0f ms", base[:12], target[:12],
                 len(delta), len(new), len(delta) / len(new), spent)
        return self._keep(base, target, record, sha256=_sha256(delta), size=len(delta),
                          build_ms=spent)

    def _keep(self, base: str, target: str, record: DeltaRecord,
              **found: str | int | float) -> DeltaRecord:
        kept = DeltaRecord(**{**asdict(record), **found})
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._record_file(base, target), json.dumps(asdict(kept)).encode())
        return kept


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError:
        return ""
