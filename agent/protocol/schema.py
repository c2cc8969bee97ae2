"""Shared pieces of every versioned document: strict JSON decoding and version checks."""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edgefleet.agent.protocol.errors import EdgefleetError, PayloadError, SchemaVersionError

__all__ = ["Document", "decode_json", "finite", "is_supported", "validate_document"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SEMVER_PATTERN = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
SHA256_PATTERN = r"^[0-9a-f]{64}$"

D = TypeVar("D", bound="Document")


class Document(BaseModel):
    """A frozen, versioned document; unknown fields of a known version are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({1})


def decode_json(raw: bytes | str, what: str, error: type[EdgefleetError] = PayloadError) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{what} is not valid JSON: {exc}",
                           hint="send UTF-8 JSON as described in docs/protocol.md") from exc
    except RecursionError as exc:  # "[[[[...": json recurses once per level
        raise error(f"{what} is nested too deeply to be a document",
                    hint="see docs/protocol.md for the schema") from exc


def is_supported(version: object, versions: frozenset[int]) -> bool:
    """``schema_version`` is a plain int this build reads (never a bool, list or dict)."""
    return type(version) is int and version in versions


def validate_document(
    cls: type[D], data: Any, what: str, error: type[EdgefleetError] = PayloadError
) -> D:
    """Check ``schema_version`` first, then every field; raise ``error`` naming the problem."""
    if not isinstance(data, dict):
        raise error(f"{what} must be a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    supported = sorted(cls.SUPPORTED_VERSIONS)
    if not is_supported(version, cls.SUPPORTED_VERSIONS):
        raise SchemaVersionError(
            f"{what} has schema_version {version!r}; this edgefleet reads {supported}",
            hint="upgrade edgefleet on this side, or produce the document with a matching version",
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise error(f"{what} is invalid: {_summarise(exc)}",
                    hint="see docs/protocol.md for the schema") from exc


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity made null: strict JSON has no such number, and the
    fleet refuses them in telemetry."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value
