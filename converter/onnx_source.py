"""An ONNX source read and checked before any work is done.

- outputs that are not numeric tensors (a ``tensor(string)`` from a Cast, scikit-learn's
  ZipMap ``sequence<map<int64,float>>``) are refused naming the output, its type and the
  fix: edgefleet measures and compares outputs number by number, and bundles them as such;
- weights kept as external data (``onnx.save(..., save_as_external_data=True)``, a
  ``model.onnx`` next to its ``model.onnx.data``) are read from the model's own folder and
  carried inside the model, so the bundle holds one self-contained file; a model that
  would exceed protobuf's 2 GiB limit that way is refused naming its size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgefleet.converter.errors import SourceModelError

__all__ = ["PROTOBUF_LIMIT", "external_data_files", "non_numeric_outputs", "onnx_source_bytes",
           "unfed_inputs"]

PROTOBUF_LIMIT = (1 << 31) - 1  # the largest protobuf message: one ONNX file, weights inside


def onnx_source_bytes(path: Path) -> tuple[bytes, bool]:
    """The model's bytes, with any external data read in, and whether there was any. A
    file that does not parse is left to the runtime, whose refusal says why (cut short)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError, onnx's own: not a whole model
        return path.read_bytes(), False
    _refuse_non_numeric(proto, path)
    _refuse_unfed_inputs(proto, path)
    external = _external_tensors(proto)
    if not external:
        return path.read_bytes(), False
    return _embedded(proto, path, external), True


# element types numpy (and so ONNX Runtime's Python API, and edgefleet) cannot hold
UNHELD = frozenset({"STRING", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                    "FLOAT8E5M2FNUZ", "UINT4", "INT4", "FLOAT4E2M1", "COMPLEX64",
                    "COMPLEX128"})


def _held(value: Any) -> bool:
    """A tensor type numpy holds; an output of no declared type is left to the runtime
    (ONNX Runtime infers it)."""
    from onnx import TensorProto

    kind = value.WhichOneof("value")
    if kind is None:
        return True
    if kind != "tensor_type":
        return False
    elem = value.tensor_type.elem_type
    return elem == TensorProto.UNDEFINED or \
        TensorProto.DataType.Name(elem) not in UNHELD


def non_numeric_outputs(proto: Any) -> list[tuple[str, str]]:
    """The graph outputs that are not numeric tensors numpy holds, each as (name, type)."""
    return [(o.name, _type_name(o.type)) for o in proto.graph.output if not _held(o.type)]


def unfed_inputs(proto: Any) -> list[tuple[str, str]]:
    """The graph inputs (not initializers) of a type edgefleet cannot feed."""
    weights = {t.name for t in proto.graph.initializer}
    return [(i.name, _type_name(i.type)) for i in proto.graph.input
            if i.name not in weights and not _held(i.type)]


def _refuse_unfed_inputs(proto: Any, path: Path) -> None:
    found = unfed_inputs(proto)
    if found:
        described = ", ".join(f"{name!r} is {kind}" for name, kind in found)
        raise SourceModelError(
            f"{path.name}: input {described}: edgefleet feeds numeric tensors numpy holds "
            "(float, integer, bool), for calibration, evaluation and on the device",
            hint="export the model with a float or integer input (cast inside the graph)")


def external_data_files(path: Path) -> list[Path]:
    """The files an ONNX model at ``path`` keeps weights in (none for another format or a
    file that does not parse): read by a conversion, so never its output."""
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return []
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a whole model: the runtime says why, later
        return []
    places = {ExternalDataInfo(t).location for t in _external_tensors(proto)}
    return [path.parent / place for place in sorted(places) if place]


def _type_name(value: Any, nested: bool = False) -> str:
    """``tensor(string)``, ``sequence<map<int64,float>>``: a tensor inside another type is
    named by its element type."""
    from onnx import TensorProto

    kind = value.WhichOneof("value")
    if kind == "tensor_type":
        elem = TensorProto.DataType.Name(value.tensor_type.elem_type).lower()
        return elem if nested else f"tensor({elem})"
    if kind == "sparse_tensor_type":
        return "sparse_tensor(" + \
            f"{TensorProto.DataType.Name(value.sparse_tensor_type.elem_type).lower()})"
    if kind == "sequence_type":
        return f"sequence<{_type_name(value.sequence_type.elem_type, True)}>"
    if kind == "optional_type":
        return f"optional<{_type_name(value.optional_type.elem_type, True)}>"
    if kind == "map_type":
        key = TensorProto.DataType.Name(value.map_type.key_type).lower()
        return f"map<{key},{_type_name(value.map_type.value_type, True)}>"
    return kind or "an undeclared type"


def _refuse_non_numeric(proto: Any, path: Path) -> None:
    found = non_numeric_outputs(proto)
    if not found:
        return
    described = ", ".join(f"{name!r} is {kind}" for name, kind in found)
    made_by = {out: node.op_type for node in proto.graph.node for out in node.output}
    zipmap = [name for name, _ in found if made_by.get(name) == "ZipMap"]
    names = ", ".join(repr(name) for name, _ in found)
    hint = (f"remove {names} from the graph's outputs (del model.graph.output[i], then "
            "onnx.save) and convert again")
    if zipmap:
        hint = ("export the classifier without ZipMap: skl2onnx's to_onnx(clf, ..., "
                "options={id(clf): {'zipmap': False}}) gives the probabilities as a float "
                f"tensor; or {hint}")
    raise SourceModelError(
        f"{path.name}: output {described}: edgefleet takes numeric tensor outputs only "
        "(it measures and compares each output number by number, and bundles them so)",
        hint=hint)


def _external_tensors(proto: Any) -> list[Any]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(proto) if uses_external_data(t)]


def _embedded(proto: Any, path: Path, external: list[Any]) -> bytes:
    """``proto`` with its external data read from the model's folder, serialized whole."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    folder = path.parent
    size = proto.ByteSize()
    for tensor in external:
        info = ExternalDataInfo(tensor)
        file = folder / info.location
        if not info.location or Path(info.location).is_absolute() or \
                not file.resolve().is_relative_to(folder.resolve()) or not file.is_file():
            raise SourceModelError(
                f"{path.name} keeps its weights as external data in {info.location!r}, "
                f"which is not a file in {folder} (tensor {tensor.name!r})",
                hint=f"put {info.location} next to {path.name}, as onnx.save wrote it, or save "
                     "the model with its weights inside: onnx.save(onnx.load(PATH), PATH, "
                     "save_as_external_data=False)")
        size += _extent(tensor, info, file, path)
    if size > PROTOBUF_LIMIT:
        raise SourceModelError(
            f"{path.name} with its external data holds {size / 2**30:.2f} GiB: above "
            "protobuf's 2 GiB limit, so it cannot be carried in one ONNX file, and a bundle "
            "carries the model as one file",
            hint="make the model smaller in its framework (fewer or smaller weights, or "
                 "float16 weights) so it fits in 2 GiB, then convert it")
    onnx.load_external_data_for_model(proto, str(folder))
    return bytes(proto.SerializeToString())


def _extent(tensor: Any, info: Any, file: Path, path: Path) -> int:
    """The bytes the load will read for ``tensor``: its ``length``, else the rest of the
    file after its offset (onnx reads it whole), which must be what its dims say."""
    if info.length:
        return int(info.length)
    rest = file.stat().st_size - int(info.offset or 0)
    declared = _tensor_bytes(tensor, file)
    if rest != declared:
        raise SourceModelError(
            f"{path.name}: tensor {tensor.name!r} declares {declared:,} bytes of external "
            f"data with no length, and {info.location} holds {rest:,} after its offset (all "
            "of which would be read)",
            hint="save the model again with onnx.save(..., save_as_external_data=True), "
                 "which writes each tensor's offset and length")
    return rest


def _tensor_bytes(tensor: Any, file: Path) -> int:
    """A tensor's bytes from its dims and type; the file's size when its type has no fixed
    width (strings)."""
    from onnx import helper

    try:
        width = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return file.stat().st_size
    return math.prod(tensor.dims) * int(width) if width else file.stat().st_size
