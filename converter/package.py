"""Package a model file into a signed bundle: describe its tensors, record health vectors."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.bundle import write_bundle
from agent.protocol.health import HealthData
from agent.protocol.manifest import (
    LABELS_FILE,
    MODEL_FILES,
    Manifest,
    Optimization,
    Quantization,
    RuntimeRequirement,
    TensorSpec,
)
from agent.protocol.signing import SigningKey
from agent.runtime.base import Array, Runtime, TensorInfo
from agent.runtime.select import load_runtime

__all__ = ["PackageSpec", "package_model", "tensor_spec"]

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
    atol: float = 1e-4
    rtol: float = 1e-3


def tensor_spec(info: TensorInfo) -> TensorSpec:
    quant = (Quantization(scale=list(info.scales), zero_point=list(info.zero_points),
                          axis=info.quantized_dimension) if info.quantized else None)
    return TensorSpec(name=info.name, shape=list(info.shape), dtype=info.dtype,
                      quantization=quant)


def package_model(model: Path, out: Path, spec: PackageSpec, key: SigningKey) -> Path:
    """Write a signed ``.efb`` for ``model`` (``.tflite`` or ``.onnx``) to ``out``."""
    fmt = model.suffix.lstrip(".").lower()
    model_bytes = model.read_bytes()
    runtime = load_runtime(model_bytes, fmt)
    health = _health(runtime, spec)
    manifest = Manifest(
        schema_version=1, name=spec.name, version=spec.version,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        format=fmt,
        runtime=RuntimeRequirement(name=RUNTIME_FOR_FORMAT[fmt],
                                   min_version=spec.min_runtime_version),
        inputs=[tensor_spec(t) for t in runtime.inputs],
        outputs=[tensor_spec(t) for t in runtime.outputs],
        task=spec.task,
        optimization=spec.optimization, metrics=dict(spec.metrics),
        targets=list(spec.targets), files={})
    files = {MODEL_FILES[fmt]: model_bytes, "health.npz": health.to_bytes()}
    if spec.labels:
        files[LABELS_FILE] = "\n".join(spec.labels).encode()
    return write_bundle(out, manifest, files, key)


def _health(runtime: Runtime, spec: PackageSpec) -> HealthData:
    inputs = {name: np.ascontiguousarray(value) for name, value in spec.health_inputs.items()}
    outputs = runtime.run(inputs)
    return HealthData(inputs, {k: np.asarray(v) for k, v in outputs.items()},
                      atol=spec.atol, rtol=spec.rtol)
