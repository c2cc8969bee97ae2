"""What keeps one connection from holding the HTTP server: deadlines and a byte budget.

Each connection has a :class:`Watch`: the monotonic time by which its handler must
have read what it waits for (``inf`` while a request is being answered). The
handler only writes that time (a float store per step, nothing on the socket); one
:class:`Watchdog` thread looks at every watch a few times a second and shuts the
read side of a connection past its deadline, so the handler's blocked read returns
at once and the handler answers 408 or closes. A connection still past a deadline
at a later look (a peer that takes up no answer) is shut both ways.

:class:`Budget` bounds the bytes of large request bodies held at once over all
connections: a request waits for its share, or is answered 503. :class:`Every` keeps
a flood of refusals from flooding the log.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time

__all__ = ["Budget", "Every", "Watch", "Watchdog"]


class Watch:
    """One connection's deadline, and whether the watchdog has cut it."""

    __slots__ = ("deadline", "expired", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = math.inf
        self.expired = False


class Watchdog:
    """Cuts connections past their deadline; looks every ``period_s`` seconds."""

    def __init__(self, period_s: float) -> None:
        self._period = period_s
        self._watches: dict[socket.socket, Watch] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._watches)

    def add(self, sock: socket.socket) -> Watch:
        watch = Watch(sock)
        with self._lock:
            self._watches[sock] = watch
        return watch

    def get(self, sock: socket.socket) -> Watch:
        return self._watches.get(sock) or Watch(sock)

    def remove(self, sock: socket.socket) -> None:
        with self._lock:
            self._watches.pop(sock, None)

    def take_all(self) -> list[socket.socket]:
        """Forget every connection; the sockets, for the caller to close."""
        with self._lock:
            socks, self._watches = list(self._watches), {}
        return socks

    def start(self, name: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.wait(self._period):
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Cut the read side of every connection whose deadline is before ``now``; both
        sides if it was cut before (its handler set no new deadline since: it is blocked
        writing to a peer that reads nothing)."""
        with self._lock:
            late = [watch for watch in self._watches.values() if watch.deadline < now]
        for watch in late:
            how = socket.SHUT_RDWR if watch.expired else socket.SHUT_RD
            watch.expired = True
            with contextlib.suppress(OSError):  # the peer closed it meanwhile
                socket.socket.shutdown(watch.sock, how)  # TCP's, under TLS too: a TLS
                #                                          socket's own forgets its session


class Budget:
    """At most ``total`` bytes taken at once; a taker waits up to a timeout for its share."""

    def __init__(self, total: int) -> None:
        self.total, self._free = total, total
        self._changed = threading.Condition()

    def take(self, size: int, timeout_s: float) -> bool:
        with self._changed:
            if not self._changed.wait_for(lambda: self._free >= size, timeout_s):
                return False
            self._free -= size
            return True

    def give(self, size: int) -> None:
        with self._changed:
            self._free += size
            self._changed.notify_all()


class Every:
    """Counts events and says when to log them: at most once per ``period_s`` seconds,
    with how many there were since (a flood floods no log)."""

    def __init__(self, period_s: float) -> None:
        self._period, self._count, self._logged = period_s, 0, -math.inf

    def count(self, now: float) -> int:
        """Count one event; the number to log now, or 0 when it is not yet time."""
        self._count += 1
        if now - self._logged < self._period:
            return 0
        counted, self._count, self._logged = self._count, 0, now
        return counted
