"""Fixed input shapes: ``--input-shape NAME=1x3x320x320`` and ``--input-size 320x320``.

A dynamic height or width (detectors, OCR) is fixed to the deployment size given, so
calibration and evaluation run at that size and the ONNX artifact's dims are static.
The batch dimension stays as the source has it (a runtime may still batch). A TFLite
source's input shapes are static already: a requested shape must match them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from edgefleet.agent.runtime.base import TensorInfo
from edgefleet.converter.config import MAX_INPUT_NUMBERS, MAX_SIDE
from edgefleet.converter.errors import DataError, UnsupportedPathError

__all__ = ["batch_not_first", "check_declared", "dynamic_image_inputs", "fix_inputs",
           "static_onnx"]

BATCH_NAMES = {"n", "b", "bs", "batch", "batch_size", "batchsize", "batch_dim", "nbatch",
               "num_batch", "batches"}  # how exporters name a batch dim


def fix_inputs(inputs: Sequence[TensorInfo], shapes: Sequence[tuple[str, tuple[int, ...]]],
               size: tuple[int, int] | None) -> list[TensorInfo]:
    """``inputs`` with the requested shapes; refuses names, ranks or dims that do not fit."""
    wanted = dict(shapes)
    unknown = sorted(set(wanted) - {i.name for i in inputs})
    if unknown:
        raise DataError(f"--input-shape names {unknown}, the model's inputs are "
                        f"{[i.name for i in inputs]}", hint="use NAME=DIMS with an input's name")
    if size is not None:
        wanted.update(_sized(inputs, size))
    fixed = [_fixed(i, wanted[i.name]) if i.name in wanted else i for i in inputs]
    for spec in fixed:
        if spec.name in wanted:
            _bounded(spec, "--input-size" if size is not None else "--input-shape")
    check_declared(fixed)
    return fixed


def _bounded(spec: TensorInfo, option: str) -> None:
    """An input fixed by an option holds at most :data:`MAX_INPUT_NUMBERS` a call: its
    channels and a fixed batch count (a dynamic batch counts one sample)."""
    dims = [d if d > 0 else 1 for d in spec.shape]
    numbers = math.prod(dims)
    if numbers > MAX_INPUT_NUMBERS:
        raise DataError(f"{option}: input {spec.name!r} would be {dims} = {numbers:,} numbers "
                        f"a call ({numbers * 4 / 2**30:.1f} GiB of float32 each, and "
                        f"calibration holds many), above the {MAX_INPUT_NUMBERS:,} taken",
                        hint=f"give the deployment size: at most {MAX_SIDE} a side and "
                             f"{MAX_INPUT_NUMBERS:,} numbers with channels and batch "
                             "(e.g. --input-size 2048x2048 for 3 channels)")


def _sized(inputs: Sequence[TensorInfo], size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    images = [i for i in inputs if len(i.shape) == 4]
    if len(images) != 1:
        raise DataError(f"--input-size needs one image input (4 dims), the model has "
                        f"{[(i.name, list(i.shape)) for i in inputs]}",
                        hint="use --input-shape NAME=DIMS for each input")
    spec = images[0]
    height, width = size
    batch = spec.shape[0] if spec.shape[0] > 0 else 1
    nchw = spec.shape[1] in (1, 3, 4) and spec.shape[3] not in (1, 3, 4)
    shape = (batch, spec.shape[1], height, width) if nchw else \
        (batch, height, width, spec.shape[3])
    return {spec.name: shape}


def _fixed(spec: TensorInfo, shape: tuple[int, ...]) -> TensorInfo:
    if len(shape) != len(spec.shape):
        raise DataError(f"input {spec.name!r} has {len(spec.shape)} dims {list(spec.shape)}, "
                        f"given {list(shape)}", hint="give every dim, batch first")
    clash = [i for i, (s, g) in enumerate(zip(spec.shape, shape, strict=True))
             if i > 0 and s > 0 and s != g]
    if clash:
        raise DataError(f"input {spec.name!r} has fixed dims {list(spec.shape)}; given "
                        f"{list(shape)} differs at dim {clash[0]}",
                        hint="only dynamic dims (-1) can be fixed")
    batch = spec.shape[0]  # stays as the source has it
    return replace(spec, shape=(batch, *shape[1:]))


def dynamic_image_inputs(inputs: Sequence[TensorInfo]) -> list[str]:
    """Names of 4-dim inputs whose height or width is still dynamic."""
    return [i.name for i in inputs if len(i.shape) == 4 and any(d < 0 for d in i.shape[1:])]


def static_onnx(model: bytes, inputs: Sequence[TensorInfo]) -> bytes:
    """``model`` with the given inputs' non-batch dims written as static values."""
    import onnx

    proto = onnx.load_model_from_string(model)
    shapes = {i.name: i.shape for i in inputs}
    changed = False
    for graph_input in proto.graph.input:
        shape = shapes.get(graph_input.name)
        if shape is None:
            continue
        for index, dim in enumerate(graph_input.type.tensor_type.shape.dim):
            if index > 0 and shape[index] > 0 and not dim.HasField("dim_value"):
                dim.dim_value, changed = shape[index], True
    return bytes(proto.SerializeToString()) if changed else model


def batch_not_first(model: bytes) -> list[tuple[str, list[str]]]:
    """ONNX inputs whose dims name the batch somewhere other than first (a time-major LSTM's
    ``[seq, batch, 16]``): the converter feeds samples along dim 0, which would then be the
    sequence. Each as (name, dims as named or sized)."""
    import onnx

    graph = onnx.load_model_from_string(model).graph
    weights = {t.name for t in graph.initializer}
    found = []
    for graph_input in graph.input:
        if graph_input.name in weights:
            continue
        dims = [d.dim_param or str(d.dim_value) for d in graph_input.type.tensor_type.shape.dim]
        named = [d.lower() for d in dims]
        if dims and named[0] not in BATCH_NAMES and any(d in BATCH_NAMES for d in named[1:]):
            found.append((graph_input.name, dims))
    return found


def check_declared(inputs: Sequence[TensorInfo]) -> None:
    """The inputs' dims as the model declares them (after ``--input-shape``) are ones
    edgefleet can feed, else refused before any work, naming the input and its dims: a
    leading batch dim (dynamic, or fixed, and the same on every input), no dim of size 0,
    and at most :data:`MAX_INPUT_NUMBERS` numbers a call (a dynamic dim counts one)."""
    for spec in inputs:
        _declared(spec)
    leading = {spec.name: spec.shape[0] for spec in inputs}
    if len(set(leading.values())) > 1:
        said = ", ".join(f"{name!r} {d if d > 0 else 'N (dynamic)'}"
                         for name, d in leading.items())
        raise UnsupportedPathError(
            f"the inputs have different leading (batch) dims: {said}; edgefleet feeds every "
            "input the same batch of samples a call",
            hint="export the model with one batch on every input: all dynamic (N), or all "
                 "fixed at the same size")


def _declared(spec: TensorInfo) -> None:
    dims = list(spec.shape)
    needs = "edgefleet feeds samples along a leading batch dim (dynamic, or a fixed batch)"
    if not dims:
        raise UnsupportedPathError(
            f"input {spec.name!r} is a single number (rank 0, dims []): {needs}",
            hint="export the model with a batch dim on the input: [N] for one number a sample")
    if len(dims) == 1 and dims[0] > 1:
        raise UnsupportedPathError(
            f"input {spec.name!r} has dims {dims}: one dim, fixed at {dims[0]}, so no batch "
            f"dim before a sample's {dims[0]} numbers; {needs}",
            hint=f"export the model with a batch dim first: [N, {dims[0]}] (dynamic) or "
                 f"[1, {dims[0]}]")
    if 0 in dims:
        raise UnsupportedPathError(
            f"input {spec.name!r} has dims {dims}: dim {dims.index(0)} is 0, so the input "
            "holds no numbers and cannot be fed or measured",
            hint="export the model with that dim at its real size, or dynamic")
    numbers = math.prod(d if d > 0 else 1 for d in dims)
    if numbers > MAX_INPUT_NUMBERS:
        raise UnsupportedPathError(
            f"input {spec.name!r} declares dims {dims} = {numbers:,} numbers a call "
            f"({numbers * 4 / 2**30:,.1f} GiB of float32), above the {MAX_INPUT_NUMBERS:,} "
            "edgefleet takes an input a call",
            hint="export the model at its deployment size: at most "
                 f"{MAX_INPUT_NUMBERS:,} numbers an input, a fixed batch included (a dynamic "
                 "dim counts one)")
