"""The bundle manifest (``manifest.json``), schema version 1."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.protocol.errors import BundleFormatError
from agent.protocol.schema import (
    NAME_PATTERN,
    SEMVER_PATTERN,
    SHA256_PATTERN,
    Document,
    decode_json,
    validate_document,
)

__all__ = [
    "MODEL_FILES",
    "FileEntry",
    "Manifest",
    "Optimization",
    "Quantization",
    "RuntimeRequirement",
    "TensorSpec",
    "parse_manifest",
]

ModelFormat = Literal["tflite", "onnx"]
MODEL_FILES: dict[str, str] = {"tflite": "model.tflite", "onnx": "model.onnx"}
HEALTH_FILE = "health.npz"
LABELS_FILE = "labels.txt"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Quantization(_Frozen):
    """Affine quantization of a tensor: real = scale * (q - zero_point)."""

    scale: list[float]
    zero_point: list[int]
    axis: int = 0


class TensorSpec(_Frozen):
    """One model input or output; ``-1`` in ``shape`` marks a dynamic dimension."""

    name: str
    shape: list[int]
    dtype: str
    quantization: Quantization | None = None


class RuntimeRequirement(_Frozen):
    """The runtime a model needs and the oldest version that loads its op versions."""

    name: Literal["litert", "onnxruntime"]
    min_version: str = "0"
    opset: int | None = None
    ops: list[str] = Field(default_factory=list)


class FileEntry(_Frozen):
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)


class Optimization(_Frozen):
    quantization: str = "none"
    sparsity: float = Field(default=0.0, ge=0.0, le=1.0)


class Manifest(Document):
    """What a bundle holds, signed as exact bytes in ``manifest.sig``."""

    schema_version: int
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    created: str
    format: ModelFormat
    runtime: RuntimeRequirement
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    task: Literal["classification", "regression", "detection", "other"] = "other"
    optimization: Optimization = Field(default_factory=Optimization)
    metrics: dict[str, Any] = Field(default_factory=dict)
    targets: list[str] = Field(default_factory=list)
    files: dict[str, FileEntry]

    @property
    def model_file(self) -> str:
        return MODEL_FILES[self.format]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed and stored as ``manifest.json``."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode()


def parse_manifest(raw: bytes) -> Manifest:
    data = decode_json(raw, "manifest.json", BundleFormatError)
    return validate_document(Manifest, data, "manifest.json", BundleFormatError)
