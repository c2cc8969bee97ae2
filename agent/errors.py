"""The agent's errors: :class:`AgentError`, the branch of what the device itself cannot do
(serve, install, update, check a model), and :class:`BrokerError`, raised by the MQTT client
that the agent and the controller share.

Broker errors are transient (retry later) except a malformed broker URL, which is not. The
whole tree, with the module of each error, is drawn in docs/architecture.md ("Error tree").
"""

from __future__ import annotations

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["AgentError", "BrokerError", "BrokerTimeoutError", "NothingToServeError",
           "ServiceInstallError"]


class BrokerError(EdgefleetError):
    """The broker is unreachable, refused the connection, or the URL is wrong."""

    transient = True


class BrokerTimeoutError(BrokerError):
    """A publish that waits for its acknowledgement did not get it in time."""


class AgentError(EdgefleetError):
    """Something the device itself cannot do: serve, install, update, check a model."""


class NothingToServeError(AgentError):
    """No bundle could be loaded, so the agent refuses to start."""


class ServiceInstallError(AgentError):
    """A systemd unit that cannot be written, or options its command does not take."""
