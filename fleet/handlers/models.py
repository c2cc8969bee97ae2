"""Model versions: listed, and pushed as a bundle that streams to a file (refused at its
first block when it is no tar) and is verified before it is stored. At most
:data:`MAX_PUSHES` uploads stream at once; one more is answered 503 with Retry-After."""

from __future__ import annotations

import secrets
from http import HTTPStatus
from pathlib import Path

from edgefleet.agent.protocol._tar import BLOCK, check_first_block
from edgefleet.agent.protocol.errors import BundleError, RequestError
from edgefleet.fleet.domain import ModelVersion
from edgefleet.fleet.handlers._exchange import CHUNK, RETRY_AFTER_S, Call, Exchange

__all__ = ["MAX_PUSHES", "models", "push_model"]

MAX_PUSHES = 2  # bundle uploads streaming at once
_MAX_BODY = 512 * 1024 * 1024  # a bundle


def models(ex: Exchange, call: Call) -> None:
    ex.send_json([m.as_dict() for m in ex.controller.store.models()])


def push_model(ex: Exchange, call: Call) -> None:
    model, added = _push(ex, call.actor)
    ex.send_json({"model": model.as_dict(), "added": added},
                 HTTPStatus.CREATED if added else HTTPStatus.OK)


def _push(ex: Exchange, actor: str) -> tuple[ModelVersion, bool]:
    """At most ``MAX_PUSHES`` uploads at once, each streamed to a file, then verified."""
    if not ex.server.pushes.acquire(blocking=False):
        raise RequestError(f"{MAX_PUSHES} pushes are already uploading",
                           HTTPStatus.SERVICE_UNAVAILABLE,
                           hint=f"retry in {RETRY_AFTER_S} s")
    upload = ex.controller.artifacts / f".upload-{secrets.token_hex(8)}.part"
    try:
        _stream_to(ex, upload, ex.read_length(_MAX_BODY), actor)
        return ex.controller.push(upload, actor)
    finally:
        upload.unlink(missing_ok=True)
        ex.server.pushes.release()


def _stream_to(ex: Exchange, path: Path, length: int, actor: str) -> None:
    """The body into ``path`` in chunks; refused at its first block if no tar header.
    (``read_length`` has marked the body as read.)"""
    first = ex.rfile.read(min(BLOCK, length))
    _first_block(ex, first, actor)
    left = length - len(first)
    with open(path, "wb") as out:
        out.write(first)
        while left > 0:
            chunk = ex.rfile.read(min(CHUNK, left))
            if not chunk:
                raise RequestError(f"the upload ended after {length - left} of {length} "
                                   "bytes", HTTPStatus.BAD_REQUEST, hint="send it again")
            out.write(chunk)
            left -= len(chunk)


def _first_block(ex: Exchange, block: bytes, actor: str) -> None:
    try:
        check_first_block(block)
    except BundleError as exc:
        ex.close_connection = True  # the rest of the body is never read
        ex.controller.push_refused(actor, exc)
        raise
