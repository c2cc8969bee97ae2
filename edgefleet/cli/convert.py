"""``edgefleet convert``: the command-line face of :mod:`edgefleet.converter.pipeline`."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.output import console, emit, fail, literal, styled, table

OPTIONS_HINT = "see 'edgefleet convert --help' for the options and the values they take"


def convert(
    model: Annotated[Path, typer.Argument(help=".keras/.h5, SavedModel folder, .onnx, .tflite")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle to write (.efb)")],
    format: Annotated[str, typer.Option(help="tflite or onnx")] = "tflite",
    quantize: Annotated[str, typer.Option(
        help="none, fp16, dynamic, int8 or auto; float .tflite sources also weight-only and "
             "int8-a16 (16-bit activations)")] = "none",
    calibration: Annotated[Path | None, typer.Option(help=".npy, .npz or image folder")] = None,
    eval: Annotated[Path | None, typer.Option(help="Evaluation data; .npz 'labels'")] = None,
    prune: Annotated[float | None, typer.Option(help="Target sparsity, e.g. 0.5")] = None,
    fine_tune_data: Annotated[Path | None, typer.Option(help=".npz with x and labels")] = None,
    target: Annotated[list[str] | None, typer.Option(help="Device profile(s) to check")] = None,
    max_drop: Annotated[float | None, typer.Option(
        help="Accuracy budget in points (default 1: labels' accuracy, else the worst output's "
             "score)")] = None,
    search_budget: Annotated[float, typer.Option(
        help="Seconds --quantize auto may spend searching")] = 480.0,
    calibration_method: Annotated[str, typer.Option(
        help="ONNX int8 calibration: minmax, percentile or entropy")] = "minmax",
    activations: Annotated[str, typer.Option(help="ONNX int8 activations: uint8 or int8")] =
    "uint8",
    input_shape: Annotated[list[str] | None, typer.Option(
        help="Fix an input's dynamic dims: NAME=1x3x320x320 (repeatable)")] = None,
    input_size: Annotated[str | None, typer.Option(
        help="Height x width of a single image input, e.g. 320x320")] = None,
    output_kind: Annotated[list[str] | None, typer.Option(
        help="An output's kind: NAME=class (top-1 agreement counts) or NAME=regression "
             "(its error alone); overrides the rule (repeatable)")] = None,
    name: Annotated[str | None, typer.Option(help="Bundle name (default: file stem)")] = None,
    version: Annotated[str, typer.Option(help="Bundle version (semver)")] = "1.0.0",
    sign_key: Annotated[Path, typer.Option(help="Ed25519 private key (.key)")] =
    Path("keys/signing.key"),
    scale: Annotated[str, typer.Option(help="Image scaling: 0-1, -1-1 or 0-255")] = "0-1",
    int8_io: Annotated[bool, typer.Option(help="int8 inputs and outputs (Edge TPU)")] = False,
    encrypt_for: Annotated[list[Path] | None, typer.Option(
        help="Encrypt the model for this X25519 public key (NAME.x25519pub, from 'edgefleet "
             "keys generate-encryption'); repeat for several devices or a fleet key")] = None,
    record_host: Annotated[bool, typer.Option(
        help="Record the build host's name in the bundle's lineage")] = True,
    quiet: Annotated[bool, typer.Option(help="No progress output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Convert a model for edge devices, measure it, and write a signed bundle."""
    try:
        from edgefleet.converter.config import ConvertConfig
        from edgefleet.converter.errors import ConversionFailedError, NoResultError, OptionError
        from edgefleet.converter.pipeline import convert as run
    except EdgefleetError as exc:
        fail(exc, as_json)
    try:
        config = ConvertConfig(model=model, output=output, sign_key=sign_key,
                               format=format,  # type: ignore[arg-type]
                               quantize=quantize,  # type: ignore[arg-type]
                               calibration=calibration, eval=eval, prune=prune,
                               fine_tune_data=fine_tune_data, targets=tuple(target or ()),
                               max_drop=max_drop, name=name, version=version,
                               scale=scale,  # type: ignore[arg-type]
                               int8_io=int8_io, quiet=quiet or as_json,
                               encrypt_for=tuple(encrypt_for or ()), record_host=record_host,
                               search_budget=search_budget,
                               calibration_method=calibration_method, activations=activations,
                               input_shapes=tuple(_shape(s) for s in input_shape or ()),
                               input_size=_size(input_size) if input_size else None,
                               output_kinds=tuple(_kind(k) for k in output_kind or ()))
    except (ValueError, typer.BadParameter) as exc:
        _refused(OptionError(exc.message if isinstance(exc, typer.BadParameter) else str(exc),
                             hint=OPTIONS_HINT), as_json)
    # Progress goes to a duplicate of stderr: conversions silence fds 1 and 2 meanwhile
    # (fd 1 and sys.stdout for the whole run, _stdout_off; fd 2 around TensorFlow's calls).
    progress_out = Console(file=os.fdopen(os.dup(2), "w"), stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.fields[count]}"), TimeElapsedColumn(), transient=True,
                  console=progress_out, disable=config.quiet) as progress:
        task = progress.add_task("loading the source model", total=None, count="")

        def step(text: str, done: int | None = None, total: int | None = None) -> None:
            # a stage without a count shows no stale count from the stage before it
            counted = done is not None and total is not None
            progress.update(task, description=escape(text), completed=done or 0,
                            total=total if counted else None,
                            count=f"{done}/{total}" if counted else "")

        try:
            with _stdout_off():
                report = run(config, step)
        except NoResultError as exc:
            if as_json:  # one document: the report, and why nothing was written
                cause = exc.cause
                emit({**exc.report.as_dict(), "error": {
                    "error": type(cause).__name__, "message": cause.message,
                    "hint": cause.hint}}, True)
                raise typer.Exit(1) from None
            _show(exc.report.as_dict(), as_json)
            fail(exc.cause, as_json, code=1)
        except EdgefleetError as exc:
            fail(exc, as_json)
        except MemoryError as exc:  # anywhere in a conversion: said, never a traceback
            fail(ConversionFailedError(
                "the conversion ran out of memory" + (f" ({exc})" if str(exc) else ""),
                hint="give a smaller --input-size / --input-shape, or fewer --eval samples"),
                as_json)
    _show(report.as_dict(), as_json)


@contextlib.contextmanager
def _stdout_off() -> Iterator[None]:
    """Keep what libraries print off stdout while converting: ONNX Runtime's calibrator
    print()s its progress ("Collecting tensor data and making histogram ..."), native code
    writes to fd 1; stdout carries the report alone (under ``--json`` one document).
    Python's ``sys.stdout`` and fd 1 both go to /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            os.dup2(sink.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _refused(exc: EdgefleetError, as_json: bool) -> NoReturn:
    """An option value refused: one JSON object on stdout with ``--json`` (as every other
    error of the command), else typer's usage error; exit 2 either way."""
    if as_json:
        fail(exc, as_json=True, code=2)
    raise typer.BadParameter(exc.message) from exc


def _worst(agreement: dict[str, Any]) -> str:
    outputs = agreement.get("outputs") or []
    if not outputs:
        return ""
    worst = min(outputs, key=lambda o: (math.isfinite(_number(o["score"])),
                                        _number(o["score"])))
    if not all(math.isfinite(_number(worst[k])) for k in
               ("score", "max_abs_error", "centered_cosine", "rel_rms")):
        return f"{worst['name'][:24]}: not finite"
    metric = (f"err {worst['max_abs_error'] / (worst['judged_range'] or 1):.1%} of range"
              if worst["judged_by"] == "range" else
              f"cos {worst['centered_cosine']:.4f}, rel RMS {worst['rel_rms']:.3f}")
    return f"{worst['name'][:24]}: {metric}"


def _number(value: Any) -> float:
    """A report's number; NaN for one that is missing (a NaN is written as null)."""
    return float(value) if isinstance(value, int | float) else math.nan


def _kept(names: list[str]) -> str:
    return "" if not names else f"{len(names)}: {', '.join(names)}"[:40]


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.rpartition("=")
    if not name or not dims:
        raise typer.BadParameter(f"--input-shape {text!r}: expected NAME=1x3x320x320")
    return name, _dims(dims, f"--input-shape {name}=")


def _kind(text: str) -> tuple[str, str]:
    name, _, kind = text.rpartition("=")
    if not name or kind not in ("class", "regression"):
        raise typer.BadParameter(f"--output-kind {text!r}: expected NAME=class or "
                                 "NAME=regression")
    return name, kind


def _size(text: str) -> tuple[int, int]:
    dims = _dims(text, "--input-size")
    if len(dims) != 2:
        raise typer.BadParameter(f"--input-size {text!r}: expected HEIGHTxWIDTH, e.g. 320x320")
    return dims[0], dims[1]


def _dims(text: str, option: str) -> tuple[int, ...]:
    """``1x3x320x320`` as dims; ``option`` names what is given (with the input's name)."""
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError as exc:
        given = f"{option}{text}" if option.endswith("=") else f"{option} {text}"
        fixed = "x".join(d.strip() for d in text.replace(",", "x").split("x"))
        example = fixed if all(d.isdigit() for d in fixed.split("x")) else \
            "320x320" if option == "--input-size" else "1x3x320x320"  # (a comma typo
        # fixed; else a real example, never the bad value again)
        raise typer.BadParameter(f"{given!r}: dims are integers joined by x, e.g. "
                                 f"{option if option.endswith('=') else option + ' '}"
                                 f"{example}") from exc


def _show(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit(report, True)
        return
    rows = [{"attempt": a["label"], "recipe": a["recipe"][:40], "size": a["size_bytes"],
             "accuracy": a["accuracy"], "drop (points)": a["accuracy_drop_points"],
             "top-1 agree": a["agreement"].get("top1"),
             "worst output": _worst(a["agreement"]),
             "p50 ms": a["latency_p50_ms"], "kept float": _kept(a["keep_float"]),
             "result": ("chosen" if a["label"] == report["chosen"] else
                        "ok" if a["accepted"] else "rejected"), "why": a["reason"][:70]}
            for a in report["attempts"]]
    title = (f"{report['source']} ({report['source_kind']}, {report['source_bytes']} bytes, "
             f"accuracy {report['source_accuracy']}, p50 {report['source_latency_p50_ms']} ms) "
             f"-> {report['format']}, {report['conversion_seconds']} s")
    console.print(table(title, rows, list(rows[0]) if rows else []))
    for kind in report.get("output_kinds") or []:
        console.print(literal(f"output {kind['name']!r}: {kind['kind']} ({kind['rule']})"))
    for suggestion in report.get("suggestions") or []:
        console.print(literal(f"try: {suggestion['option']} ({suggestion['why']})"))
    # a rejected attempt's warnings (slower, ...) stay in its row of the report
    chosen = [a for a in report["attempts"] if a["label"] == report["chosen"]]
    for warning in report["warnings"] + [w for a in chosen for w in a["warnings"]]:
        console.print(styled("[yellow]warning:[/] {}", warning))
    if report["output"]:
        console.print(literal(f"wrote {report['output']} ({report['bundle_bytes']} bytes)"))
    if report.get("encrypted_for"):
        console.print(literal(f"model encrypted for key ids "
                              f"{', '.join(report['encrypted_for'])}"))
