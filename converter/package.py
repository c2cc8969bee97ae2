"""Package a model into a signed bundle: describe its tensors, record health vectors,
lineage, and (with ``encrypt_for``) encrypt the model for its recipients.

The model travels as bytes from the converter to the archive: no plain copy is written
anywhere but the bundle, and into the bundle only when it is not encrypted."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgefleet.agent.drift import scales_of
from edgefleet.agent.protocol.bundle import write_bundle
from edgefleet.agent.protocol.drift import Monitoring, reference_from
from edgefleet.agent.protocol.encryption import RecipientKey
from edgefleet.agent.protocol.health import HealthData
from edgefleet.agent.protocol.manifest import (
    LABELS_FILE,
    MODEL_FILES,
    PLAIN_SCHEMA_VERSION,
    Lineage,
    Manifest,
    Optimization,
    Quantization,
    RuntimeRequirement,
    TensorSpec,
)
from edgefleet.agent.protocol.signing import SigningKey
from edgefleet.agent.runtime.base import Array, Runtime, TensorInfo
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter.data import Dataset
from edgefleet.converter.destination import writing
from edgefleet.converter.evaluate import batch_size, fixed_batch

__all__ = ["PackageSpec", "package_bytes", "package_model", "tensor_spec"]

RUNTIME_FOR_FORMAT = {"tflite": "litert", "onnx": "onnxruntime"}


@dataclass(frozen=True)
class PackageSpec:
    """What goes into a bundle besides the model bytes."""

    name: str
    version: str
    health_inputs: Mapping[str, Array]
    task: str = "other"
    labels: tuple[str, ...] = ()
    optimization: Optimization = field(default_factory=Optimization)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    min_runtime_version: str = "0"
    opset: int | None = None  # an ONNX model's default-domain opset, recorded in the manifest
    atol: float = 1e-4
    rtol: float = 1e-3
    lineage: Lineage | None = None
    encrypt_for: tuple[RecipientKey, ...] = ()
    # drift reference: these inputs (as the model takes them) and the model's answers on
    # them; None = the health inputs; an empty mapping = no reference
    reference_inputs: Mapping[str, Array] | None = None
    reference_source: Literal["eval", "calibration", "health"] = "health"


def tensor_spec(info: TensorInfo) -> TensorSpec:
    quant = (Quantization(scale=list(info.scales), zero_point=list(info.zero_points),
                          axis=info.quantized_dimension) if info.quantized else None)
    return TensorSpec(name=info.name, shape=list(info.shape), dtype=info.dtype,
                      quantization=quant)


def package_model(model: Path, out: Path, spec: PackageSpec, key: SigningKey) -> Path:
    """Write a signed ``.efb`` for ``model`` (``.tflite`` or ``.onnx``) to ``out``."""
    return package_bytes(model.read_bytes(), model.suffix.lstrip(".").lower(), out, spec, key)


def package_bytes(model_bytes: bytes, fmt: str, out: Path, spec: PackageSpec,
                  key: SigningKey) -> Path:
    """Write a signed ``.efb`` for a ``tflite`` or ``onnx`` model held in memory."""
    runtime = load_runtime(model_bytes, fmt, memory_arena=False)  # large inputs: no arena
    health = _health(runtime, spec)
    manifest = Manifest(
        schema_version=PLAIN_SCHEMA_VERSION, name=spec.name, version=spec.version,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        format=fmt,
        runtime=RuntimeRequirement(name=RUNTIME_FOR_FORMAT[fmt],
                                   min_version=spec.min_runtime_version, opset=spec.opset),
        inputs=[tensor_spec(t) for t in runtime.inputs],
        outputs=[tensor_spec(t) for t in runtime.outputs],
        task=spec.task,
        optimization=spec.optimization, metrics=dict(spec.metrics),
        targets=list(spec.targets), files={}, lineage=spec.lineage)
    manifest = manifest.model_copy(update={"monitoring": _reference(runtime, spec, manifest)})
    files = {MODEL_FILES[fmt]: model_bytes, "health.npz": health.to_bytes()}
    if spec.labels:
        files[LABELS_FILE] = "\n".join(spec.labels).encode()
    with writing(out):  # a full disk or no permission: one line naming the path and cause
        return write_bundle(out, manifest, files, key, encrypt_for=spec.encrypt_for)


MAX_REFERENCE_ROWS = 5000


def _reference(runtime: Runtime, spec: PackageSpec, manifest: Manifest) -> Monitoring | None:
    """The drift reference: the inputs' and the model's outputs' statistics."""
    inputs = spec.health_inputs if spec.reference_inputs is None else spec.reference_inputs
    source = "health" if spec.reference_inputs is None else spec.reference_source
    if not inputs:
        return None
    feeds = {name: np.ascontiguousarray(value[:MAX_REFERENCE_ROWS])
             for name, value in inputs.items()}
    outputs = _run(runtime, feeds)
    scales = scales_of([*manifest.inputs, *manifest.outputs])
    return reference_from(feeds, outputs, classifier=spec.task == "classification",
                          source=source, scales=scales)


def _run(runtime: Runtime, feeds: dict[str, Array]) -> dict[str, Array]:
    """The model's outputs for ``feeds``, in calls of its fixed batch when it has one, else
    of as many rows as the converter's own calls hold (one call of 1,500 images at
    224x224 took 6.7 GB); a fixed batch's last partial call is left out."""
    fixed = fixed_batch(runtime.inputs)
    batch = fixed or batch_size(runtime.inputs, Dataset(feeds))
    rows = len(next(iter(feeds.values())))
    if rows <= batch:
        return runtime.run(feeds)
    end = rows - rows % batch if fixed else rows
    parts = [runtime.run({k: v[i:i + batch] for k, v in feeds.items()})
             for i in range(0, end, batch)]
    # a scalar output (one number a call) is one of shape [1] a call
    return {name: np.concatenate([np.atleast_1d(p[name]) for p in parts]) for name in parts[0]}


def _health(runtime: Runtime, spec: PackageSpec) -> HealthData:
    # the device runs its health check in one call: as many rows as the model takes
    batch = fixed_batch(runtime.inputs)
    inputs = {name: np.ascontiguousarray(value if batch is None else value[:batch])
              for name, value in spec.health_inputs.items()}
    outputs = runtime.run(inputs)
    return HealthData(inputs, {k: np.asarray(v) for k, v in outputs.items()},
                      atol=spec.atol, rtol=spec.rtol)
