"""``.tflite`` models on LiteRT (``ai-edge-litert``), or on ``tflite-runtime`` as a fallback.

Both expose the same interpreter API. A model with a fixed batch of 1 still
answers a batch of N: rows are run one after another.

``run_array`` is the serving path for the commonest request, one array for a
one-input model at the batch the interpreter is sized for: a closure made once,
with the interpreter's methods and tensor indices bound, so a request costs a
lock and the three interpreter calls. Any other request goes through ``run``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgefleet.agent.runtime._stderr import native_banners_to_log
from edgefleet.agent.runtime.base import Array, ClosedEngine, TensorInfo, refusal
from edgefleet.agent.runtime.errors import RuntimeLoadError, closed_error

__all__ = ["TFLiteRuntime"]

log = logging.getLogger(__name__)


class TFLiteRuntime:
    """A TFLite interpreter behind a lock (interpreters are not thread-safe)."""

    def __init__(self, interpreter_cls: Any, name: str, version: str,
                 model: bytes, threads: int) -> None:
        self.name, self.version, self.threads = name, version, threads
        self._interp: Any
        try:
            with native_banners_to_log(log):  # the XNNPACK "INFO: Created ..." line
                self._interp = interpreter_cls(model_content=model, num_threads=threads)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeLoadError(f"{name} {version} cannot load the model: {exc}".strip(),
                                   hint="convert the model for this runtime version") from exc
        self._lock = threading.Lock()
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self._inputs = [_info(d) for d in self._in]
        self._outputs = [_info(d) for d in self._out]
        self._in_index = {d["name"]: d["index"] for d in self._in}
        self._out_index = [(d["name"], d["index"]) for d in self._out]
        first = self._in[0]["shape"]
        self._rows = int(first[0]) if len(first) else 1
        self._dynamic = any(-1 in d.get("shape_signature", d["shape"])[:1] for d in self._in)
        self.run_array, self._retarget = self._fast_path()

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        first = next(iter(feeds.values()))
        rows = first.shape[0] if first.ndim else 1
        with self._lock:
            if rows == self._rows:
                return self._invoke(feeds)
            if self._dynamic:
                self._resize(feeds, rows)
                return self._invoke(feeds)
        if isinstance(self._interp, ClosedEngine):
            raise closed_error(self.name)
        if self._rows != 1:
            raise ValueError(f"model takes a batch of exactly {self._rows}, got {rows}")
        parts = [self.run({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(rows)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _invoke(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        interp, index = self._interp, self._in_index
        for name, value in feeds.items():
            interp.set_tensor(index[name], value)
        interp.invoke()
        out = {}
        for name, i in self._out_index:  # a plain loop: cheaper than a comprehension here
            out[name] = interp.get_tensor(i)
        return out

    def _resize(self, feeds: Mapping[str, Array], rows: int) -> None:
        for name, value in feeds.items():
            self._interp.resize_tensor_input(self._in_index[name], list(value.shape))
        self._interp.allocate_tensors()
        self._rows = rows
        self._retarget(rows)

    def close(self) -> None:
        """Let the interpreter go; every later request raises ``ModelClosedError``."""
        with self._lock:
            self._interp = ClosedEngine(self.name)
            self._retarget(None)

    def _fast_path(self) -> tuple[Callable[[Array], dict[str, Array]],
                                  Callable[[int | None], None]]:
        """``run_array``, and how to point it at a new batch size (None: closed, which also
        drops its references to the interpreter)."""
        general, name, refuse = self.run, self._in[0]["name"], refusal(self.name)

        def slow(x: Array) -> dict[str, Array]:
            return general({name: x})

        if len(self._in) != 1 or len(self._in[0]["shape"]) == 0:
            return slow, lambda rows: None
        interp, index, outputs = self._interp, self._in[0]["index"], self._out_index
        set_tensor, invoke, get_tensor = interp.set_tensor, interp.invoke, interp.get_tensor
        acquire, release = self._lock.acquire, self._lock.release
        fast_rows: int = self._rows
        (out_name, out_index), *more = outputs

        def run_array(x: Array) -> dict[str, Array]:
            acquire()
            try:
                if len(x) == fast_rows:
                    set_tensor(index, x)
                    invoke()
                    if more:
                        return {n: get_tensor(i) for n, i in outputs}
                    return {out_name: get_tensor(out_index)}
            finally:
                release()
            return general({name: x})

        def retarget(rows: int | None) -> None:
            nonlocal fast_rows, set_tensor, invoke, get_tensor
            if rows is None:
                fast_rows, set_tensor, invoke, get_tensor = -1, refuse, refuse, refuse
            else:
                fast_rows = rows

        return run_array, retarget


def _info(detail: dict[str, Any]) -> TensorInfo:
    shape = detail.get("shape_signature", detail["shape"])
    params = detail.get("quantization_parameters", {})
    scales = tuple(float(s) for s in params.get("scales", ()))
    zeros = tuple(int(z) for z in params.get("zero_points", ()))
    return TensorInfo(name=detail["name"], shape=tuple(int(d) for d in shape),
                      dtype=np.dtype(detail["dtype"]).name, scales=scales, zero_points=zeros,
                      quantized_dimension=int(params.get("quantized_dimension", 0)))
