"""The signed bundle of the chosen result: what goes in beside the model (health-check
inputs, drift reference data, the runtime it needs), and the manifest targets are checked
against."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgefleet.agent.protocol.manifest import Manifest, Optimization, RuntimeRequirement
from edgefleet.agent.runtime.base import Array, Runtime
from edgefleet.agent.runtime.inspect import ModelInfo, inspect_model
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter.context import Context
from edgefleet.converter.evaluate import CLASS, fixed_batch
from edgefleet.converter.floatio import input_map, quantize_input
from edgefleet.converter.lineage import lineage_of
from edgefleet.converter.package import PackageSpec, package_bytes, tensor_spec
from edgefleet.converter.report import Attempt

__all__ = ["HEALTH_ROWS", "health_budget", "probe_manifest", "write_bundle"]

ONNX_RUNTIME_FOR_OPSET = {13: "1.7.0", 14: "1.8.0", 15: "1.10.0", 16: "1.11.0", 17: "1.13.0",
                          18: "1.14.0", 19: "1.16.0", 20: "1.17.0", 21: "1.18.0", 22: "1.20.0",
                          23: "1.22.0"}
HEALTH_ATOL = {"none": 1e-4, "fp16": 5e-3, "dynamic": 2e-2, "int8": 2e-2}
HEALTH_ROWS = 8  # health-check inputs in a bundle, at most
HEALTH_MIN_BYTES = 64 * 1024  # what health data may take at least (see health_budget)


def write_bundle(ctx: Context, chosen: Attempt, artifact: bytes) -> None:
    cfg = ctx.config
    info = inspect_model(artifact, cfg.format)
    runtime = load_runtime(artifact, cfg.format, memory_arena=False)  # as in attempt.py
    health = _health_inputs(ctx, runtime, len(artifact))
    spec = PackageSpec(
        cfg.model_name, cfg.version, health,
        task="classification" if ctx.kinds and ctx.kinds[0].kind == CLASS else "other",
        optimization=Optimization(quantization=_quantization_label(ctx, chosen),
                                  sparsity=float(ctx.report.pruning.get("sparsity", 0.0))),
        metrics=ctx.report.metrics(), targets=tuple(p.name for p in ctx.profiles),
        min_runtime_version=_min_runtime(cfg.format, info),
        opset=info.opset if cfg.format == "onnx" else None,
        atol=HEALTH_ATOL.get(chosen.mode, 2e-2),
        lineage=lineage_of(cfg, ctx.report.source_kind), encrypt_for=ctx.recipients,
        **_reference_data(ctx, runtime))
    package_bytes(artifact, cfg.format, cfg.output, spec, ctx.key)
    ctx.report.output = str(cfg.output)
    ctx.report.encrypted_for = sorted({r.key_id for r in ctx.recipients})
    ctx.report.bundle_bytes = cfg.output.stat().st_size


def _quantization_label(ctx: Context, chosen: Attempt) -> str:
    """What the bundle says of its quantization: the recipe's label, or that the source's
    own quantization was kept."""
    return "source (quantized already)" if ctx.report.source_quantized else chosen.label


def _health_inputs(ctx: Context, runtime: Runtime, model_bytes: int) -> dict[str, Array]:
    """The health check's inputs: up to :data:`HEALTH_ROWS` rows, as many as fit in
    :func:`health_budget` with their outputs (one at least, or the model's fixed batch)."""
    feeds = {t.name: quantize_input(ctx.evaluation.inputs[name][:HEALTH_ROWS], t)
             for name, t in input_map(ctx.source.inputs, runtime.inputs).items()}
    per_row = sum(v[:1].nbytes for v in feeds.values()) + \
        sum(o[:1].astype(np.float32).nbytes for o in ctx.source_outputs)
    rows = max(1, fixed_batch(runtime.inputs) or 1,
               min(HEALTH_ROWS, health_budget(model_bytes) // max(per_row, 1)))
    return {name: value[:rows] for name, value in feeds.items()}


def health_budget(model_bytes: int) -> int:
    """Bytes the health data may take in a bundle: a tenth of the model, at least 64 KiB."""
    return max(HEALTH_MIN_BYTES, model_bytes // 10)


def _reference_data(ctx: Context, runtime: Runtime) -> dict[str, Any]:
    """The drift reference's data: the evaluation set (or the calibration set it fell back
    to), as the converted model takes it; none when the data was synthetic."""
    cfg = ctx.config
    if cfg.eval is None and cfg.calibration is None:
        return {"reference_inputs": {}}
    feeds = {t.name: quantize_input(ctx.evaluation.inputs[name], t)
             for name, t in input_map(ctx.source.inputs, runtime.inputs).items()}
    return {"reference_inputs": feeds,
            "reference_source": "eval" if cfg.eval is not None else "calibration"}


def probe_manifest(ctx: Context, runtime: Runtime, info: ModelInfo) -> Manifest:
    return Manifest(schema_version=1, name=ctx.config.model_name, version=ctx.config.version,
                    created="", format=ctx.config.format,
                    runtime=RuntimeRequirement(name="litert" if ctx.config.format == "tflite"
                                               else "onnxruntime",
                                               min_version=_min_runtime(ctx.config.format, info),
                                               opset=info.opset if ctx.config.format == "onnx"
                                               else None),
                    inputs=[tensor_spec(t) for t in runtime.inputs],
                    outputs=[tensor_spec(t) for t in runtime.outputs], files={})


def _min_runtime(fmt: str, info: ModelInfo) -> str:
    if fmt == "tflite":
        return info.min_runtime_version or "0"
    opset = info.opset or 0
    if opset > max(ONNX_RUNTIME_FOR_OPSET):  # newer than this table: at least the release
        # that measured it here (older ones may not know the opset)
        from importlib import metadata

        return metadata.version("onnxruntime")
    return ONNX_RUNTIME_FOR_OPSET.get(opset, "0")
