"""Errors of the HTTP server: each one is an answer with a status and a JSON body.

::

    EdgefleetError
    ├── RequestError              a request answered with an HTTP error status (400 unless told)
    │   └── IncompleteRequestError  the connection ended, or its time ran out, mid-request
    └── HttpSetupError            TLS files, client CA or tokens the server cannot use
"""

from __future__ import annotations

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["HttpSetupError", "IncompleteRequestError", "RequestError"]


class RequestError(EdgefleetError):
    """A request the server answers with an HTTP error status (400 unless told)."""

    def __init__(self, message: str, hint: str = "", status: int = 400) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class IncompleteRequestError(RequestError):
    """Part of a request arrived, then the peer stopped sending (400), or took longer than
    the server waits (answered 408 by the server, which knows which)."""


class HttpSetupError(EdgefleetError):
    """The HTTP server's TLS files, client CA or tokens cannot be used (fatal: fix the
    options and start again)."""
