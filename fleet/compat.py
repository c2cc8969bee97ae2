"""The compatibility gate: can this device load this bundle? (pure; profiles read once)

A device reports the runtimes it has (name -> version) and, optionally, its profile.
A bundle names its runtime and the minimum version that loads its op versions. A
device passes when one of its runtimes for the bundle's format is recent enough and,
if it names a profile, the profile accepts the model (ops, dtypes, size, op versions).
"""

from __future__ import annotations

from functools import lru_cache

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.manifest import Manifest
from edgefleet.agent.runtime.inspect import ModelInfo
from edgefleet.agent.runtime.select import RUNTIMES_BY_FORMAT, tflite_op_level, version_tuple
from edgefleet.devices import DeviceProfile, builtin_profile, check_model
from edgefleet.fleet.domain import Device, ModelVersion

__all__ = ["incompatibility"]


def incompatibility(device: Device, model: ModelVersion, info: ModelInfo | None) -> str | None:
    """Why ``device`` cannot load ``model`` (one sentence), or None when it can."""
    return (_runtime_problem(device, model) or _key_problem(device, model)
            or _profile_problem(device, model, info))


def _key_problem(device: Device, model: ModelVersion) -> str | None:
    """An encrypted model goes only to devices that report a recipient's key id."""
    encryption = model.manifest.get("encryption")
    if not encryption:
        return None
    needed = [str(r["key_id"]) for r in encryption.get("recipients") or []]
    if device.decryption_keys is None:
        return (f"the model is encrypted for key ids {', '.join(needed)} and the device "
                "reports no decryption keys (an agent that predates encrypted bundles)")
    if set(needed) & set(device.decryption_keys):
        return None
    held = ", ".join(device.decryption_keys) or "none"
    return (f"the model is encrypted for key ids {', '.join(needed)}; the device holds {held} "
            "(re-encrypt for its key, or give it one)")


def _runtime_problem(device: Device, model: ModelVersion) -> str | None:
    names = RUNTIMES_BY_FORMAT.get(model.format, [])
    have = {name: version for name, version in device.runtimes.items() if name in names}
    if not have:
        reported = ", ".join(f"{k} {v}" for k, v in sorted(device.runtimes.items())) or "none"
        return f"no runtime for .{model.format} models (it reports: {reported})"
    needed = version_tuple(model.min_runtime_version)
    for name, version in have.items():
        level = tflite_op_level(name, version) if model.format == "tflite" else version
        if version_tuple(level) >= needed:
            return None
    found = ", ".join(f"{k} {v}" for k, v in sorted(have.items()))
    what = "TFLite op level" if model.format == "tflite" else f"{model.runtime}"
    return f"needs {what} >= {model.min_runtime_version}; it has {found}"


def _profile_problem(device: Device, model: ModelVersion, info: ModelInfo | None) -> str | None:
    if not device.profile or info is None:
        return None
    profile = _profile(device.profile)
    if profile is None:
        return None  # an unknown profile name: the runtime check above still holds
    manifest = Manifest.model_validate(model.manifest)
    violations = check_model(profile, manifest, info, _model_size(model))
    return "; ".join(v.message for v in violations) or None


@lru_cache(maxsize=64)
def _profile(name: str) -> DeviceProfile | None:
    try:
        return builtin_profile(name)  # a device's word is a name, never a path here
    except EdgefleetError:
        return None


def _model_size(model: ModelVersion) -> int:
    encryption = model.manifest.get("encryption") or {}
    if "plain_size" in encryption:  # an encrypted model: the size a runtime loads
        return int(encryption["plain_size"])
    files = model.manifest.get("files") or {}
    entry = files.get(f"model.{model.format}") or {}
    return int(entry.get("size", model.size))
