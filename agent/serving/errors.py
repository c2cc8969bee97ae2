"""Errors of the HTTP server: each one is an answer with a status and a JSON body.

:class:`RequestError` itself belongs to the device contract (``agent.protocol.errors``): the
controller's API refuses requests with it too. The whole tree is drawn in
docs/architecture.md ("Error tree").
"""

from __future__ import annotations

from edgefleet.agent.errors import AgentError
from edgefleet.agent.protocol.errors import RequestError

__all__ = ["HttpSetupError", "IncompleteRequestError", "RequestError"]


class IncompleteRequestError(RequestError):
    """Part of a request arrived, then the peer stopped sending (400), or took longer than
    the server waits (answered 408 by the server, which knows which)."""


class HttpSetupError(AgentError):
    """The HTTP server's TLS files, client CA or tokens cannot be used (fatal: fix the
    options and start again)."""
