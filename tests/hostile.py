"""Shared pieces of the hostile-input tests: example counts, memory and time bounds.

Each hostile-input test generates a *class* of inputs with hypothesis. CI runs
``EDGEFLEET_HOSTILE_EXAMPLES`` examples per test (200 by default); ``make hostile`` runs
1,000. Runs are derandomized so CI sees the same examples every time.

Memory is bounded two ways:

* in this process, :func:`peak_traced_bytes` runs a call under ``tracemalloc`` (numpy
  reports its buffers there too) and returns the peak bytes allocated during it;
* in a child process, :func:`run_measured` runs a command and returns its own peak RSS
  from ``wait4``. The command is started by a small fresh interpreter, not by this
  process: Linux carries the memory peak of the process that forks into the child's
  ``ru_maxrss`` across ``exec``, so a child of a pytest process that trained a model would
  report that process's peak (about 770 MiB) whatever it used itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
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
    with tempfile.TemporaryDirectory(prefix="edgefleet-rss-") as folder:
        report = Path(folder) / "peak"
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _STARTER, str(report),
                                 *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.PIPE if stdin is not None
                                else subprocess.DEVNULL, env=env, start_new_session=True)
        status, out, err = _collect(proc, stdin, started + timeout_s)
        peak = int(report.read_text()) if report.exists() else 0
    return Measured(status, out, err, peak, time.monotonic() - started)


# Started as `python -I -S` (a few MB): it runs the command, passes SIGTERM and SIGINT on
# to it, and writes the command's own peak RSS, which wait4 reports without this small
# starter's memory in it.
_STARTER = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
status, usage = os.wait4(pid, 0)[1:]
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _collect(proc: subprocess.Popen[bytes], stdin: bytes | None,
             deadline: float) -> tuple[int, str, str]:
    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=_drain, args=(stream, key, chunks), daemon=True)
               for key, stream in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    if stdin is not None and proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin)
        proc.stdin.close()
    try:
        status = proc.wait(max(deadline - time.monotonic(), 0.001))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the starter and the command it runs
        proc.wait()
        raise
    for reader in readers:
        reader.join()
    return (status, chunks.get("out", b"").decode(errors="replace"),
            chunks.get("err", b"").decode(errors="replace"))


def _drain(stream: IO[bytes] | None, key: str, into: dict[str, bytes]) -> None:
    if stream is not None:
        into[key] = stream.read()
