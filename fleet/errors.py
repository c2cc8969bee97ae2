"""The fleet's errors, under :class:`FleetError`: anything the controller, its store or its
CLI refuses (the whole tree is drawn in docs/architecture.md, "Error tree").

Errors raised in the controller travel to the CLI as JSON ``{"error", "hint", "kind"}``
with an HTTP status that ``kind`` maps to (see ``fleet.api``); the client
(``fleet.client.error_for_status``) raises one error per status family again.
"""

from __future__ import annotations

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["ApiError", "AuthError", "ConflictError", "FleetError", "ForbiddenError",
           "InvalidRolloutError", "NotFoundError", "RefusedError", "StoreError",
           "UnavailableError"]


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


class ForbiddenError(AuthError):
    """A known token whose role does not allow the call (403); ``role`` is the role it needs."""

    def __init__(self, message: str, *, role: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.role = role


class ApiError(FleetError):
    """The controller could not be reached, or answered with an error."""

    transient = True


class RefusedError(ApiError):
    """The controller refused what was sent: a method it does not take (405), a body
    without a length (411) or above its cap (413), a range outside the bundle (416), a
    bundle or keyring that does not verify (422)."""

    transient = False


class UnavailableError(ApiError):
    """The controller cannot answer for now (503: its store failed, or too many uploads
    run at once); a retry after a few seconds may pass."""
