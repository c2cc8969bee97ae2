"""Compare two bundles: sizes, ops, quantization, tensors, metrics, lineage, and outputs.

Used by ``edgefleet diff``. Both bundles are opened for inspection (integrity checked,
signature not required: compare before you trust); an encrypted model is decrypted in
memory when a key is given, otherwise everything but op-level information and output
agreement is still compared. Agreement runs both models on the same float inputs
(``--data``, else the bundles' own health inputs when the input shapes match): top-1
agreement for classifiers, cosine similarity and max abs error per output, and accuracy
of each when the data has labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.protocol.bundle import Bundle, inspect_bundle
from edgefleet.agent.protocol.encryption import DecryptionKeys, NoDecryptionKeyError, decrypt_model
from edgefleet.agent.protocol.health import HealthData
from edgefleet.agent.protocol.manifest import Manifest, TensorSpec
from edgefleet.agent.runtime.base import Array, TensorInfo
from edgefleet.agent.runtime.inspect import ModelInfo, inspect_model
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter.config import Scale
from edgefleet.converter.data import Dataset, load_dataset
from edgefleet.converter.evaluate import (
    CLASS,
    accuracy,
    agreement,
    batch_size,
    output_kinds,
    run_batched,
)
from edgefleet.converter.floatio import float_predict, input_map

__all__ = ["Side", "diff_bundles", "open_side"]

# Lists in metrics and lineage are shown whole only when short (cosine per output...).
_SHORT_LIST = 4


@dataclass(frozen=True)
class Side:
    """One bundle of the comparison: where it came from, its bytes, its model if readable."""

    label: str
    file_size: int
    bundle: Bundle
    info: ModelInfo | None
    sealed: str | None = None  # why the model could not be read (encrypted, no key)

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest


def open_side(label: str, raw: bytes, keys: DecryptionKeys | None = None) -> Side:
    """Inspect ``raw``; decrypt in memory when ``keys`` hold a recipient's key."""
    bundle = inspect_bundle(raw)
    sealed = None
    if bundle.encrypted:
        try:
            plain = decrypt_model(bundle.files[bundle.manifest.model_file], bundle.manifest,
                                  keys or DecryptionKeys())
            bundle = replace(bundle, plain_model=plain)
        except NoDecryptionKeyError as exc:
            sealed = f"{exc.message} ({exc.hint})"
    info = inspect_model(bundle.model_bytes, bundle.manifest.format) if sealed is None else None
    return Side(label, len(raw), bundle, info, sealed)


def diff_bundles(a: Side, b: Side, data: Path | None = None, scale: Scale = "0-1"
                 ) -> dict[str, Any]:
    """Everything that differs between ``a`` and ``b`` (and what is the same), JSON-ready."""
    return {
        "a": _summary(a), "b": _summary(b),
        "sizes": _sizes(a, b),
        "ops": _ops(a, b),
        "quantization": _quantization(a, b),
        "tensors": _tensors(a, b),
        "metrics": _paired(_flat(a.manifest.metrics), _flat(b.manifest.metrics),
                           "metric", changed_only=False),
        "lineage": _lineage(a, b),
        "agreement": _agreement(a, b, data, scale),
    }


def _summary(side: Side) -> dict[str, Any]:
    m = side.manifest
    return {"ref": side.label, "bundle": m.ref, "sha256": side.bundle.sha256, "format": m.format,
            "runtime": f"{m.runtime.name} >= {m.runtime.min_version}", "task": m.task,
            "created": m.created,
            "encrypted_for": m.encryption.key_ids if m.encryption else [],
            "model_readable": side.sealed is None, "sealed": side.sealed}


def _delta(a: Any, b: Any) -> Any:
    if _number(a) and _number(b):
        return round(float(b) - float(a), 6)
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sizes(a: Side, b: Side) -> list[dict[str, Any]]:
    rows = [("bundle file", a.file_size, b.file_size),
            ("model", a.manifest.model_size, b.manifest.model_size)]
    return [{"what": what, "a": x, "b": y, "delta": y - x,
             "ratio": round(y / x, 4) if x else None} for what, x, y in rows]


def _ops(a: Side, b: Side) -> dict[str, Any]:
    if a.info is None or b.info is None:
        which = [s.label for s in (a, b) if s.info is None]
        return {"rows": [], "skipped": f"encrypted without a key: {', '.join(which)}; pass "
                                       "--decrypt-key NAME.x25519 for op-level information"}
    counts_a, counts_b = _op_counts(a.info), _op_counts(b.info)
    rows = []
    for op in sorted(set(counts_a) | set(counts_b)):
        ca, cb = counts_a.get(op, 0), counts_b.get(op, 0)
        rows.append({"op": op, "a": ca, "b": cb, "delta": cb - ca,
                     "a_version": a.info.ops.get(op), "b_version": b.info.ops.get(op)})
    total_a, total_b = sum(counts_a.values()), sum(counts_b.values())
    return {"rows": rows, "total": {"a": total_a, "b": total_b, "delta": total_b - total_a},
            "skipped": None}


def _op_counts(info: ModelInfo) -> dict[str, int]:
    return {op: len(info.nodes.get(op, [])) for op in info.ops}


def _quantization(a: Side, b: Side) -> list[dict[str, Any]]:
    def dtypes(side: Side) -> str | None:
        return ", ".join(sorted(side.info.dtypes)) if side.info is not None else None

    pairs = [("mode", a.manifest.optimization.quantization, b.manifest.optimization.quantization),
             ("sparsity", a.manifest.optimization.sparsity, b.manifest.optimization.sparsity),
             ("tensor dtypes", dtypes(a), dtypes(b))]
    return [{"field": f, "a": x, "b": y, "same": x == y} for f, x, y in pairs]


def _tensor_text(spec: TensorSpec | None) -> str | None:
    if spec is None:
        return None
    text = f"{spec.name} {spec.shape} {spec.dtype}"
    q = spec.quantization
    if q is not None:
        scale = q.scale[0] if len(q.scale) == 1 else f"{len(q.scale)} scales"
        zero = q.zero_point[0] if len(q.zero_point) == 1 else "per-axis"
        text += f" (scale {scale}, zero point {zero})"
    return text


def _tensors(a: Side, b: Side) -> list[dict[str, Any]]:
    rows = []
    for kind, xs, ys in (("input", a.manifest.inputs, b.manifest.inputs),
                         ("output", a.manifest.outputs, b.manifest.outputs)):
        for i, (x, y) in enumerate(zip_longest(xs, ys)):
            ta, tb = _tensor_text(x), _tensor_text(y)
            rows.append({"tensor": f"{kind} {i}", "a": ta, "b": tb, "same": ta == tb})
    return rows


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; scalars and short lists kept, long lists left out."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, list):
            if len(value) <= _SHORT_LIST and all(not isinstance(v, dict | list) for v in value):
                out[name] = value
        else:
            out[name] = value
    return out


def _paired(a: dict[str, Any], b: dict[str, Any], column: str, *,
            changed_only: bool) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if (changed_only and x == y) or (_empty(x) and _empty(y)):
            continue
        rows.append({column: key, "a": x, "b": y, "delta": _delta(x, y)})
    return rows


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == ""


def _lineage(a: Side, b: Side) -> dict[str, Any]:
    la, lb = a.manifest.lineage, b.manifest.lineage
    missing = [s.label for s, lin in ((a, la), (b, lb)) if lin is None]
    flat_a = _flat(la.model_dump(mode="json")) if la else {}
    flat_b = _flat(lb.model_dump(mode="json")) if lb else {}
    same = None if la is None or lb is None else la.source.sha256 == lb.source.sha256
    return {"same_source": same,
            "missing": missing,
            "differences": [] if missing else _paired(flat_a, flat_b, "field",
                                                      changed_only=True)}


# --- agreement --------------------------------------------------------------------------

def _float_specs(specs: list[TensorSpec]) -> list[TensorInfo]:
    """The inputs as a float reference sees them (quantized int8 inputs become float32)."""
    return [TensorInfo(s.name, tuple(s.shape), "float32" if _quantized(s) else s.dtype)
            for s in specs]


def _quantized(spec: TensorSpec) -> bool:
    return spec.quantization is not None and spec.dtype in ("int8", "uint8")


def _agreement(a: Side, b: Side, data: Path | None, scale: Scale) -> dict[str, Any]:
    if a.sealed is not None or b.sealed is not None:
        return {"skipped": "a model is encrypted and no key opens it; pass --decrypt-key"}
    reference = _float_specs(a.manifest.inputs)
    mismatch = _shape_mismatch(reference, _float_specs(b.manifest.inputs))
    if mismatch:
        return {"skipped": mismatch}
    dataset, source = (load_dataset(data, reference, scale), str(data)) if data else (
        _health_inputs(a, b, reference), "health inputs of the bundles")
    runtime_a = load_runtime(a.bundle.model_bytes, a.manifest.format)
    runtime_b = load_runtime(b.bundle.model_bytes, b.manifest.format)
    try:
        batch = min(batch_size(runtime_a.inputs, dataset), batch_size(runtime_b.inputs, dataset))
        outs_a = run_batched(float_predict(runtime_a, reference), dataset, batch)
        outs_b = run_batched(float_predict(runtime_b, reference), dataset, batch)
    finally:
        runtime_a.close()
        runtime_b.close()
    kinds = output_kinds(outs_a, labels=dataset.labels is not None)
    found = agreement(outs_a, outs_b, kinds=kinds).as_dict()
    classifier = kinds[0].kind == CLASS
    result: dict[str, Any] = {"data": source, "samples": len(dataset), **found,
                              "classifier": classifier, "skipped": None}
    if dataset.labels is not None and classifier:
        result["accuracy_a"] = round(accuracy(outs_a, dataset.labels), 6)
        result["accuracy_b"] = round(accuracy(outs_b, dataset.labels), 6)
    return result


def _shape_mismatch(a: list[TensorInfo], b: list[TensorInfo]) -> str | None:
    if len(a) != len(b):
        return f"the bundles take {len(a)} and {len(b)} inputs: nothing to run both on"
    matched = input_map(a, b)
    for ref in a:
        other = matched[ref.name]
        if not _fits(ref.shape, other.shape):
            return (f"input shapes differ ({ref.name} {list(ref.shape)} vs {other.name} "
                    f"{list(other.shape)}): no common data to compare outputs on")
    return None


def _fits(x: tuple[int, ...], y: tuple[int, ...]) -> bool:
    """Same rank and the same sizes after the batch dimension (-1 fits anything)."""
    return len(x) == len(y) and all(p == q or -1 in (p, q)
                                    for p, q in zip(x[1:], y[1:], strict=True))


def _health_inputs(a: Side, b: Side, reference: list[TensorInfo]) -> Dataset:
    """A's health inputs, plus B's when they are other rows, as float arrays."""
    parts = [_health_of(a, reference)]
    other = _health_of(b, reference)
    if any(not np.array_equal(parts[0][k], other[k]) for k in parts[0]):
        parts.append(other)
    return Dataset({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def _health_of(side: Side, reference: list[TensorInfo]) -> dict[str, Array]:
    health = HealthData.from_bytes(side.bundle.health_bytes)
    specs = {s.name: s for s in side.manifest.inputs}
    by_ref = input_map(reference, [TensorInfo(s.name, tuple(s.shape), s.dtype)
                                   for s in side.manifest.inputs])
    out = {}
    for ref_name, spec in by_ref.items():
        out[ref_name] = _dequantized(health.inputs[spec.name], specs[spec.name])
    return out


def _dequantized(value: Array, spec: TensorSpec) -> Array:
    q = spec.quantization
    if q is None or not _quantized(spec):
        return np.asarray(value, dtype=np.float32)
    return ((value.astype(np.float32) - q.zero_point[0]) * q.scale[0]).astype(np.float32)
