"""The agent's branch of the error tree (root: ``agent.protocol.errors.EdgefleetError``)::

    EdgefleetError
    ├── BrokerError                 the MQTT broker cannot be reached or refused us
    │   └── BrokerTimeoutError      a QoS 1 publish was not acknowledged in time
    ├── NothingToServeError         the agent has no loadable model and will not start
    ├── ServiceInstallError         a systemd unit that cannot be written, or bad options
    ├── NotReadyError               (agent.core) a request before any model is loaded
    ├── HealthCheckError            (agent.health) outputs or latency out of tolerance
    ├── RuntimeLoadError, ...       (agent.runtime.errors) runtime missing, too old, or failing
    └── InferenceError              (agent.runtime.errors) inputs that do not fit the model

Broker errors are transient (retry later) except a malformed broker URL, which is not.
"""

from __future__ import annotations

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["BrokerError", "BrokerTimeoutError", "NothingToServeError", "ServiceInstallError"]


class BrokerError(EdgefleetError):
    """The broker is unreachable, refused the connection, or the URL is wrong."""

    transient = True


class BrokerTimeoutError(BrokerError):
    """A publish that waits for its acknowledgement did not get it in time."""


class NothingToServeError(EdgefleetError):
    """No bundle could be loaded, so the agent refuses to start."""


class ServiceInstallError(EdgefleetError):
    """A systemd unit that cannot be written, or options its command does not take."""
