"""Probation agreement: the previous model re-runs a sample of live requests, off the path.

Every ``sample_every``-th request that the new model answered is copied (a caller
may reuse its input buffer, and owns the answer it got) and queued (a bounded
queue; a full one drops the sample rather than wait), and a worker thread runs the
previous model on it: top-1 agreement for classifiers, cosine similarity of the
outputs otherwise. Inference never waits on it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgefleet.agent.loader import LoadedModel
from edgefleet.agent.runtime.base import Array, TensorInfo

__all__ = ["Shadow", "as_inputs_of"]

Sample = tuple[Mapping[str, Array], dict[str, Array]]


def as_inputs_of(inputs: Sequence[TensorInfo], feeds: Mapping[str, Array]) -> Mapping[str, Array]:
    """``feeds`` under the names of ``inputs``, matched by position when the names differ
    (a .tflite and an .onnx of one model name their inputs differently)."""
    names = [spec.name for spec in inputs]
    if set(names) == set(feeds) or len(names) != len(feeds):
        return feeds
    return dict(zip(names, feeds.values(), strict=True))


class Shadow:
    """Compares the active model's answers with ``previous`` on sampled requests."""

    def __init__(self, previous: LoadedModel, sample_every: int = 10,
                 queue_size: int = 64) -> None:
        self.previous, self.sample_every = previous, max(1, sample_every)
        self._count = 0
        self._queue: queue.Queue[Sample | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self.samples = self.agreeing = 0
        self.cosine_sum = 0.0
        self.dropped = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="edgefleet-shadow", daemon=True)
        self._thread.start()

    def offer(self, feeds: Mapping[str, Array], outputs: dict[str, Array]) -> None:
        """Called on the request path: count, and maybe copy and enqueue without waiting."""
        self._count += 1
        if self._count % self.sample_every:
            return
        if self._queue.full():  # no room: drop it before copying it
            self.dropped += 1
            return
        sample = ({k: np.array(v, copy=True) for k, v in feeds.items()},
                  {k: np.array(v, copy=True) for k, v in outputs.items()})
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            self.dropped += 1

    def stop(self) -> None:
        """End the worker after the samples already queued."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # a full queue: the worker sees the flag after it
            self._queue.put_nowait(None)

    def values(self) -> dict[str, Any]:
        with self._lock:
            n = self.samples
            return {"against": self.previous.version, "samples": n, "dropped": self.dropped,
                    "top1": round(self.agreeing / n, 6) if n else None,
                    "cosine": round(self.cosine_sum / n, 6) if n else None}

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            feeds, new = item
            try:
                old = self.previous.runtime.run(
                    as_inputs_of(self.previous.runtime.inputs, feeds))
            except Exception:  # the previous model may refuse what the new one takes
                pass
            else:
                self._record(next(iter(new.values())), next(iter(old.values())))
            if self._stopping.is_set() and self._queue.empty():
                return

    def _record(self, new: Array, old: Array) -> None:
        a, b = np.asarray(new, np.float64), np.asarray(old, np.float64)
        # an output with NaN or an infinity agrees with nothing (and its cosine is no number)
        finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
        agree = finite and a.shape == b.shape and a.ndim == 2 and a.shape[1] > 1 and bool(
            np.all(a.argmax(1) == b.argmax(1)))
        x, y = a.reshape(-1), b.reshape(-1)
        denom = float(np.linalg.norm(x) * np.linalg.norm(y)) if finite and x.size == y.size \
            else 0.0
        cosine = float(np.dot(x, y) / denom) if denom and np.isfinite(denom) else 0.0
        with self._lock:
            self.samples += 1
            self.agreeing += int(agree)
            self.cosine_sum += cosine
