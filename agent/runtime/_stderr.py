"""Keep a native runtime's banners out of the terminal and the agent's log lines.

LiteRT's C++ side writes ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``
straight to file descriptor 2 when an interpreter allocates its tensors; neither
``TF_CPP_MIN_LOG_LEVEL`` nor any Python call of LiteRT 2.3 turns it off. So around
that call only, fd 2 points at a temporary file; afterwards ``INFO:`` lines become
debug records and any other text (a runtime's error, or another thread's output
written meanwhile) goes back to the real stderr unchanged: delayed, never lost.

fd 2 belongs to the whole process, so one lock serialises the captures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import IO

__all__ = ["native_banners_to_log"]

_lock = threading.Lock()


@contextlib.contextmanager
def native_banners_to_log(log: logging.Logger) -> Iterator[None]:
    """Capture what native code writes to fd 2 meanwhile; route it as described above."""
    with _lock, _sink() as sink:
        if sink is None:  # no room for a temp file (a full disk): let the banner through
            yield
            return
        try:
            with _fd2_to(sink.fileno()):
                yield
        finally:  # a failing call's own explanation is routed too
            sink.seek(0)
            _route(sink.read().decode("utf-8", "replace"), log)


@contextlib.contextmanager
def _sink() -> Iterator[IO[bytes] | None]:
    """A temporary file for fd 2, or None when none can be made (a full disk must not stop a
    model from loading)."""
    with contextlib.ExitStack() as stack:
        try:
            sink: IO[bytes] | None = stack.enter_context(tempfile.TemporaryFile())
        except OSError:
            sink = None
        yield sink


@contextlib.contextmanager
def _fd2_to(fd: int) -> Iterator[None]:
    _flush()
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        _flush()
        os.dup2(saved, 2)
        os.close(saved)


def _flush() -> None:
    with contextlib.suppress(ValueError, OSError):  # a closed or detached sys.stderr
        sys.stderr.flush()


def _route(text: str, log: logging.Logger) -> None:
    others = []
    for line in text.splitlines(keepends=True):
        if line.startswith("INFO: "):
            log.debug("%s", line[6:].rstrip())
        else:
            others.append(line)
    if others:
        os.write(2, "".join(others).encode())
