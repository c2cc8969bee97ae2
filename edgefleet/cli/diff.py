"""``edgefleet diff A B``: compare two bundles, each an ``.efb`` or a registry ``NAME:VERSION``.

The comparison itself is :mod:`edgefleet.converter.diff`; this joiner only fetches registry
versions through the fleet's REST client (the converter never imports the fleet).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group

from edgefleet.agent.protocol.encryption import DecryptionKeys
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.schema import NAME_PATTERN, SEMVER_PATTERN
from edgefleet.cli.extras import needs
from edgefleet.cli.output import emit, fail, styled, table

__all__ = ["diff", "fetch_bundle"]

_REF = re.compile(rf"^(?P<name>{NAME_PATTERN[1:-1]}):(?P<version>{SEMVER_PATTERN[1:-1]})$")


def fetch_bundle(ref: str, controller: str, token: str | None) -> bytes:
    """The bytes of a local ``.efb``, or of a pushed version fetched from the controller."""
    path = Path(ref)
    if path.is_file():
        try:
            return path.read_bytes()
        except OSError as exc:
            raise EdgefleetError(f"cannot read {ref}: {exc.strerror}",
                                 hint="check the file's permissions") from exc
    match = _REF.match(ref)
    if match is None:
        raise EdgefleetError(f"{ref!r} is neither a bundle file nor NAME:VERSION",
                             hint="pass a path to an .efb, or a pushed version like digits:1.2.0")
    from edgefleet.fleet.client import FleetClient

    client = FleetClient(controller, token)
    model = client.model(match["name"], match["version"])
    return client.bundle(model["sha256"])


@needs("diff", "agent")
def diff(
    a: Annotated[str, typer.Argument(help="Bundle A: an .efb path or a registry NAME:VERSION")],
    b: Annotated[str, typer.Argument(help="Bundle B: an .efb path or a registry NAME:VERSION")],
    data: Annotated[Path | None, typer.Option(
        help="Inputs to compare outputs on: .npy, .npz (arrays by input name, 'labels') or an "
             "image folder, as 'convert --eval'; default the bundles' health inputs")] = None,
    scale: Annotated[str, typer.Option(help="Image scaling: 0-1, -1-1 or 0-255")] = "0-1",
    decrypt_key: Annotated[list[Path] | None, typer.Option(
        help="X25519 private key (NAME.x25519) or folder, to open encrypted models")] = None,
    controller: Annotated[str, typer.Option(
        "--controller", envvar="EDGEFLEET_CONTROLLER",
        help="The controller's URL, for NAME:VERSION")] = "http://127.0.0.1:8600",
    token: Annotated[str | None, typer.Option("--token", envvar="EDGEFLEET_TOKEN",
                                              help="API token (or EDGEFLEET_TOKEN)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines")] = False,
) -> None:
    """Compare two bundles: sizes, ops, quantization, tensors, metrics, lineage, and how far
    their outputs agree on the same inputs."""
    if scale not in ("0-1", "-1-1", "0-255"):
        raise typer.BadParameter(f"scale must be 0-1, -1-1 or 0-255, got {scale!r}")
    try:
        from edgefleet.converter.diff import diff_bundles, open_side

        keys = DecryptionKeys.from_paths(decrypt_key or [])
        side_a = open_side(a, fetch_bundle(a, controller, token), keys)
        side_b = open_side(b, fetch_bundle(b, controller, token), keys)
        result = diff_bundles(side_a, side_b, data, scale)  # type: ignore[arg-type]
    except EdgefleetError as exc:
        fail(exc, as_json)
    emit(result, as_json, render(result))


def _text(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(str(_text(v)) for v in value)
    return value


def _rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: _text(v) for k, v in row.items()} for row in rows]


def render(result: dict[str, Any]) -> Group:
    """The comparison as tables, one per aspect."""
    a, b = result["a"], result["b"]
    heads = [{"": side, "bundle": s["bundle"], "ref": s["ref"], "format": s["format"],
              "runtime": s["runtime"], "created": s["created"],
              "encrypted for": ", ".join(s["encrypted_for"]) or "-"}
             for side, s in (("A", a), ("B", b))]
    parts: list[Any] = [table("bundles", heads, list(heads[0]))]
    parts.append(table("sizes (bytes)", _rows(result["sizes"]),
                       ["what", "a", "b", "delta", "ratio"]))
    ops = result["ops"]
    if ops["skipped"]:
        parts.append(styled("[yellow]ops:[/] {}", ops["skipped"]))
    else:
        total = {"op": "total", **ops["total"]}
        parts.append(table("op types and counts", [*ops["rows"], total],
                           ["op", "a", "b", "delta", "a_version", "b_version"]))
    parts.append(table("quantization", _rows(result["quantization"]), ["field", "a", "b", "same"]))
    parts.append(table("inputs and outputs", result["tensors"], ["tensor", "a", "b", "same"]))
    parts.append(table("metrics", _rows(result["metrics"]), ["metric", "a", "b", "delta"])
                 if result["metrics"] else "[yellow]metrics:[/] neither manifest records any")
    parts.append(_lineage(result["lineage"]))
    parts.append(_agreement(result["agreement"]))
    return Group(*parts)


def _lineage(lineage: dict[str, Any]) -> Any:
    same = lineage["same_source"]
    note = {True: "same source model", False: "different source models",
            None: f"no lineage in {', '.join(lineage['missing'])} (built before lineage was "
                  "recorded, or packaged outside 'edgefleet convert')"}[same]
    if not lineage["differences"]:
        return styled("[bold]lineage:[/] {}{}", note, "; nothing else differs" if same else "")
    return table(f"lineage differences ({note})", _rows(lineage["differences"]),
                 ["field", "a", "b"])


def _agreement(found: dict[str, Any]) -> Any:
    if found.get("skipped"):
        return styled("[yellow]output agreement:[/] {}", found["skipped"])
    rows = [{"measure": "top-1 agreement", "value": found["top1"]}] if found["classifier"] else []
    rows += [{"measure": f"cosine, output {i}", "value": c} for i, c in enumerate(found["cosine"])]
    rows += [{"measure": f"max abs error, output {i}", "value": m}
             for i, m in enumerate(found["max_abs_error"])]
    rows += [{"measure": f"accuracy {side}", "value": found[f"accuracy_{side}"]}
             for side in ("a", "b") if f"accuracy_{side}" in found]
    return table(f"output agreement on {found['samples']} samples ({found['data']})",
                 _rows(rows), ["measure", "value"])
