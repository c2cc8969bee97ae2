"""The fleet's branch of the error tree (root: ``agent.protocol.errors.EdgefleetError``)::

    EdgefleetError
    └── FleetError                  anything the controller or its CLI refuses
        ├── StoreError              the database cannot be reached or refused a statement
        ├── NotFoundError           an unknown device, model version or rollout
        ├── ConflictError           a name:version pushed twice with other bytes, or an
        │                           action the current state does not allow
        │   └── LeaseLostError      a controller that no longer leads tried to write
        │                           (fleet.lease)
        ├── InvalidRolloutError     a rollout whose selector, waves or gates make no sense
        ├── AuthError               a missing or wrong API token
        ├── ApiError                the CLI could not reach the controller, or it said no
        ├── RequestError            a request the API refuses before it reaches the
        │                           controller (fleet.api)
        ├── CertError               a certificate or key that cannot be made (fleet.certs)
        └── SimulationError         simulator options that cannot work (fleet.simulate)

Errors raised in the controller travel to the CLI as JSON ``{"error", "hint", "kind"}``
with an HTTP status that ``kind`` maps to (see ``fleet.api``).
"""

from __future__ import annotations

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["ApiError", "AuthError", "ConflictError", "FleetError", "InvalidRolloutError",
           "NotFoundError", "StoreError"]


class FleetError(EdgefleetError):
    """Root of the fleet's own errors."""


class StoreError(FleetError):
    """The store (SQLite or PostgreSQL) failed; usually worth a retry."""

    transient = True


class NotFoundError(FleetError):
    """An unknown device, model version or rollout."""


class ConflictError(FleetError):
    """The request contradicts what is stored, or the current state forbids it."""


class InvalidRolloutError(FleetError):
    """A rollout that cannot be run as asked: refused when it is created."""


class AuthError(FleetError):
    """No token, or a token the controller does not know."""


class ApiError(FleetError):
    """The controller could not be reached, or answered with an error."""

    transient = True
