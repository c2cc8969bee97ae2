"""``.onnx`` models on ONNX Runtime (CPU execution provider).

``run_array`` is the serving path for one array fed to a one-input model: a
closure with the session's ``run``, the input name and the output names bound. For a
one-input model on the CPU provider it binds the compiled session's ``run`` and skips
the Python wrapper's per-call checks, none of which can fail there (the one input is
always fed, a NumPy array is never another session's ``OrtValue``, the CPU provider has
nothing to fall back to): 1.7-1.9 µs a call, an eighth of the 8x8 digits model's time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgefleet.agent.runtime.base import Array, ClosedEngine, TensorInfo, refusal
from edgefleet.agent.runtime.errors import RuntimeLoadError

__all__ = ["OnnxRuntime", "load_hint"]

# ONNX Runtime's words for a model of an opset, IR or operator version it does not load
_VERSIONS = re.compile(r"opset|IR version|only \*guarantees\* support|"
                       r"not supported.{0,80}version|version.{0,80}not supported",
                       re.IGNORECASE)
_EXTERNAL = re.compile(r"external data|model_path must not be empty|ExternalData",
                       re.IGNORECASE)
_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(bool)": "bool", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
}


class OnnxRuntime:
    """An ONNX Runtime session; sessions are safe to run from many threads."""

    def __init__(self, ort: Any, model: bytes, threads: int, *,
                 memory_arena: bool = True) -> None:
        self.name, self.version, self.threads = "onnxruntime", str(ort.__version__), threads
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = memory_arena
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session: Any
        try:
            self._session = ort.InferenceSession(model, sess_options=options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise RuntimeLoadError(f"onnxruntime {self.version} cannot load the model: {exc}",
                                   hint=load_hint(str(exc))) from exc
        self._inputs = [_info(a) for a in self._session.get_inputs()]
        self._outputs = [_info(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]
        self.run_array, self._forget = self._fast_path()

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        values = self._session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        """Let the session go; every later request raises ``ModelClosedError``."""
        self._session = ClosedEngine(self.name)
        self._forget()

    def _fast_path(self) -> tuple[Callable[[Array], dict[str, Array]], Callable[[], None]]:
        """``run_array``, and how to make it drop the session when the runtime is closed."""
        general, name, names = self.run, self._inputs[0].name, self._output_names
        session_run, refuse = _checked_run(self._session, len(self._inputs)), refusal(self.name)
        single = names[0] if len(names) == 1 else None

        def run_array(x: Array) -> dict[str, Array]:
            if single is not None:
                return {single: session_run(names, {name: x}, None)[0]}
            return general({name: x})

        def forget() -> None:
            nonlocal session_run, single
            session_run, single = refuse, None

        return run_array, forget


def load_hint(text: str) -> str:
    """The fix for ONNX Runtime's refusal ``text``: another opset only when ONNX Runtime
    speaks of an opset or version; otherwise what it said (its first line) and the fix
    that fits."""
    if _VERSIONS.search(text):
        return "re-export the model with an opset this runtime supports"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    said = _ORT_PREFIX.sub("", lines[0])[:200] if lines else "nothing"
    if _EXTERNAL.search(text):
        return (f"ONNX Runtime says: {said}; the model keeps its weights in external data "
                "files: load it from its own folder, next to them, or save it again with "
                "the weights inside")
    return (f"ONNX Runtime says: {said}; check the model with onnx.checker.check_model "
            "with full_check=True, and export it again")


def _checked_run(session: Any, inputs: int) -> Callable[..., Any]:
    """``run(output_names, feeds, run_options)`` for ``run_array``: the compiled session's
    own for a one-input model, else (or where a version keeps it elsewhere) the public
    one."""
    compiled = getattr(getattr(session, "_sess", None), "run", None)
    if inputs == 1 and callable(compiled):
        return compiled  # type: ignore[no-any-return]
    return session.run  # type: ignore[no-any-return]


def _info(arg: Any) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    dtype = _ORT_TYPES.get(arg.type, "float32")
    return TensorInfo(name=arg.name, shape=shape, dtype=np.dtype(dtype).name)
