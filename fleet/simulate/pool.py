"""A small pool of threads that run update steps: fire and forget, no futures.

A simulated device submits one job per update step (download, verify, stage, switch...),
so a fleet of 10,000 devices submits tens of thousands in a rollout. A
``concurrent.futures`` pool builds a ``Future`` (a lock and a condition) per job and
wakes its thread on every one; the steps need neither a result nor a wait, so this pool
is a queue and its threads.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["WorkPool"]

log = logging.getLogger(__name__)

Job = Callable[[], None]


class WorkPool:
    """``workers`` threads running submitted jobs in submission order."""

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {workers}")
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._closing = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; after ``shutdown`` it is dropped."""
        if not self._closing:
            self._jobs.put(job)

    def shutdown(self) -> None:
        """Jobs running finish; queued ones are dropped; the threads end."""
        self._closing = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._closing:
                continue  # dropped: run only until the sentinel
            try:
                job()
            except Exception:  # a job must not end its worker
                log.exception("a simulated update step failed")
