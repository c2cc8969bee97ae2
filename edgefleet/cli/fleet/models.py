"""``edgefleet fleet push``: upload a bundle; ``edgefleet fleet models``: the pushed model
versions, and ``models show NAME:VERSION``: one pushed version in full.

Everything ``models show`` prints comes from the manifest the controller stored at push
time (``GET /api/v1/models``): the bundle's identity, its lineage (source model, converter
and config, data hashes), optimization, inputs and outputs, metrics, targets, and for an
encrypted model the recipient key ids. ``--json`` prints the stored entry as it is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.fleet.common import DEFAULT_URL, ControllerOpt, JsonOpt, TokenOpt
from edgefleet.cli.fleet.common import client as _client
from edgefleet.cli.fleet.common import run as _run
from edgefleet.cli.output import emit, fail, table
from edgefleet.fleet.client import FleetClient

__all__ = ["models_app", "push", "render_model", "show_model"]

models_app = typer.Typer(help="Pushed model versions: list them, or show one in full.")


def push(bundle: Annotated[Path, typer.Argument(help="A signed .efb bundle")],
         controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
         as_json: JsonOpt = False) -> None:
    """Upload a bundle (streamed from disk); the controller verifies it before it stores it."""
    if not bundle.is_file():
        fail(EdgefleetError(f"cannot read {bundle}: not a file",
                            hint="pass the path of an .efb file"), as_json)
    result = _run(as_json, lambda: _client(controller, token).push(bundle))
    model = result["model"]
    row = {"model": f"{model['name']}:{model['version']}", "sha256": model["sha256"][:12],
           "size": model["size"], "stored": "new" if result["added"] else "already there"}
    emit(result, as_json, table("pushed", [row], list(row)))


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """Every pushed model version with its measured metrics ('models show NAME:VERSION': one
    in full, with its lineage)."""
    if ctx.invoked_subcommand is not None:
        return
    data = _run(as_json, lambda: _client(controller, token).models())
    rows = [_model_row(m) for m in data]
    emit(data, as_json, table("model versions", rows, list(rows[0]) if rows else ["model"]))


def _model_row(model: Mapping[str, Any]) -> dict[str, Any]:
    metrics = model["manifest"].get("metrics") or {}
    quant = (model["manifest"].get("optimization") or {}).get("quantization")
    return {"model": f"{model['name']}:{model['version']}", "sha256": model["sha256"][:12],
            "format": model["format"], "quantization": quant, "size": model["size"],
            "accuracy": metrics.get("accuracy"),
            "agreement": (metrics.get("agreement") or {}).get("top1"),
            "p50 ms": metrics.get("latency_p50_ms"), "pushed by": model["pushed_by"]}


def show_model(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION of a pushed bundle")],
    controller: Annotated[str, typer.Option("--controller", envvar="EDGEFLEET_CONTROLLER",
                                            help="The controller's URL")] =
    "http://127.0.0.1:8600",
    token: Annotated[str | None, typer.Option("--token", envvar="EDGEFLEET_TOKEN",
                                              help="API token (or EDGEFLEET_TOKEN)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines")] = False,
) -> None:
    """Lineage, metrics, inputs and outputs, optimization and encryption of one version."""
    name, sep, version = ref.partition(":")
    try:
        if not sep or not name or not version:
            raise EdgefleetError(f"{ref!r} is not NAME:VERSION",
                                 hint="e.g. 'edgefleet fleet models show digits:1.2.0'")
        model = FleetClient(controller, token).model(name, version)
    except EdgefleetError as exc:
        fail(exc, as_json)
    emit(model, as_json, render_model(model))


models_app.command("show")(show_model)


def _text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


def _flat(data: dict[str, Any], prefix: str = "") -> list[dict[str, str]]:
    rows = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict) and value:
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append({"field": f"{prefix}{key}", "value": _text(value)})
    return rows


def _tensor(kind: str, spec: dict[str, Any]) -> dict[str, str]:
    quant = spec.get("quantization") or {}
    scale = quant.get("scale") or []
    return {"tensor": kind, "name": spec["name"], "shape": str(spec["shape"]),
            "dtype": spec["dtype"],
            "quantization": (f"scale {scale[0]:.6g}, zero point {quant['zero_point'][0]}"
                             if len(scale) == 1 else f"{len(scale)} scales" if scale else "")}


def render_model(model: Mapping[str, Any]) -> Group:
    manifest = model["manifest"]
    encryption = manifest.get("encryption")
    head = [{"field": "model", "value": f"{model['name']}:{model['version']}"},
            {"field": "sha256", "value": model["sha256"]},
            {"field": "format", "value": f"{model['format']} on {model['runtime']} >= "
                                         f"{model['min_runtime_version']}"},
            {"field": "bundle bytes", "value": str(model["size"])},
            {"field": "task", "value": manifest.get("task", "")},
            {"field": "created", "value": manifest.get("created", "")},
            {"field": "pushed by", "value": model.get("pushed_by", "")},
            {"field": "targets", "value": ", ".join(manifest.get("targets") or []) or "-"},
            {"field": "encrypted for", "value": ", ".join(
                r["key_id"] for r in encryption["recipients"]) if encryption else "no (plain)"}]
    parts: list[Any] = [table(f"{model['name']}:{model['version']}", head, ["field", "value"])]
    lineage = manifest.get("lineage")
    if lineage:
        parts.append(table("lineage", _flat(lineage), ["field", "value"]))
    else:
        parts.append("[yellow]lineage:[/] not recorded (built before edgefleet recorded lineage, "
                     "or packaged outside 'edgefleet convert')")
    parts.append(table("optimization", _flat(manifest.get("optimization") or {}),
                       ["field", "value"]))
    tensors = [_tensor("input", t) for t in manifest["inputs"]]
    tensors += [_tensor("output", t) for t in manifest["outputs"]]
    parts.append(table("inputs and outputs", tensors,
                       ["tensor", "name", "shape", "dtype", "quantization"]))
    metrics = {k: v for k, v in (manifest.get("metrics") or {}).items() if k != "attempts"}
    parts.append(table("metrics", _flat(metrics), ["field", "value"]))
    return Group(*parts)
