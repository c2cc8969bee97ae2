"""Load a bundle for serving: verify, check runtime compatibility, load, health-check.

An encrypted model is decrypted in memory with the device's keys and handed to the
runtime as bytes (LiteRT's ``model_content``, ONNX Runtime's serialized model): the
plain model is never written to disk, and a device without a matching key refuses
the bundle before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.health import HealthCheckError, HealthResult, run_health_check
from edgefleet.agent.protocol.bundle import Bundle, read_bundle
from edgefleet.agent.protocol.encryption import DecryptionKeys
from edgefleet.agent.protocol.health import HealthData
from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.agent.runtime.base import Runtime
from edgefleet.agent.runtime.select import load_runtime

__all__ = ["LoadedModel", "load_bundle"]


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle, its runtime, and the health check it passed here."""

    bundle: Bundle
    runtime: Runtime
    health: HealthResult

    @property
    def ref(self) -> BundleRef:
        m = self.bundle.manifest
        return BundleRef(name=m.name, version=m.version, sha256=self.bundle.sha256)

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version


def load_bundle(source: Path | bytes, trusted: TrustedKeys, *, threads: int = 1,
                latency_budget_ms: float | None = None,
                keys: DecryptionKeys | None = None) -> LoadedModel:
    """Verify in the order of the contract (decrypting with ``keys`` when the model is
    encrypted), then load and health-check; close on failure."""
    bundle = read_bundle(source, trusted, keys if keys is not None else DecryptionKeys())
    manifest = bundle.manifest
    runtime = load_runtime(bundle.model_bytes, manifest.format, threads=threads,
                           required=manifest.runtime.name,
                           min_version=manifest.runtime.min_version)
    try:
        _check_tensors(bundle, runtime)
        health = run_health_check(runtime, HealthData.from_bytes(bundle.health_bytes),
                                  latency_budget_ms)
    except BaseException:
        runtime.close()
        raise
    return LoadedModel(bundle, runtime, health)


def _check_tensors(bundle: Bundle, runtime: Runtime) -> None:
    declared = {(t.name, t.dtype) for t in bundle.manifest.inputs}
    actual = {(t.name, t.dtype) for t in runtime.inputs}
    if declared != actual:
        raise HealthCheckError(
            f"manifest inputs {sorted(declared)} do not match the model's {sorted(actual)}",
            hint="the manifest was written for another model; rebuild the bundle")
