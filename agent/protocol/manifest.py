"""The bundle manifest (``manifest.json``), schema versions 1 and 2.

Version 1 is every plain bundle; the optional ``lineage`` section is additive, so
older readers ignore it. Version 2 is written only for bundles whose model is
encrypted (an ``encryption`` section and ``model.<format>.enc`` instead of the plain
model): a reader that predates encryption refuses it by its schema version, with a
reason, instead of failing on a missing model file.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.agent.protocol.drift import Monitoring
from edgefleet.agent.protocol.errors import BundleFormatError
from edgefleet.agent.protocol.schema import (
    NAME_PATTERN,
    SEMVER_PATTERN,
    SHA256_PATTERN,
    Document,
    decode_json,
    validate_document,
)

__all__ = [
    "ENCRYPTED_SCHEMA_VERSION",
    "MODEL_FILES",
    "PLAIN_SCHEMA_VERSION",
    "DataRef",
    "Encryption",
    "FileEntry",
    "Lineage",
    "Manifest",
    "Optimization",
    "Quantization",
    "Recipient",
    "RuntimeRequirement",
    "SourceRef",
    "TensorSpec",
    "parse_manifest",
]

ModelFormat = Literal["tflite", "onnx"]
MODEL_FILES: dict[str, str] = {"tflite": "model.tflite", "onnx": "model.onnx"}
ENCRYPTED_SUFFIX = ".enc"
HEALTH_FILE = "health.npz"
LABELS_FILE = "labels.txt"
PLAIN_SCHEMA_VERSION = 1
ENCRYPTED_SCHEMA_VERSION = 2


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


class SourceRef(_Frozen):
    """The model a bundle was converted from: a file's sha256, or a folder's tree hash."""

    path: str
    kind: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)


class DataRef(_Frozen):
    """Data a conversion read (calibration, evaluation, fine-tuning), by content hash."""

    path: str
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)
    files: int = Field(default=1, ge=0)


class Lineage(_Frozen):
    """Where a bundle came from: enough to reproduce it, or to tell two builds apart."""

    source: SourceRef
    tool: str = "edgefleet"
    tool_version: str
    config: dict[str, Any]
    calibration: DataRef | None = None
    eval: DataRef | None = None
    fine_tune: DataRef | None = None
    libraries: dict[str, str] = Field(default_factory=dict)
    host: str | None = None


class Recipient(_Frozen):
    """The data key wrapped for one X25519 public key (see ``agent.protocol.encryption``)."""

    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    ephemeral_key: str
    nonce: str
    wrapped_key: str


class Encryption(_Frozen):
    """How the model file is encrypted; the signature over the manifest covers all of it."""

    algorithm: Literal["AES-256-GCM"] = "AES-256-GCM"
    key_wrap: Literal["X25519-HKDF-SHA256-AES-256-GCM"] = "X25519-HKDF-SHA256-AES-256-GCM"
    nonce: str
    plain_sha256: str = Field(pattern=SHA256_PATTERN)
    plain_size: int = Field(ge=0)
    recipients: list[Recipient] = Field(min_length=1)

    @property
    def key_ids(self) -> list[str]:
        return [r.key_id for r in self.recipients]


class Manifest(Document):
    """What a bundle holds, signed as exact bytes in ``manifest.sig``."""

    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset(
        {PLAIN_SCHEMA_VERSION, ENCRYPTED_SCHEMA_VERSION})

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
    lineage: Lineage | None = None
    encryption: Encryption | None = None
    monitoring: Monitoring | None = None  # drift reference (agent.protocol.drift)

    @model_validator(mode="after")
    def _encryption_needs_version_2(self) -> Manifest:
        if self.encryption is not None and self.schema_version < ENCRYPTED_SCHEMA_VERSION:
            raise ValueError(f"an encrypted model needs schema_version "
                             f"{ENCRYPTED_SCHEMA_VERSION}, got {self.schema_version}")
        return self

    @property
    def model_file(self) -> str:
        """The model's member name in the archive (the ciphertext when encrypted)."""
        plain = MODEL_FILES[self.format]
        return plain + ENCRYPTED_SUFFIX if self.encryption is not None else plain

    @property
    def plain_model_file(self) -> str:
        return MODEL_FILES[self.format]

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    @property
    def model_size(self) -> int:
        """Bytes of the model as a runtime loads it (the plain model when encrypted)."""
        if self.encryption is not None:
            return self.encryption.plain_size
        entry = self.files.get(self.model_file)
        return entry.size if entry is not None else 0

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed and stored as ``manifest.json``."""
        absent = {k for k in ("lineage", "encryption") if getattr(self, k) is None}
        data = self.model_dump(mode="json", exclude=absent)  # plain v1 bytes stay as they were
        return json.dumps(data, sort_keys=True, indent=1).encode()


def parse_manifest(raw: bytes) -> Manifest:
    data = decode_json(raw, "manifest.json", BundleFormatError)
    return validate_document(Manifest, data, "manifest.json", BundleFormatError)
