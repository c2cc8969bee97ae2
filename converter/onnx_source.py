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

__all__ = ["PROTOBUF_LIMIT", "non_numeric_outputs", "onnx_source_bytes"]

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
    external = _external_tensors(proto)
    if not external:
        return path.read_bytes(), False
    return _embedded(proto, path, external), True


def non_numeric_outputs(proto: Any) -> list[tuple[str, str]]:
    """The graph outputs that are not numeric tensors, each as (name, type)."""
    from onnx import TensorProto

    found = []
    for output in proto.graph.output:
        kind = output.type.WhichOneof("value")
        if kind == "tensor_type" and output.type.tensor_type.elem_type != TensorProto.STRING:
            continue
        found.append((output.name, _type_name(output.type)))
    return found


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
        size += int(info.length) if info.length else _tensor_bytes(tensor, file)
    if size > PROTOBUF_LIMIT:
        raise SourceModelError(
            f"{path.name} with its external data holds {size / 2**30:.2f} GiB: above "
            "protobuf's 2 GiB limit, so it cannot be carried in one ONNX file, and a bundle "
            "carries the model as one file",
            hint="make the model smaller in its framework (fewer or smaller weights, or "
                 "float16 weights) so it fits in 2 GiB, then convert it")
    onnx.load_external_data_for_model(proto, str(folder))
    return bytes(proto.SerializeToString())


def _tensor_bytes(tensor: Any, file: Path) -> int:
    """A tensor's bytes from its dims and type; the file's size when its type has no fixed
    width (strings)."""
    from onnx import helper

    try:
        width = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return file.stat().st_size
    return math.prod(tensor.dims) * int(width) if width else file.stat().st_size
