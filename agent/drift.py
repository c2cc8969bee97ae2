"""Drift statistics of a budgeted sample of requests, summarised off the request path.

:class:`DriftSampler` feeds a :class:`edgefleet.agent.protocol.drift.DriftWindow` with a sample of
the requests the active model answers. Which requests: a token bucket earns 0.5 % of every
inference's own time plus 5 ms per second of wall time, and a request is picked when the
bucket holds what the last summary cost (in CPU time), at most one request in four, and
about ``MAX_RATE`` (50) a second at most: after a pick, the next one waits for as many
requests as the last pick's rate brings in 20 ms. A
picked request only copies its arrays into buffers the sampler keeps and hands them to the
agent's :class:`DriftWorker`, one background thread that makes the summary; what the copy
and the summary cost (each thread's CPU time) is what the bucket is charged. A slow model
or a quiet device is summarised on up to one request in four (no request is picked while
the last summary waits for the worker, which looks for work every ``POLL_S``); a model
serving flat out on a small fraction of its requests, and spends well under 1 % of its
time on it. A busy device's window still holds up to 50 samples a second: 500 in a 10 s
telemetry window, where 10-bin PSI noise is about 0.02. The window says how many requests
it summarised (``samples``) and out of how many (``requests``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgefleet.agent.protocol.drift import DriftWindow, Monitoring, Scale
from edgefleet.agent.protocol.manifest import Manifest, TensorSpec
from edgefleet.agent.runtime.base import Array

__all__ = ["DriftSampler", "DriftWorker", "scales_of"]

INFERENCE_BUDGET = 0.005  # of each inference's time
WALL_BUDGET = 0.005  # of wall time, so a quiet device summarises everything
# at most one request in SPACING is picked, so the median request never carries the copy
SPACING = 4
# and about MAX_RATE a second: a window's histograms need hundreds of samples, not a
# fraction of a busy device's requests (whose copies also take the inference's caches)
MAX_RATE = 50
_MIN_GAP_NS = 1_000_000_000 // MAX_RATE
QUEUE_SIZE = 8  # summaries waiting for the worker; one more is dropped (and counted)
POLL_S = 0.005  # how often the worker looks for summaries while requests flow
IDLE_S = 1.0  # ... until it found none for this long; then it blocks until woken
UPKEEP_S = 1.0  # the worker runs its upkeep at least this often
DRAIN_WAIT_S = 0.25  # how long drain() waits for the summary in flight
WORKER_NAME = "edgefleet-drift"
_MAX_TOKENS_NS = 50_000_000  # never a burst of more than 50 ms of summaries
_BUSY = INFERENCE_BUDGET / WALL_BUDGET  # an inference's ns earn what 1 ns of wall time does

Job = Callable[[], object]
_log = logging.getLogger(__name__)


def scales_of(specs: list[TensorSpec]) -> dict[str, Scale]:
    """(scale, zero point) of every per-tensor quantized integer tensor."""
    found: dict[str, Scale] = {}
    for spec in specs:
        q = spec.quantization
        if q is not None and len(q.scale) == 1 and q.scale[0] and spec.dtype.startswith(
                ("int", "uint")):
            found[spec.name] = (float(q.scale[0]), int(q.zero_point[0] if q.zero_point else 0))
    return found


class _Mailbox:
    """What the worker thread shares with its :class:`DriftWorker` (never the worker itself,
    so a worker nobody holds is collected, and its finalizer stops the thread)."""

    __slots__ = ("asleep", "jobs", "stopping", "wake")

    def __init__(self) -> None:
        self.jobs: deque[Job] = deque()
        self.wake = threading.Event()
        self.asleep = False  # blocked on ``wake``: a new job must set it
        self.stopping = False


class DriftWorker:
    """One thread that runs the jobs handed to it in order, and ``upkeep`` after each job and
    at least every ``UPKEEP_S``. One per agent, shared by the samplers of every model it
    serves (so swapping models starts no thread); it stops on :meth:`stop`, or once the
    worker object is garbage.

    Handing a job over is a ``deque.append``: while requests flow the thread looks for jobs
    every ``POLL_S``, so the request path never pays for waking a thread (a futex wake-up
    and, on a busy machine, a context switch: tens of microseconds). After ``IDLE_S``
    without a job the thread blocks until the next one sets its event.
    """

    def __init__(self, upkeep: Callable[[], object] | None = None,
                 size: int = QUEUE_SIZE) -> None:
        self._size, self._upkeep = size, upkeep
        self._box = _Mailbox()
        self._box.stopping = True  # not started yet: submit() refuses
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def start(self) -> DriftWorker:
        """Start the thread unless it runs (again after :meth:`stop`); not on a request path."""
        with self._start_lock:
            if self.running:
                return self
            if self._finalizer is not None:
                self._finalizer.detach()
            self._box = box = _Mailbox()  # nothing the stopped thread left can reach this one
            self._thread = threading.Thread(target=_work, args=(box, self._upkeep),
                                            name=WORKER_NAME, daemon=True)
            self._thread.start()
            self._finalizer = weakref.finalize(self, _stop, box)
        return self

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._box.stopping

    def submit(self, job: Job) -> bool:
        """Queue ``job`` without waiting; False when the queue is full or the worker stopped."""
        box = self._box
        if box.stopping or len(box.jobs) >= self._size:
            return False
        box.jobs.append(job)
        if box.asleep:  # only the first job after an idle second wakes the thread
            box.wake.set()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the queued jobs, then end the thread (waits up to ``timeout``)."""
        _stop(self._box)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def _stop(box: _Mailbox) -> None:
    box.stopping = True
    box.wake.set()


def _work(box: _Mailbox, upkeep: Callable[[], object] | None) -> None:
    idle, jobs = 0.0, box.jobs
    while True:
        if jobs:
            _run(jobs.popleft(), upkeep)
            idle = 0.0
            continue
        if box.stopping:
            return
        if idle < IDLE_S:
            time.sleep(POLL_S)
            idle += POLL_S
        else:
            box.asleep = True  # set before looking again: a job appended now sets ``wake``
            if not jobs and not box.stopping:
                box.wake.wait(UPKEEP_S)
            box.wake.clear()
            box.asleep = False
        _run(None, upkeep)


def _run(job: Job | None, upkeep: Callable[[], object] | None) -> None:
    for step in (job, upkeep):
        try:
            if step is not None:
                step()
        except Exception:  # a bad sample must not end the worker
            _log.debug("drift worker: %s failed", step, exc_info=True)


class DriftSampler:
    """Picks a budgeted sample of one model version's requests for its drift window.

    The bucket is kept as a deadline: tokens earned by wall time need no bookkeeping
    per request, so a request that is not picked costs one subtraction and one
    comparison. With ``B`` the tokens and ``C`` the last summary's cost after a
    summary at ``t``, the bucket holds ``C`` again at the first ``now`` with
    ``B + INFERENCE_BUDGET * busy + WALL_BUDGET * (now - t) >= C``, that is
    ``now >= due`` with ``due = t + (C - B) / WALL_BUDGET - busy * INFERENCE_BUDGET /
    WALL_BUDGET``: every inference moves ``due`` earlier by its time times ``_BUSY``.

    A summary's cost is known only when the worker has made it: the picked request
    charges the copy it measured plus the previous summary's cost, and the worker
    moves ``due`` by the difference once it knows its own. No request is picked while
    the last summary is in flight (its buffers are the worker's until then), so every
    pick sees the bucket exactly charged. A pick the worker's queue has no room for
    is dropped and counted in ``dropped`` (it keeps its provisional charge).
    """

    def __init__(self, manifest: Manifest,
                 clock: Callable[[], int] = time.perf_counter_ns,
                 cpu_clock: Callable[[], int] = time.thread_time_ns,
                 worker: DriftWorker | None = None) -> None:
        """``clock`` (ns) must be the one the request path's timestamps come from; costs
        are read on ``cpu_clock`` (the calling thread's CPU time, so a thread kept
        waiting by a busy machine does not count its wait as cost). Without ``worker``
        the sampler starts a worker of its own."""
        reference: Monitoring | None = manifest.monitoring
        self._window = DriftWindow(reference, scales_of([*manifest.inputs, *manifest.outputs]),
                                   classifier=manifest.task == "classification")
        self._first = manifest.inputs[0].name
        self._lock, self._cpu_clock = threading.Lock(), cpu_clock
        self._settled = threading.Condition(self._lock)
        self._worker = worker if worker is not None else DriftWorker().start()
        self._cost = self._summary_cost = 0
        self._due = clock() - _MAX_TOKENS_NS / WALL_BUDGET  # a full bucket
        self._requests = 0
        self._since = SPACING  # requests since the last pick
        self._spacing = SPACING  # requests the next pick waits for (see _hand_over)
        self._picked_ns = int(self._due)  # when the last pick was
        self._pending = False  # a summary is in flight (its buffers are the worker's)
        self._buffers: dict[str, Array] = {}
        self.dropped = 0

    def offer(self, inputs: Mapping[str, Array] | Array, outputs: Mapping[str, Array],
              started_ns: int, ended_ns: int) -> None:
        """Called on the request path after a successful inference (a bare array stands
        for the model's first input)."""
        self._requests += 1
        self._since += 1
        self._due -= (ended_ns - started_ns) * _BUSY
        if ended_ns >= self._due and self._since >= self._spacing:
            self._hand_over(inputs, outputs, ended_ns)

    def _hand_over(self, inputs: Mapping[str, Array] | Array, outputs: Mapping[str, Array],
                   ended_ns: int) -> None:
        """A picked request: copy, charge provisionally, queue the summary."""
        if self._pending:  # the worker has not made the last summary yet: wait for it
            return
        # the next pick waits for as many requests as came in the last _MIN_GAP_NS at the
        # rate since this one's predecessor: about MAX_RATE picks a second at most
        self._spacing = max(SPACING, -(-self._since * _MIN_GAP_NS //
                                       max(ended_ns - self._picked_ns, 1)))
        self._since, self._picked_ns = 0, ended_ns
        tokens = self._cost + (ended_ns - self._due) * WALL_BUDGET  # what the bucket holds
        began = self._cpu_clock()
        feeds = {self._first: inputs} if isinstance(inputs, np.ndarray) else inputs
        feeds, answers = self._copy(feeds, "in:"), self._copy(outputs, "out:")
        copied = self._cpu_clock() - began
        estimate = copied + self._summary_cost
        self._cost, self._due = estimate, _deadline(ended_ns, tokens, estimate)
        self._pending = True
        if not self._worker.submit(lambda: self._summarise(feeds, answers, ended_ns, tokens,
                                                          copied, estimate)):
            self._pending = False
            self.dropped += 1

    def _copy(self, arrays: Mapping[str, Array], prefix: str) -> dict[str, Array]:
        """``arrays`` copied into buffers reused from pick to pick (a fresh allocation
        of a large input costs several times the copy): the caller may reuse its arrays."""
        copies = {}
        for name, value in arrays.items():
            key, value = prefix + name, np.asarray(value)
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = self._buffers[key] = np.empty_like(value, order="C")
            np.copyto(buffer, value)
            copies[name] = buffer
        return copies

    def _summarise(self, feeds: Mapping[str, Array], outputs: Mapping[str, Array],
                   ended_ns: int, tokens: float, copied: int, estimate: int) -> None:
        """On the worker: summarise, then charge the bucket what the pick really cost."""
        with self._lock:
            try:
                began = self._cpu_clock()
                self._window.add(feeds, outputs)
                summary = self._cpu_clock() - began
                cost = copied + summary
                self._due += _deadline(ended_ns, tokens, cost) - _deadline(
                    ended_ns, tokens, estimate)
                self._cost, self._summary_cost = cost, summary
            finally:
                self._pending = False
                self._settled.notify_all()

    def drain(self) -> dict[str, Any] | None:
        """The window that ends now (None when no request was summarised); waits for a
        summary still in flight, up to ``DRAIN_WAIT_S``."""
        with self._settled:
            self._settled.wait_for(lambda: not self._pending, DRAIN_WAIT_S)
            window = self._window.drain()
            requests, self._requests = self._requests, 0
        if window is not None:
            window["requests"] = requests
        return window


def _deadline(ended_ns: int, tokens: float, cost: int) -> float:
    """When the bucket holds ``cost`` again after a summary costing ``cost`` was made at
    ``ended_ns`` from ``tokens`` (spending is capped at a full bucket)."""
    return ended_ns + (cost - min(tokens - cost, _MAX_TOKENS_NS)) / WALL_BUDGET
