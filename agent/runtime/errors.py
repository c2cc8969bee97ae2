"""Errors of the runtimes: a model that cannot be loaded here, or a request it cannot run
(the whole tree is drawn in docs/architecture.md, "Error tree")."""

from __future__ import annotations

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["IncompatibleModelError", "InferenceError", "MissingRuntimeError", "ModelClosedError",
           "RuntimeLoadError", "closed_error"]


class RuntimeLoadError(EdgefleetError):
    """No runtime on this device can load the model."""


class MissingRuntimeError(RuntimeLoadError):
    """The runtime for this model format is not installed."""


class IncompatibleModelError(RuntimeLoadError):
    """The model needs a newer runtime (or op versions) than this device has."""


class InferenceError(EdgefleetError):
    """A request the model cannot run: wrong inputs, or a runtime failure."""


class ModelClosedError(InferenceError):
    """A request to a runtime that was closed (its model unloaded)."""


def closed_error(runtime: str) -> ModelClosedError:
    return ModelClosedError(
        f"the model on {runtime} was closed (unloaded) and answers no more requests",
        hint="run the request on the model loaded now (Agent.predict serves the active one), "
             "or load the bundle again")
