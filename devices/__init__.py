"""Device profiles: what a class of device runs, and the checks a model must pass for it.

Profiles are data (``devices/profiles/*.json``, one schema-validated file per
device). The converter checks its output against ``--target`` profiles; the
fleet targets rollouts by profile and refuses devices that cannot load a bundle.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pydantic import Field, ValidationError

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.manifest import Manifest
from edgefleet.agent.protocol.schema import Document
from edgefleet.agent.runtime.inspect import ModelInfo
from edgefleet.agent.runtime.select import version_tuple

__all__ = ["DeviceProfile", "ProfileError", "Violation", "builtin_profile", "check_model",
           "list_profiles", "load_profile"]


class ProfileError(EdgefleetError):
    """A device profile that does not exist or does not validate."""


class DeviceProfile(Document):
    """One class of device: architecture, runtimes, dtypes, ops, limits."""

    schema_version: int
    name: str
    description: str = ""
    architecture: str
    runtimes: dict[str, str]
    tflite_op_level: str | None = None
    max_onnx_opset: int | None = Field(default=None, ge=1)
    dtypes: list[str]
    full_int8_only: bool = False
    tflite_ops: dict[str, int] | None = None
    onnx_ops: list[str] | None = None
    max_model_bytes: int = Field(gt=0)
    ram_bytes: int = Field(gt=0)
    threads: int = Field(ge=1)
    never_slower: bool = False


@dataclass(frozen=True)
class Violation:
    """One reason a model does not fit a profile."""

    kind: str
    message: str
    nodes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "message": self.message, "nodes": self.nodes}


def _profiles_dir() -> Path:
    return Path(str(resources.files(__name__) / "profiles"))


def list_profiles() -> list[DeviceProfile]:
    return [load_profile(p.stem) for p in sorted(_profiles_dir().glob("*.json"))]


_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$", re.ASCII)


def builtin_profile(name: str) -> DeviceProfile:
    """A profile this package ships, by name only: what a device *reports* as its profile
    is never read as a path (a name with '/' or '..' could reach any file here)."""
    if not _PROFILE_NAME.match(name) or ".." in name:
        raise ProfileError(f"{name!r} is not a device profile name",
                           hint="use the name of a built-in profile, e.g. raspberry-pi-4")
    return load_profile(name)


MAX_PROFILE_BYTES = 1 << 20  # a profile is a few KB


def load_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name, or a profile file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = _profiles_dir() / f"{name_or_path}.json"
    if not path.exists():
        known = ", ".join(p.stem for p in sorted(_profiles_dir().glob("*.json")))
        raise ProfileError(f"no device profile {name_or_path!r}",
                           hint=f"use one of: {known}, or a path to a profile .json")
    if not path.is_file():  # a folder, a FIFO (whose read would block), a device
        raise ProfileError(f"profile {path} is not a regular file",
                           hint="give a profile .json file, or a built-in profile's name")
    if path.stat().st_size > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile {path} is {path.stat().st_size:,} bytes: not a device "
                           f"profile (at most {MAX_PROFILE_BYTES // 1024} KiB)",
                           hint="compare it with devices/profiles/generic-arm64.json")
    try:
        return DeviceProfile.model_validate(json.loads(path.read_text()))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'profile'}: {e['msg']}"
                             for e in exc.errors()[:5])
        raise ProfileError(f"profile {path} is invalid: {problems}",
                           hint="compare it with devices/profiles/generic-arm64.json") from exc
    except (ValueError, OSError, RecursionError) as exc:  # nesting deeper than json reads
        raise ProfileError(f"profile {path} cannot be read: {type(exc).__name__}: "
                           f"{str(exc)[:200]}",
                           hint="compare it with devices/profiles/generic-arm64.json") from exc


def check_model(profile: DeviceProfile, manifest: Manifest, info: ModelInfo,
                model_bytes: int) -> list[Violation]:
    """Every reason ``profile`` cannot run this model; empty when it can."""
    checks = (_runtime, _size, _ram, _dtypes, _ops, _versions)
    return [v for check in checks for v in check(profile, manifest, info, model_bytes)]


def _runtime(p: DeviceProfile, m: Manifest, info: ModelInfo, size: int) -> list[Violation]:
    wanted = {"tflite": ("litert", "tflite-runtime"), "onnx": ("onnxruntime",)}[m.format]
    if any(r in p.runtimes for r in wanted):
        return []
    return [Violation("runtime", f"{p.name} has no runtime for .{m.format} models "
                      f"(it runs {', '.join(p.runtimes)})")]


def _size(p: DeviceProfile, m: Manifest, info: ModelInfo, size: int) -> list[Violation]:
    if size <= p.max_model_bytes:
        return []
    return [Violation("size", f"model is {size} bytes; {p.name} takes at most "
                      f"{p.max_model_bytes} bytes")]


def _ram(p: DeviceProfile, m: Manifest, info: ModelInfo, size: int) -> list[Violation]:
    """The model's weights are loaded into memory whole: a model larger than the device's
    memory cannot run (its activations come on top, and are not estimated here)."""
    if size <= p.ram_bytes:
        return []
    return [Violation("size", f"model is {size} bytes; {p.name} has {p.ram_bytes} bytes of "
                      "memory")]


def _dtypes(p: DeviceProfile, m: Manifest, info: ModelInfo, size: int) -> list[Violation]:
    found = set(info.dtypes) | {t.dtype for t in [*m.inputs, *m.outputs]}
    if p.full_int8_only:
        found |= {t.dtype for t in [*m.inputs, *m.outputs]}
    bad = sorted(found - set(p.dtypes))
    if not bad:
        return []
    why = " (full-integer int8 models only)" if p.full_int8_only else ""
    return [Violation("dtype", f"{p.name} does not run {', '.join(bad)} tensors{why}; "
                      f"it takes {', '.join(p.dtypes)}")]


def _ops(p: DeviceProfile, m: Manifest, info: ModelInfo, size: int) -> list[Violation]:
    allowed: set[str] | None
    allowed = set(p.tflite_ops) if m.format == "tflite" and p.tflite_ops is not None else None
    if m.format == "onnx" and p.onnx_ops is not None:
        allowed = set(p.onnx_ops)
    if allowed is None:
        return []
    return [Violation("op", f"op {op} is not supported on {p.name}", info.node_names(op))
            for op in sorted(info.ops) if op not in allowed]


def _versions(p: DeviceProfile, m: Manifest, info: ModelInfo, size: int) -> list[Violation]:
    found = []
    if m.format == "tflite" and p.tflite_ops:
        found += [Violation("op_version", f"op {op} version {v} is newer than {p.name}'s runtime "
                            f"loads (at most version {p.tflite_ops[op]})", info.node_names(op))
                  for op, v in sorted(info.ops.items())
                  if op in p.tflite_ops and v > p.tflite_ops[op]]
    level, needed = p.tflite_op_level, info.min_runtime_version or m.runtime.min_version
    if m.format == "tflite" and level and version_tuple(needed) > version_tuple(level):
        found.append(Violation("runtime_version", f"model needs TFLite runtime >= {needed}; "
                               f"{p.name} has {level}"))
    if m.format == "onnx" and p.max_onnx_opset and (info.opset or 0) > p.max_onnx_opset:
        found.append(Violation("opset", f"model uses ONNX opset {info.opset}; {p.name}'s "
                               f"onnxruntime loads at most {p.max_onnx_opset}"))
    return found
