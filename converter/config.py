"""The conversion config: one frozen, typed object instead of a dict of string options."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgefleet.agent.protocol.schema import NAME_PATTERN, SEMVER_PATTERN
from edgefleet.converter.search import DEFAULT_SEARCH_SECONDS

__all__ = ["CALIBRATION_METHODS", "DEFAULT_MAX_DROP", "INT8_IO_MODES", "QUANTIZE_MODES", "SCALES",
           "TFLITE_SOURCE_ONLY", "ConvertConfig", "Format", "Quantize", "Scale"]

Format = Literal["tflite", "onnx"]
Quantize = Literal["none", "fp16", "dynamic", "weight-only", "int8", "int8-a16", "auto"]
Scale = Literal["0-1", "-1-1", "0-255"]
SCALES: tuple[Scale, ...] = ("0-1", "-1-1", "0-255")
DEFAULT_MAX_DROP = 1.0  # points: accuracy with labels, else 100 x (1 - worst output score)
QUANTIZE_MODES: tuple[Quantize, ...] = ("none", "fp16", "dynamic", "weight-only", "int8",
                                        "int8-a16", "auto")
TFLITE_SOURCE_ONLY = ("weight-only", "int8-a16")  # ai-edge-quantizer recipes
INT8_IO_MODES: tuple[Quantize, ...] = ("int8", "auto")  # the modes --int8-io acts on
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
MAX_DIM = 8192  # --input-shape: the largest dim
MAX_SIDE = 4096  # --input-size: the largest height or width
# the most numbers one input may hold a call (channels and a fixed batch counted): 64 MiB of
# float32; an image is decoded, resized and held at several precisions on the way, and a
# 5000x5000 RGB image (75 M numbers) reached 23 GB of memory
MAX_INPUT_NUMBERS = 1 << 24


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
    calibration_method: str = "minmax"  # ONNX int8: minmax, percentile or entropy
    activations: str = "uint8"  # ONNX int8 activations: uint8 or int8
    search_budget: float = DEFAULT_SEARCH_SECONDS  # seconds --quantize auto may search
    # NAME -> fixed shape for inputs with dynamic dims; input_size fixes H x W of one image input
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    input_size: tuple[int, int] | None = None
    # NAME -> "class" or "regression": overrides the rule that tells them apart
    output_kinds: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        if self.format not in ("tflite", "onnx"):
            raise ValueError(f"format must be tflite or onnx, got {self.format!r}")
        if self.prune is not None and not 0.0 < self.prune < 1.0:
            raise ValueError(f"prune sparsity must be between 0 and 1, got {self.prune}")
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and
                                              0 <= self.max_drop <= 100):
            raise ValueError("max_drop is in accuracy points: a number from 0 to 100")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}")
        if self.int8_io and self.format == "onnx":
            raise ValueError("--int8-io makes a TFLite model's inputs and outputs int8; the "
                             "ONNX path keeps them float32: drop --int8-io, or use "
                             "--format tflite")
        if self.int8_io and self.quantize not in INT8_IO_MODES:
            raise ValueError(f"--int8-io makes the inputs and outputs of a full-integer model "
                             f"int8; --quantize {self.quantize} keeps them float: use "
                             "--quantize int8 (or auto, which says when its choice keeps "
                             "them float), or drop --int8-io")
        if self.activations not in ("uint8", "int8"):
            raise ValueError("activations must be uint8 or int8")
        if not (math.isfinite(self.search_budget) and self.search_budget > 0):
            raise ValueError("search budget must be a positive number of seconds")
        if any(d < 1 for _, shape in self.input_shapes for d in shape) or \
                any(d < 1 for d in self.input_size or ()):
            raise ValueError("input shapes and sizes are positive integers")
        _check_bounds(self.input_shapes, self.input_size)
        if self.input_shapes and self.input_size is not None:
            raise ValueError("--input-shape and --input-size both given: use one "
                             "(--input-size HEIGHTxWIDTH for a model of one image input, "
                             "--input-shape NAME=DIMS for each input otherwise)")
        if any(kind not in ("class", "regression") for _, kind in self.output_kinds):
            raise ValueError("an output kind is class or regression")
        if self.calibration_samples < 1:
            raise ValueError("calibration_samples must be at least 1")
        if self.name is not None and not re.match(NAME_PATTERN, self.name):
            raise ValueError(f"the bundle name {self.name[:80]!r} is not allowed: 1-64 letters, "
                             "digits, '.', '_' or '-', starting with a letter or digit "
                             "(--name)")
        if not re.match(SEMVER_PATTERN, self.version):
            raise ValueError(f"the version {self.version[:80]!r} is not a semantic version "
                             "such as 1.2.0 (--version)")

    @property
    def budget_points(self) -> float:
        """``max_drop``, or :data:`DEFAULT_MAX_DROP` when none was given."""
        return DEFAULT_MAX_DROP if self.max_drop is None else self.max_drop

    @property
    def model_name(self) -> str:
        """``--name``, else the file's stem made a bundle name ("tiny model.keras" ->
        "tiny-model")."""
        if self.name:
            return self.name
        stem = re.sub(r"[^a-z0-9.-]+", "-", self.model.stem.replace("_", "-").lower())
        return stem.strip(".-")[:64].rstrip(".-") or "model"


def _check_bounds(shapes: tuple[tuple[str, tuple[int, ...]], ...],
                  size: tuple[int, int] | None) -> None:
    """A fixed input shape within :data:`MAX_DIM` a dim and :data:`MAX_INPUT_NUMBERS` in all:
    calibration and evaluation hold a couple of hundred of them in memory."""
    given = [(f"--input-shape {name}", dims) for name, dims in shapes] + \
        ([("--input-size", size)] if size is not None else [])
    for option, dims in given:
        text = "x".join(map(str, dims))
        if option == "--input-size" and any(d > MAX_SIDE for d in dims):
            raise ValueError(f"{option}={text}: a side above {MAX_SIDE} is not taken")
        if any(d > MAX_DIM for d in dims):
            raise ValueError(f"{option}={text}: a dim above {MAX_DIM} is not taken")
        if math.prod(dims) > MAX_INPUT_NUMBERS:
            raise ValueError(f"{option}={text}: {math.prod(dims):,} numbers an input, above "
                             f"the {MAX_INPUT_NUMBERS:,} taken")
