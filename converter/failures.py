"""Third-party failures, translated once into converter errors whose hints are true.

- the TFLite converter stopping on TensorFlow ops that have no TFLite builtin (a Keras
  LSTM's TensorList loop, say): names the ops and the path that converts them;
- a runtime refusing a model for a custom operator it has no kernel for: names the
  operator, and says that no device runtime will have it either;
- a runtime refusing a converted result: names the runtime and the recipe that wrote it.
"""

from __future__ import annotations

import re

from edgefleet.converter.errors import ConversionFailedError, SourceModelError

__all__ = ["custom_ops", "result_refused", "source_refused", "tflite_conversion"]

_TF_OP = re.compile(r"'tf\.(\w+)' op")
_FLEX = re.compile(r"Flex(\w+)")
_CUSTOM = re.compile(r"unresolved custom op: (\w+)")
_AGENT_HINT = re.compile(r"\s*\((?:convert|upgrade|check)[^)]*\)")  # the agent's own hints
_NO_FLEX = ("select TensorFlow ops (Flex) are not used: LiteRT on a device does not carry "
            "them")


def tflite_conversion(mode: str, exc: Exception) -> ConversionFailedError:
    """The TFLite converter's failure: TensorFlow ops without a builtin by name, else the
    converter's first line."""
    text = str(exc)
    ops = sorted(set(_TF_OP.findall(text)) | set(_FLEX.findall(text)))
    if not ops:
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return ConversionFailedError(f"TFLite conversion ({mode}) failed: {first[:300]}",
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


def result_refused(label: str, recipe: str, runtime: str, exc: Exception
                   ) -> ConversionFailedError:
    """A converted result the device runtime refuses to load: a row, never a result."""
    ops = custom_ops(str(exc))
    if ops:
        return ConversionFailedError(
            f"{runtime} cannot load the model of {label}: it has no kernel for the custom "
            f"operator {', '.join(ops)}", hint="use another --quantize recipe")
    text = _AGENT_HINT.sub("", getattr(exc, "message", str(exc))).strip()
    first = text.splitlines()[0][:300] if text else repr(exc)
    return ConversionFailedError(
        f"{runtime} cannot load the model of {label} ({recipe}), or run it: {first}",
        hint="the recipe wrote a model the runtime refuses; use another --quantize recipe "
             "or --quantize auto, which measures each")
