"""Third-party failures, translated once into converter errors whose hints are true.

- the TFLite converter stopping on TensorFlow ops that have no TFLite builtin (a Keras
  LSTM's TensorList loop, say): names the ops and the path that converts them;
- a runtime refusing a model for a custom operator it has no kernel for: names the
  operator, and says that no device runtime will have it either;
- a runtime refusing a converted result: names the runtime and the recipe that wrote it;
- a source that does not load (:func:`source_unreadable`): a Keras Lambda layer (code that
  safe mode does not load), a file cut short, a graph without inputs, each with its fix;
- an ONNX graph ONNX Runtime's float16 and quantization tools do not handle
  (:func:`onnx_graph_fault`: an input listed as an output too).

Third-party exception text goes through :func:`exception_text` (or :func:`first_lines`)
before it is put in a message: TensorFlow colours its errors with ANSI escape codes.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from edgefleet.converter.errors import ConversionFailedError, SourceModelError

__all__ = ["custom_ops", "exception_text", "first_lines", "onnx_graph_fault", "out_of_memory",
           "result_refused", "source_refused", "source_unreadable", "tflite_conversion"]

_TF_OP = re.compile(r"'tf\.(\w+)' op")
_FLEX = re.compile(r"Flex(\w+)")
_CUSTOM = re.compile(r"unresolved custom op: (\w+)")
_AGENT_HINT = re.compile(r"\s*\((?:convert|upgrade|check)[^)]*\)")  # the agent's own hints
# the hints of agent.runtime.onnx.load_hint, the last parenthesis of the line
_ORT_HINT = re.compile(r"\s*\((?:re-export the model|ONNX Runtime says)\b.*\)\s*$")
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
_CUT_SHORT = re.compile(r"protobuf parsing failed|INVALID_PROTOBUF|not a valid Flatbuffer|"
                        r"truncated|file signature not found|not a zip file|"
                        r"accessible `\.keras` zip file", re.IGNORECASE)
_LAMBDA = re.compile(r"`Lambda` layer|Lambda.*safe_mode", re.DOTALL)
_NO_MEMORY = re.compile(r"Unable to allocate|Failed to allocate memory|BFCArena|bad_alloc|"
                        r"out of memory", re.IGNORECASE)
_NO_FLEX = ("select TensorFlow ops (Flex) are not used: LiteRT on a device does not carry "
            "them")


def exception_text(exc: BaseException) -> str:
    """``str(exc)`` without ANSI escape codes (TensorFlow's bold and colours)."""
    return _ANSI.sub("", str(exc))


def first_lines(exc: BaseException, count: int = 1, limit: int = 300) -> str:
    """The first ``count`` non-empty lines of the exception's text (no ANSI codes), joined
    by a space and cut at ``limit`` characters; the exception's type when it says nothing."""
    lines = [line.strip() for line in exception_text(exc).splitlines() if line.strip()]
    return " ".join(lines[:count])[:limit] or type(exc).__name__


def tflite_conversion(mode: str, exc: Exception) -> ConversionFailedError:
    """The TFLite converter's failure: TensorFlow ops without a builtin by name, else the
    converter's first line."""
    text = exception_text(exc)
    ops = sorted(set(_TF_OP.findall(text)) | set(_FLEX.findall(text)))
    if not ops:
        first = first_lines(exc)
        return ConversionFailedError(f"TFLite conversion ({mode}) failed: {first}",
                                     hint="check the model's ops are TFLite builtins, or "
                                          "use --format onnx")
    loop = " (a Keras RNN / LSTM loop)" if any(o.startswith("TensorList") for o in ops) else ""
    return ConversionFailedError(
        f"TFLite conversion ({mode}) failed: the TensorFlow ops {', '.join(ops[:6])}{loop} "
        f"have no TFLite builtin, and {_NO_FLEX}",
        hint="use --format onnx (ONNX Runtime runs these ops)" + (
            ", or build the layer with unroll=True at a fixed sequence length" if loop else ""))


def custom_ops(text: str) -> list[str]:
    """Custom operators a runtime's load error names as unresolved."""
    return sorted(set(_CUSTOM.findall(text)))


def source_refused(name: str, exc: Exception) -> SourceModelError | None:
    """A source that LiteRT cannot load for a custom operator; None for other failures."""
    ops = custom_ops(str(exc))
    if not ops:
        return None
    return SourceModelError(
        f"{name} uses the custom operator {', '.join(ops)}, which LiteRT has no kernel for: "
        "neither the host nor a device runtime loads it, whatever its version",
        hint="use a variant of the model built from builtin operators only (re-export it "
             "from its framework without the custom op); upgrading the runtime does not "
             "add it")


def result_refused(label: str, recipe: str, runtime: str, exc: Exception,
                   fault: str = "") -> ConversionFailedError:
    """A converted result the device runtime refuses to load: a row, never a result.
    ``fault``: what is wrong with the graph, when known (:func:`onnx_graph_fault`); else
    the hint is empty and the attempt says which options remain."""
    ops = custom_ops(str(exc))
    if ops:
        return ConversionFailedError(
            f"{runtime} cannot load the model of {label}: it has no kernel for the custom "
            f"operator {', '.join(ops)}", hint="use another --quantize recipe")
    text = _ANSI.sub("", _AGENT_HINT.sub("", getattr(exc, "message", str(exc)))).strip()
    first = _ORT_HINT.sub("", text.splitlines()[0])[:300] if text else repr(exc)
    return ConversionFailedError(
        f"{runtime} cannot load the model of {label} ({recipe}), or run it: {first}",
        hint=fault)


def onnx_graph_fault(model: bytes) -> str:
    """A hint for an ONNX graph that ONNX Runtime's float16 converter and quantizer do not
    handle (their results fail with "Duplicate definition of name", "Graph is not a DAG"),
    though it is legal ONNX: a graph input listed as a graph output too. "" when there is
    none, or the model does not parse."""
    try:
        import onnx

        graph = onnx.load_model_from_string(model).graph
    except Exception:  # not for this function to say why a model does not parse
        return ""
    passed = sorted({i.name for i in graph.input} & {o.name for o in graph.output})
    if not passed:
        return ""
    names = ", ".join(repr(n) for n in passed[:4])
    return (f"the graph lists its input {names} as an output too (legal ONNX, which ONNX "
            "Runtime's float16 converter and int8 quantizer do not handle): "
            "make that output a copy of the input (an Identity node) and convert again")


def source_unreadable(kind: str, path: Path, exc: Exception) -> SourceModelError:
    """Why a source does not load, and what to do, from the loader's exception."""
    for reason in (_custom_op, _lambda_layer, _cut_short, _no_inputs):
        found = reason(kind, path, exc)
        if found is not None:
            return found
    text = _AGENT_HINT.sub("", exception_text(exc)).strip()
    said = _ORT_HINT.search(text)  # ONNX Runtime's refusal: its hint is the fix
    fix = said.group().strip()[1:-1].rsplit("; ", 1)[-1] if said else \
        "check that the file is a complete model of that type"
    text = _ORT_HINT.sub("", text)
    return SourceModelError(f"cannot load {kind} model {path}: {text or repr(exc)}"[:600],
                            hint=fix)


def _custom_op(kind: str, path: Path, exc: Exception) -> SourceModelError | None:
    return source_refused(path.name, exc)


def _lambda_layer(kind: str, path: Path, exc: Exception) -> SourceModelError | None:
    if kind != "keras" or not _LAMBDA.search(str(exc)):
        return None
    return SourceModelError(
        f"{path.name} has a Keras Lambda layer: its Python code is stored in the file, and "
        "Keras does not load code from a file in safe mode (it could run anything)",
        hint="where the model's code is, load it with keras.models.load_model(PATH, "
             "safe_mode=False) if you trust the file, export it with model.export(FOLDER) and "
             "convert that SavedModel folder; or replace the Lambda by a registered custom "
             "layer and save again")


def _cut_short(kind: str, path: Path, exc: Exception) -> SourceModelError | None:
    not_zip = path.suffix.lower() == ".keras" and path.is_file() and \
        not zipfile.is_zipfile(path)
    if not (not_zip or _CUT_SHORT.search(str(exc))):
        return None
    size = path.stat().st_size if path.is_file() else 0
    return SourceModelError(
        f"{path.name} ({size} bytes) does not read as a whole {kind} model: the file is cut "
        "short (an interrupted download or copy) or is not a model of that type",
        hint="export the model again, or download it again and compare its size or checksum "
             "with the original")


def _no_inputs(kind: str, path: Path, exc: Exception) -> SourceModelError | None:
    count = _graph_inputs(kind, path)
    if count != 0:
        return None
    return SourceModelError(
        f"{path.name} has no inputs: its graph computes constants, and a model with nothing "
        "to feed cannot be calibrated, measured or served",
        hint="export the model with its input as a graph input (not folded into a constant "
             "or initializer), then convert it")


def _graph_inputs(kind: str, path: Path) -> int | None:
    """How many inputs the graph takes (initializers aside); None when it cannot tell."""
    try:
        if kind == "onnx":
            import onnx

            graph = onnx.load(str(path), load_external_data=False).graph
            return len({i.name for i in graph.input} - {i.name for i in graph.initializer})
        if kind == "tflite":
            from ai_edge_litert import schema_py_generated as schema

            root = schema.Model.GetRootAsModel(path.read_bytes(), 0)
            return int(root.Subgraphs(0).InputsLength())
    except Exception:  # a file that does not parse: another reason covers it
        return None
    return None


def out_of_memory(exc: BaseException) -> bool:
    """Whether a failure is memory running out: numpy's MemoryError, or a runtime's own
    allocation failure (ONNX Runtime's arena, a C++ bad_alloc)."""
    return isinstance(exc, MemoryError) or bool(_NO_MEMORY.search(str(exc)))
