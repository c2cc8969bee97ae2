"""The conversion config: one frozen, typed object instead of a dict of string options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["QUANTIZE_MODES", "ConvertConfig", "Format", "Quantize", "Scale"]

Format = Literal["tflite", "onnx"]
Quantize = Literal["none", "fp16", "dynamic", "int8", "auto"]
Scale = Literal["0-1", "-1-1", "0-255"]
QUANTIZE_MODES: tuple[Quantize, ...] = ("none", "fp16", "dynamic", "int8", "auto")


@dataclass(frozen=True)
class ConvertConfig:
    """Everything ``edgefleet convert`` takes; validated once, on construction."""

    model: Path
    output: Path
    sign_key: Path
    format: Format = "tflite"
    quantize: Quantize = "none"
    calibration: Path | None = None
    eval: Path | None = None
    prune: float | None = None
    fine_tune_data: Path | None = None
    fine_tune_epochs: int = 4
    targets: tuple[str, ...] = ()
    max_drop: float | None = None
    name: str | None = None
    version: str = "1.0.0"
    scale: Scale = "0-1"
    calibration_samples: int = 200
    int8_io: bool = False
    quiet: bool = False
    encrypt_for: tuple[Path, ...] = ()  # X25519 public keys (NAME.x25519pub) to encrypt for
    record_host: bool = True  # the build host's name in the bundle's lineage

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        if self.format not in ("tflite", "onnx"):
            raise ValueError(f"format must be tflite or onnx, got {self.format!r}")
        if self.prune is not None and not 0.0 < self.prune < 1.0:
            raise ValueError(f"prune sparsity must be between 0 and 1, got {self.prune}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError("max_drop is in accuracy points and cannot be negative")
        if self.calibration_samples < 1:
            raise ValueError("calibration_samples must be at least 1")

    @property
    def model_name(self) -> str:
        return self.name or self.model.stem.replace("_", "-").lower()
