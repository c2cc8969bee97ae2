"""The Open Inference Protocol (KServe v2) infer request, checked at the boundary.

:func:`check_depth` runs on the raw bytes before they are parsed (so parsing can
never recurse deeper than ``limit``); :func:`check_request` runs on the parsed
document before anything reads it. Both raise :class:`RequestError` naming the
field, e.g. ``inputs[0].shape must be a list of integers 0..2147483647, got [-1]``.

The request, as checked::

    {"id": str?, "parameters": $parameters?,
     "inputs": [{"name": str, "shape": [int 0..2^31-1, ...] (rank <= 64),
                 "datatype": one of DATATYPES or "BYTES", "parameters": $parameters?,
                 "data": [...]  (or "parameters": {"binary_data_size": int >= 0})}, ...],
     "outputs": [{"name": str, "parameters": $parameters?}, ...]?}
    $parameters: {str: str | number | bool, ...}

Known parameters have their own types: ``binary_data_size`` (input) a non-negative
integer, ``binary_data`` (output) and ``binary_data_output`` (request) booleans.
Keys the protocol does not name are ignored (extensions may add them).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from edgefleet.agent.serving.errors import RequestError

__all__ = ["KNOWN_DATATYPES", "MAX_DIM", "MAX_RANK", "check_depth", "check_request"]

KNOWN_DATATYPES = frozenset({"FP32", "FP16", "FP64", "INT8", "UINT8", "INT16", "UINT16",
                             "INT32", "UINT32", "INT64", "UINT64", "BOOL", "BYTES"})
MAX_RANK = 64  # numpy's own bound on dimensions
MAX_DIM = 2**31 - 1
_HINT = "send a KServe v2 infer request (GET /v2/models/{name} lists the model's tensors)"
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPEN_CLOSE = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_CHUNK = 1 << 20
_BOOLEAN_PARAMETERS = {"binary_data", "binary_data_output"}


def check_depth(text: bytes, limit: int) -> None:
    """Refuse JSON nested deeper than ``limit`` (arrays and objects), without parsing it."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return  # the common case: too few brackets to nest that deep
    steps = np.frombuffer(_STRINGS.sub(b"", text).translate(_OPEN_CLOSE, _NOT_BRACKETS),
                          np.int8)
    depth = 0
    for start in range(0, len(steps), _CHUNK):
        levels = np.cumsum(steps[start:start + _CHUNK], dtype=np.int32) + depth
        if int(levels.max()) > limit:
            raise RequestError(f"JSON nested deeper than {limit} levels", hint=_HINT)
        depth = int(levels[-1])


def check_request(doc: Any) -> dict[str, Any]:
    """``doc`` if it is an infer request of the protocol's shape; else the first wrong field."""
    if not isinstance(doc, dict):
        raise RequestError(f"request must be a JSON object, got {_kind(doc)}", hint=_HINT)
    _optional_str(doc, "id", "id")
    _parameters(doc.get("parameters"), "parameters")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise RequestError(f"inputs must be a list of tensors, got {_kind(inputs)}", hint=_HINT)
    names: dict[str, int] = {}
    for index, item in enumerate(inputs):
        name = _input(item, f"inputs[{index}]")
        if names.setdefault(name, index) != index:
            raise RequestError(f"inputs[{index}].name {name!r} repeats inputs[{names[name]}]")
    _outputs(doc.get("outputs"))
    return doc


def _input(item: Any, where: str) -> str:
    _object(item, where)
    name = _name(item, where)
    _shape(item.get("shape"), f"{where}.shape")
    datatype = item.get("datatype")
    if datatype not in KNOWN_DATATYPES:
        raise RequestError(f"{where}.datatype must be one of {sorted(KNOWN_DATATYPES)}, "
                           f"got {_short(datatype)}", hint=_HINT)
    binary = _parameters(item.get("parameters"), f"{where}.parameters").get("binary_data_size")
    if binary is not None and "data" in item:
        raise RequestError(f"{where} has both data and parameters.binary_data_size",
                           hint="send the tensor once: in JSON or as binary data")
    if binary is None and not isinstance(item.get("data"), list):
        raise RequestError(f"{where}.data must be a list of values (or give "
                           f"parameters.binary_data_size), got {_kind(item.get('data'))}",
                           hint="send the values flat or nested in 'data'")
    return name


def _outputs(outputs: Any) -> None:
    if outputs is None:
        return
    if not isinstance(outputs, list):
        raise RequestError(f"outputs must be a list of objects, got {_kind(outputs)}", hint=_HINT)
    for index, item in enumerate(outputs):
        where = f"outputs[{index}]"
        _object(item, where)
        _name(item, where)
        _parameters(item.get("parameters"), f"{where}.parameters")


def _shape(shape: Any, where: str) -> None:
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        raise RequestError(f"{where} must be a list of at most {MAX_RANK} integers "
                           f"0..{MAX_DIM}, got {_short(shape)}", hint=_HINT)


def _parameters(params: Any, where: str) -> dict[str, Any]:
    if params is None:
        return {}
    checked = _object(params, where)
    for key, value in checked.items():
        if not isinstance(value, str | int | float):  # bool is an int
            raise RequestError(f"{where}.{key[:60]} must be a string, number or boolean, "
                               f"got {_kind(value)}", hint=_HINT)
        if key in _BOOLEAN_PARAMETERS and type(value) is not bool:
            raise RequestError(f"{where}.{key} must be true or false, got {_short(value)}")
    size = checked.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise RequestError(f"{where}.binary_data_size must be a byte count (an integer "
                           f">= 0), got {_short(size)}")
    return checked


def _name(item: dict[str, Any], where: str) -> str:
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.name must be a non-empty string, got {_short(name)}",
                           hint=_HINT)
    return name


def _optional_str(doc: dict[str, Any], key: str, where: str) -> None:
    if key in doc and not isinstance(doc[key], str):
        raise RequestError(f"{where} must be a string, got {_kind(doc[key])}", hint=_HINT)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be a JSON object, got {_kind(value)}", hint=_HINT)
    return value


def _kind(value: Any) -> str:
    """The JSON type of ``value``, as a message names it."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    """``value`` for a message: its JSON type, and its text when that is short."""
    text = repr(value)
    return f"{_kind(value)} {text}" if value is not None and len(text) <= 60 else _kind(value)
