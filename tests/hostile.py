"""Shared pieces of the hostile-input tests: example counts, memory and time bounds.

Each hostile-input test generates a *class* of inputs with hypothesis. CI runs
``EDGEFLEET_HOSTILE_EXAMPLES`` examples per test (200 by default); ``make hostile`` runs
1,000. Runs are derandomized so CI sees the same examples every time.

Memory is bounded two ways:

* in this process, :func:`peak_traced_bytes` runs a call under ``tracemalloc`` (numpy
  reports its buffers there too) and returns the peak bytes allocated during it;
* in a child process, :func:`run_measured` runs a command and returns its own peak RSS
  from ``wait4`` (not the high-water mark of every child this test ever waited on).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, TypeVar

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("EDGEFLEET_HOSTILE_EXAMPLES", "200"))

HOSTILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much,
                                          HealthCheck.function_scoped_fixture])

T = TypeVar("T")

MiB = 1024 * 1024


def peak_traced_bytes(call: Callable[[], T]) -> tuple[T | BaseException, int]:
    """Run ``call`` under tracemalloc: its result (or the exception it raised) and peak bytes."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        result: T | BaseException = call()
    except BaseException as exc:  # the caller asserts on what was raised
        result = exc
    peak = tracemalloc.get_traced_memory()[1] - base
    if started:
        tracemalloc.stop()
    return result, max(peak, 0)


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int
    seconds: float


def run_measured(argv: Sequence[str], *, timeout_s: float = 120.0,
                 env: dict[str, str] | None = None, stdin: bytes | None = None) -> Measured:
    """Run a command; return its exit code, output, its own peak RSS and its wall time."""
    started = time.monotonic()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            env=env)
    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=_drain, args=(stream, key, chunks), daemon=True)
               for key, stream in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    if stdin is not None and proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin)
        proc.stdin.close()
    status, peak = _wait4(proc, started + timeout_s)
    for reader in readers:
        reader.join()
    return Measured(status, chunks.get("out", b"").decode(errors="replace"),
                    chunks.get("err", b"").decode(errors="replace"), peak,
                    time.monotonic() - started)


def _drain(stream: IO[bytes] | None, key: str, into: dict[str, bytes]) -> None:
    if stream is not None:
        into[key] = stream.read()


def _wait4(proc: subprocess.Popen[bytes], deadline: float) -> tuple[int, int]:
    """Reap ``proc`` ourselves so that its own rusage (peak RSS) is ours to read."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss * 1024
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            raise subprocess.TimeoutExpired(proc.args, 0)
        time.sleep(0.01)
