"""One small interface over LiteRT, ONNX Runtime and tflite-runtime."""

from edgefleet.agent.runtime.base import Runtime, TensorInfo, check_feeds
from edgefleet.agent.runtime.errors import (
    IncompatibleModelError,
    InferenceError,
    MissingRuntimeError,
    ModelClosedError,
    RuntimeLoadError,
)
from edgefleet.agent.runtime.select import installed_runtimes, load_runtime

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
