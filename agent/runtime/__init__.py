"""One small interface over LiteRT, ONNX Runtime and tflite-runtime."""

from agent.runtime.base import Runtime, TensorInfo, check_feeds
from agent.runtime.errors import (
    IncompatibleModelError,
    InferenceError,
    MissingRuntimeError,
    ModelClosedError,
    RuntimeLoadError,
)
from agent.runtime.select import installed_runtimes, load_runtime

__all__ = [
    "IncompatibleModelError",
    "InferenceError",
    "MissingRuntimeError",
    "ModelClosedError",
    "Runtime",
    "RuntimeLoadError",
    "TensorInfo",
    "check_feeds",
    "installed_runtimes",
    "load_runtime",
]
