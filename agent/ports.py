"""Servers that cannot listen on their address, said in one line.

``BindError`` hangs under ``EdgefleetError`` (agent.protocol.errors). Its message
names the address, why it cannot be used (in use, and by which process when this
machine says so cheaply; not allowed; not an address of this machine) and the
option that changes it, so the CLI prints it as one line with no fix line.
"""

from __future__ import annotations

import errno
import socket

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["BindError", "bind_error", "check_free", "free_port", "listener_of"]

_REASONS = {errno.EACCES: "this user may not listen there (ports below 1024 need root)",
            errno.EADDRNOTAVAIL: "that address is not one of this machine's"}


class BindError(EdgefleetError):
    """A server cannot listen on its address; the message names the option to change."""

    def __init__(self, message: str, *, host: str, port: int) -> None:
        super().__init__(message)
        self.host, self.port = host, port


def bind_error(host: str, port: int, option: str, exc: OSError) -> BindError:
    """Translate a failed ``bind`` on ``host:port`` into a one-line ``BindError``."""
    if exc.errno == errno.EADDRINUSE:
        holder = listener_of(port)
        why = f"in use by {holder}" if holder else "in use"
    else:
        why = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
    return BindError(f"cannot listen on {host}:{port}: {why}; choose another with {option}",
                     host=host, port=port)


def check_free(host: str, port: int, option: str) -> None:
    """Raise ``BindError`` unless ``host:port`` can be bound now (for servers that fail late
    and loudly, such as a broker started on its own event loop or as another program)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise bind_error(host, port, option, exc) from exc


def free_port(host: str, option: str) -> int:
    """A TCP port free on ``host`` now, chosen by the kernel (for ``--port 0`` on servers that
    do not say which port they got); ``BindError`` if ``host`` cannot be bound at all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:
            raise bind_error(host, 0, option, exc) from exc
        return int(probe.getsockname()[1])


def listener_of(port: int) -> str | None:
    """``"NAME (pid N)"`` of the process listening on TCP ``port``, when it can be seen."""
    try:
        import psutil
    except ImportError:  # psutil comes with [agent]; without it the port is just "in use"
        return None
    try:
        listening = [c for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
        pid = next((c.pid for c in listening if c.pid), None)
        return f"{psutil.Process(pid).name()} (pid {pid})" if pid else None
    except (psutil.Error, OSError):  # not allowed to look, or the process just ended
        return None
