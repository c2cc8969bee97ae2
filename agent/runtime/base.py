"""The runtime interface: load a model, describe its tensors, run inference."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgefleet.agent.runtime.errors import closed_error

__all__ = ["Array", "ClosedEngine", "Runtime", "TensorInfo", "check_feeds", "refusal"]

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (``-1`` for a dynamic dimension), dtype and affine quantization."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scales: tuple[float, ...] = ()
    zero_points: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def quantized(self) -> bool:
        return bool(self.scales)


class Runtime(Protocol):
    """One loaded model in one inference engine. ``run`` is safe to call from many threads."""

    name: str
    version: str
    threads: int

    @property
    def inputs(self) -> list[TensorInfo]: ...

    @property
    def outputs(self) -> list[TensorInfo]: ...

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]: ...

    def run_array(self, x: Array) -> dict[str, Array]:
        """``run({first input: x})``, on the cheapest path the runtime has for it."""
        ...

    def close(self) -> None: ...


class ClosedEngine:
    """Stands in for a closed runtime's engine: any use raises ``ModelClosedError``, so
    a closed runtime refuses requests without a check on the open path."""

    def __init__(self, runtime: str) -> None:
        self._runtime = runtime

    def __getattr__(self, name: str) -> Any:
        raise closed_error(self._runtime)


def refusal(runtime: str) -> Callable[..., Any]:
    """A callable to bind in a closed runtime's fast path in place of an engine method."""

    def refuse(*_: Any) -> Any:
        raise closed_error(runtime)

    return refuse


def check_feeds(specs: list[TensorInfo], feeds: Mapping[str, Array]) -> list[str]:
    """Problems with ``feeds`` against ``specs``: missing, unexpected, dtype, rank or shape."""
    problems = []
    names = {spec.name for spec in specs}
    problems += [f"unexpected input {name!r} (model inputs: {sorted(names)})"
                 for name in feeds if name not in names]
    for spec in specs:
        value = feeds.get(spec.name)
        if value is None:
            problems.append(f"missing input {spec.name!r}")
        elif value.dtype != np.dtype(spec.dtype):
            problems.append(f"input {spec.name!r}: dtype {value.dtype}, model expects {spec.dtype}")
        elif not _shape_fits(spec.shape, value.shape):
            problems.append(f"input {spec.name!r}: shape {list(value.shape)}, "
                            f"model expects {list(spec.shape)} (-1 = any, batch may vary)")
    return problems


def _shape_fits(expected: tuple[int, ...], given: tuple[int, ...]) -> bool:
    if len(expected) != len(given):
        return False
    return all(e in (-1, g) for e, g in zip(expected[1:], given[1:], strict=True))
