"""The model catalog: pushed model versions, their bundles (content-addressed files in
the data folder), and what a device needs to run one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.runtime.inspect import ModelInfo, inspect_model
from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.audit import AuditTrail
from edgefleet.fleet.control.keyring import KeyringService
from edgefleet.fleet.control.role import Role
from edgefleet.fleet.domain import ModelVersion
from edgefleet.fleet.errors import ConflictError, FleetError, NotFoundError
from edgefleet.fleet.store import Store

__all__ = ["ModelCatalog"]

log = logging.getLogger(CONTROLLER_LOG)


class ModelCatalog:
    """Pushes verified against the keys trusted now, lookups by key and by sha256, and
    the bundle files served to devices."""

    def __init__(self, store: Store, artifacts: Path, public_url: str, keys: KeyringService,
                 role: Role, audit: AuditTrail, clock: Callable[[], int]) -> None:
        self.store, self.artifacts, self.public_url = store, artifacts, public_url
        self.keys, self.role, self.audit, self.clock = keys, role, audit, clock
        self._by_sha: dict[str, ModelVersion] = {}
        self._info: dict[str, ModelInfo | None] = {}

    def bundle_url(self, sha256: str) -> str:
        return f"{self.public_url.rstrip('/')}/bundles/{sha256}.efb"

    def push_refused(self, actor: str, error: EdgefleetError) -> None:
        """Audit a push the API refused before the controller saw it (its first block)."""
        self.audit.record(actor, "model.push", "?", str(error), outcome="refused")

    def push(self, data: bytes | Path, actor: str) -> tuple[ModelVersion, bool]:
        """Verify a bundle, keep it content-addressed, register its version. A path (an
        upload streamed to a file in ``artifacts``) is renamed into place, never read whole."""
        try:
            bundle = read_bundle(data, self.keys.trusted)
        except EdgefleetError as exc:
            self.audit.record(actor, "model.push", "?", str(exc), outcome="refused")
            raise
        manifest = bundle.manifest
        path = self.artifacts / f"{bundle.sha256}.efb"
        wrote = not path.exists()
        if wrote:
            _keep(path, data)
        size = path.stat().st_size
        model = ModelVersion(name=manifest.name, version=manifest.version, sha256=bundle.sha256,
                             size=size, format=manifest.format,
                             runtime=manifest.runtime.name,
                             min_runtime_version=manifest.runtime.min_version,
                             manifest=manifest.model_dump(mode="json"), path=str(path),
                             pushed_ms=self.clock(), pushed_by=actor)
        try:
            added = self.store.add_model(model)
        except ConflictError as exc:
            if wrote:  # a refused bundle leaves the artifact folder as it was
                path.unlink(missing_ok=True)
            self.audit.record(actor, "model.push", model.key, str(exc), outcome="refused")
            raise
        self.role.share_bundle(bundle.sha256, path.read_bytes)
        if added:
            self.audit.record(actor, "model.push", model.key, f"sha256 {bundle.sha256[:12]}",
                              size=size)
        return (model if added else self.by_sha(bundle.sha256) or model), added

    def model(self, key: str) -> ModelVersion:
        """A pushed version by ``NAME:VERSION``."""
        name, _, version = key.partition(":")
        found = self.store.model(name, version) if version else None
        if found is None:
            known = ", ".join(m.key for m in self.store.models(name)) or "none"
            raise NotFoundError(f"no model version {key!r} (known: {known})",
                                hint="push it first: edgefleet fleet push BUNDLE")
        return found

    def by_sha(self, sha256: str) -> ModelVersion | None:
        """A pushed version (cached: what a sha256 names never changes)."""
        model = self._by_sha.get(sha256)
        if model is None:
            model = self.store.model_by_sha(sha256)
            if model is not None:
                self._by_sha[sha256] = model
        return model

    def info(self, model: ModelVersion) -> ModelInfo | None:
        """The model's ops and tensors, for the compatibility check (None: unknown)."""
        if model.sha256 not in self._info:
            try:
                path = self.bundle_path(model.sha256)  # here, or fetched from the store
                bundle = read_bundle(path or Path(model.path), self.keys.trusted)
                self._info[model.sha256] = (  # an encrypted model's ops need a device's key
                    None if bundle.encrypted else inspect_model(bundle.model_bytes, model.format))
            except Exception:  # inspection is best effort; the runtime check still holds
                log.exception("could not inspect %s", model.key)
                self._info[model.sha256] = None
        return self._info[model.sha256]

    def bundle_path(self, sha256: str) -> Path | None:
        """The bundle's file here; scaled out, fetched from the store (and verified) the
        first time this controller needs a bundle another one was pushed."""
        model = self.by_sha(sha256)
        if model is None:
            return None
        local = self.artifacts / f"{sha256}.efb"
        for path in (Path(model.path), local):
            if path.exists():
                return path
        data = self.role.fetch_bundle(sha256)
        if data is None:
            return Path(model.path)
        try:
            if read_bundle(data, self.keys.trusted).sha256 != sha256:
                raise FleetError(f"the store's bytes of bundle {sha256[:12]} are another "
                                 "bundle", hint="push the bundle again")
        except EdgefleetError as exc:
            log.error("not serving bundle %s from the store: %s", sha256[:12], exc)
            return None
        atomic_write(local, data)
        return local

    def local_bundles(self) -> dict[str, Callable[[], bytes]]:
        """Every pushed bundle this controller holds a file of, read when asked."""
        found: dict[str, Callable[[], bytes]] = {}
        for model in self.store.models():
            for path in (Path(model.path), self.artifacts / f"{model.sha256}.efb"):
                if path.exists():
                    found[model.sha256] = path.read_bytes
                    break
        return found


def _keep(path: Path, data: bytes | Path) -> None:
    """Store a verified bundle: bytes written atomically, an upload's file renamed."""
    if isinstance(data, Path):
        data.replace(path)
    else:
        atomic_write(path, data)
