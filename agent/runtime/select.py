"""Pick and load the runtime that fits a model.

``.tflite``: LiteRT (``ai-edge-litert``) first; ``tflite-runtime`` only as a
fallback, when it is installed and actually loads the model. ``.onnx``: ONNX
Runtime. Runtime packages are imported lazily so a device needs only the one
it uses.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from importlib import metadata
from typing import Any

from edgefleet.agent.runtime.base import Runtime
from edgefleet.agent.runtime.errors import (
    IncompatibleModelError,
    MissingRuntimeError,
    RuntimeLoadError,
)
from edgefleet.agent.runtime.onnx import OnnxRuntime
from edgefleet.agent.runtime.tflite import TFLiteRuntime

__all__ = ["RUNTIMES_BY_FORMAT", "installed_runtimes", "load_runtime", "tflite_op_level",
           "version_tuple"]

# runtime name -> (module to import, distribution name)
_MODULES = {
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime.interpreter", "tflite-runtime"),
    "onnxruntime": ("onnxruntime", "onnxruntime"),
}
RUNTIMES_BY_FORMAT = {"tflite": ["litert", "tflite-runtime"], "onnx": ["onnxruntime"]}
_INSTALL_HINT = {"tflite": "pip install 'edgefleet[agent]' (brings ai-edge-litert)",
                 "onnx": "pip install 'edgefleet[agent]' (brings onnxruntime)"}


# ai-edge-litert release -> the TensorFlow release whose TFLite op versions it loads.
# A TFLite model's min_runtime_version (written by the converter) is in TF numbering.
_LITERT_OP_LEVEL: dict[tuple[int, ...], str] = {
    (1, 0): "2.18.0", (1, 1): "2.18.0", (1, 2): "2.19.0", (1, 3): "2.20.0", (1, 4): "2.20.0",
    (2, 0): "2.21.0", (2, 1): "2.21.0", (2, 2): "2.21.0", (2, 3): "2.21.0"}


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def tflite_op_level(runtime: str, version: str) -> str:
    """The TensorFlow release whose TFLite op versions ``runtime`` loads."""
    if runtime != "litert":
        return version  # tflite-runtime and TensorFlow share numbering
    key = version_tuple(version)[:2]
    known = sorted(_LITERT_OP_LEVEL)
    if key > known[-1]:
        return _LITERT_OP_LEVEL[known[-1]]
    return _LITERT_OP_LEVEL.get(key, "2.17.0")


def installed_runtimes() -> dict[str, str]:
    """Runtime name -> installed version, for the reported state."""
    found = {}
    for name, (_, dist) in _MODULES.items():
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def load_runtime(model: bytes, fmt: str, *, threads: int = 1,
                 required: str | None = None, min_version: str = "0",
                 memory_arena: bool = True) -> Runtime:
    """Load ``model`` on the first runtime for ``fmt`` that is installed, recent enough and able.

    ``required``/``min_version`` come from the manifest: the runtime it was
    checked against and the oldest version of it that loads its op versions.
    ``memory_arena=False``: ONNX Runtime frees each call's buffers instead of keeping the
    largest in an arena that grows in powers of two (the converter, whose calls at large
    inputs kept several GB; a device serves one shape and keeps the arena).
    """
    candidates = RUNTIMES_BY_FORMAT.get(fmt)
    if candidates is None:
        raise RuntimeLoadError(f"unknown model format {fmt!r}", hint="use tflite or onnx")
    failures: list[str] = []
    for name in candidates:
        try:
            return _try_load(name, model, threads, required, min_version, memory_arena)
        except (MissingRuntimeError, RuntimeLoadError) as exc:
            failures.append(str(exc))
    if all(f.startswith("not installed") for f in failures):
        raise MissingRuntimeError(f"no runtime for .{fmt} models is installed",
                                  hint=_INSTALL_HINT[fmt])
    incompatible = [f for f in failures if "needs" in f]
    error = IncompatibleModelError if incompatible else RuntimeLoadError
    raise error("; ".join(f for f in failures if not f.startswith("not installed")),
                hint="convert the model for this device's runtime, or upgrade the runtime")


def _try_load(name: str, model: bytes, threads: int,
              required: str | None, min_version: str, memory_arena: bool = True) -> Runtime:
    module_name, dist = _MODULES[name]
    module = _import(module_name)
    if module is None:
        raise MissingRuntimeError(f"not installed: {dist}")
    version = metadata.version(dist)
    _check_level(name, version, required, min_version, model)
    factory = _FACTORIES[name]
    return factory(module, version, model, threads, memory_arena)


def _check_level(name: str, version: str, required: str | None, min_version: str,
                 model: bytes) -> None:
    if name in ("litert", "tflite-runtime") and required in ("litert", "tflite-runtime"):
        level = tflite_op_level(name, version)
        if version_tuple(level) < version_tuple(min_version):
            raise IncompatibleModelError(
                f"{name} {version} loads TFLite ops up to TF {level}, the model needs "
                f"TF >= {min_version} ({_newer_ops(model)})")
    elif name == required and version_tuple(version) < version_tuple(min_version):
        raise IncompatibleModelError(f"{name} {version} is too old: the model needs {name} "
                                     f">= {min_version}")


def _newer_ops(model: bytes) -> str:
    from edgefleet.agent.runtime.inspect import inspect_model

    try:
        ops = inspect_model(model, "tflite").ops
    except RuntimeLoadError:
        return "ops unreadable"
    versioned = [f"{op} v{v}" for op, v in sorted(ops.items(), key=lambda kv: -kv[1]) if v > 1]
    return "ops above version 1: " + (", ".join(versioned[:6]) or "none")


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def _litert(module: Any, version: str, model: bytes, threads: int, arena: bool) -> Runtime:
    return TFLiteRuntime(module.Interpreter, "litert", version, model, threads)


def _tflite_runtime(module: Any, version: str, model: bytes, threads: int,
                   arena: bool) -> Runtime:
    return TFLiteRuntime(module.Interpreter, "tflite-runtime", version, model, threads)


def _onnxruntime(module: Any, version: str, model: bytes, threads: int,
                 arena: bool) -> Runtime:
    return OnnxRuntime(module, model, threads, memory_arena=arena)


_FACTORIES: dict[str, Callable[[Any, str, bytes, int, bool], Runtime]] = {
    "litert": _litert, "tflite-runtime": _tflite_runtime, "onnxruntime": _onnxruntime,
}
