"""Runtime errors of the agent (a branch of the tree in ``agent.protocol.errors``)::

    EdgefleetError
    └── RuntimeLoadError            the model cannot be loaded by any runtime here
        ├── MissingRuntimeError     no runtime for this format is installed
        └── IncompatibleModelError  the installed runtime is older than the model needs
    └── InferenceError              inputs do not fit the model, or the runtime failed
"""

from __future__ import annotations

from agent.protocol.errors import EdgefleetError

__all__ = ["IncompatibleModelError", "InferenceError", "MissingRuntimeError", "RuntimeLoadError"]


class RuntimeLoadError(EdgefleetError):
    """No runtime on this device can load the model."""


class MissingRuntimeError(RuntimeLoadError):
    """The runtime for this model format is not installed."""


class IncompatibleModelError(RuntimeLoadError):
    """The model needs a newer runtime (or op versions) than this device has."""


class InferenceError(EdgefleetError):
    """A request the model cannot run: wrong inputs, or a runtime failure."""
