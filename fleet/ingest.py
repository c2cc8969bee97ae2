"""What the controller takes in from devices, checked whole before anything is kept.

Every message on a device topic is decoded and checked against its schema when it
arrives (``status``, ``state/reported``, ``events``, ``telemetry``; see docs/protocol.md):
its size first (:data:`MAX_BYTES`), then JSON, then the document. A message that fails
raises an :class:`IngestError` (or a ``SchemaVersionError``) whose :func:`reason` is one
of :data:`REASONS`; the controller counts it under that reason
(``edgefleet_messages_rejected{reason=...}``) and keeps nothing of it, so no view ever
reads it.

``state/reported`` is written to the store: besides its schema, its strings must be
storable (no NUL, no lone surrogate: PostgreSQL refuses both, and one such device would
fail every batch write) and its integers fit the store's 64-bit columns. What it says
must also be something an agent says: ``update.state`` one of :data:`UPDATE_STATES`,
``slot`` ``a``, ``b`` or null, ``serving`` a JSON boolean (not ``"yes"``), ``ts`` and
``update.since`` milliseconds below 2**53 (exact in JSON everywhere), and ``fleet`` this
controller's fleet (else ``identity``).
"""

from __future__ import annotations

from typing import Any

from edgefleet.agent.protocol.errors import PayloadError, SchemaVersionError
from edgefleet.agent.protocol.payloads import Event, ReportedState, UpdateReport, decode_status
from edgefleet.agent.protocol.schema import decode_json, validate_document
from edgefleet.agent.protocol.telemetry_schema import check_points
from edgefleet.agent.protocol.topics import Leaf
from edgefleet.agent.protocol.update_state import UpdateState

__all__ = ["MAX_BYTES", "MAX_MS", "REASONS", "SLOTS", "UPDATE_STATES", "IngestError", "event",
           "reason", "reported", "status", "telemetry"]

KiB = 1024
MAX_BYTES = {Leaf.TELEMETRY: 1024 * KiB, Leaf.REPORTED: 64 * KiB, Leaf.EVENTS: 64 * KiB,
             Leaf.STATUS: 64}
REASONS = ("topic", "too_large", "json", "schema_version", "schema", "identity")
_STORE_INT = 2**63  # the store's integer columns are signed 64-bit
_MAX_DEPTH = 16  # of a state/reported document (it is 3 deep)
MAX_MS = 2**53  # ts and update.since: an exact number in every JSON reader
# the update states of the device contract, and the A/B slots
UPDATE_STATES = frozenset(state.value for state in UpdateState)
SLOTS = frozenset({"a", "b"})


class IngestError(PayloadError):
    """A device message refused on arrival; ``reason`` labels it in the rejected counter."""

    reason = "schema"


class NotJsonError(IngestError):
    """A message that is not UTF-8 JSON."""

    reason = "json"


class TooLargeError(IngestError):
    """A message larger than its topic allows."""

    reason = "too_large"


class IdentityError(IngestError):
    """A message that names another device or fleet than the topic it came on."""

    reason = "identity"


def reason(exc: Exception) -> str:
    """The rejected counter's label for what a message was refused with."""
    if isinstance(exc, SchemaVersionError):
        return "schema_version"
    return exc.reason if isinstance(exc, IngestError) else "schema"


def _sized(leaf: Leaf, payload: bytes) -> bytes:
    limit = MAX_BYTES.get(leaf, 64 * KiB)
    if len(payload) > limit:
        raise TooLargeError(f"{leaf.value} message of {len(payload)} bytes; at most {limit}",
                            hint="see docs/protocol.md for the bounds")
    return payload


def telemetry(payload: bytes) -> list[tuple[int, dict[str, Any]]]:
    """``(ts, values)`` of every point of a telemetry message (one point or a batch)."""
    data = decode_json(_sized(Leaf.TELEMETRY, payload), "telemetry", NotJsonError)
    return check_points(data)


def status(payload: bytes) -> str:
    return decode_status(_sized(Leaf.STATUS, payload))


def reported(device: str, payload: bytes, fleet: str) -> ReportedState:
    """``device``'s own report on ``fleet``'s topic, storable as it is."""
    data = decode_json(_sized(Leaf.REPORTED, payload), "state/reported", NotJsonError)
    if not _storable(data, _MAX_DEPTH):
        raise IngestError("state/reported holds a NUL, a lone surrogate, an integer beyond "
                          "64 bits or nesting deeper than 16 levels",
                          hint="see docs/protocol.md, state/reported")
    if isinstance(data, dict) and "serving" in data and type(data["serving"]) is not bool:
        raise IngestError(f"state/reported serving must be true or false, got "
                          f"{type(data['serving']).__name__}")
    document = validate_document(ReportedState, data, "state/reported")
    if document.device != device:
        raise IdentityError(f"state/reported of {device} names {document.device[:80]!r}")
    if document.fleet != fleet:
        raise IdentityError(f"state/reported of {device} on fleet {fleet!r}'s topic names "
                            f"fleet {document.fleet[:80]!r}")
    _check_report(document)
    return document


def _check_report(document: ReportedState) -> None:
    """What the report says is something an agent says (of each model, for version 2)."""
    _check_model("", document.update, document.slot)
    for name, model in (document.models or {}).items():
        _check_model(f"models.{name[:64]}.", model.update, model.slot)
    if not 0 <= document.ts < MAX_MS:
        raise IngestError("state/reported ts must be milliseconds from 0 to 2**53")


def _check_model(where: str, update: UpdateReport, slot: str | None) -> None:
    if update.state not in UPDATE_STATES:
        raise IngestError(f"state/reported {where}update.state {update.state[:40]!r} is not "
                          f"an update state: {', '.join(sorted(UPDATE_STATES))}")
    if slot is not None and slot not in SLOTS:
        raise IngestError(f"state/reported {where}slot {slot[:40]!r} is not a, b or null")
    if not 0 <= update.since < MAX_MS:
        raise IngestError(f"state/reported {where}update.since must be milliseconds from 0 "
                          "to 2**53")


def event(payload: bytes) -> str:
    """The text of an ``events`` message that is an :class:`Event`."""
    data = decode_json(_sized(Leaf.EVENTS, payload), "event", NotJsonError)
    validate_document(Event, data, "event")
    return payload.decode("utf-8", "replace")


def _storable(value: Any, depth: int) -> bool:
    kind = type(value)
    if kind is str:
        return "\x00" not in value and (value.isascii() or _utf8(value))
    if kind is int:
        return bool(-_STORE_INT <= value < _STORE_INT)
    if kind is dict:
        return depth > 0 and all(_storable(k, depth - 1) and _storable(v, depth - 1)
                                 for k, v in value.items())
    if kind is list:
        return depth > 0 and all(_storable(v, depth - 1) for v in value)
    return True


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True

