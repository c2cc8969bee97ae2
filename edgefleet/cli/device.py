"""``edgefleet device``: list, show and check device profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.agent.protocol.bundle import Bundle, inspect_bundle
from edgefleet.agent.protocol.encryption import DecryptionKeys, NoDecryptionKeyError
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.runtime.inspect import inspect_model
from edgefleet.cli.extras import needs
from edgefleet.cli.output import emit, fail, table
from edgefleet.devices import check_model, list_profiles, load_profile

app = typer.Typer(help="Device profiles: what each device runs.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON")]


@app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """Every built-in profile."""
    rows = [{"name": p.name, "arch": p.architecture,
             "runtimes": ", ".join(f"{k} {v}" for k, v in p.runtimes.items()),
             "int8 only": p.full_int8_only, "max model MB": p.max_model_bytes // 2**20,
             "RAM MB": p.ram_bytes // 2**20, "threads": p.threads} for p in list_profiles()]
    emit(rows, as_json, table("device profiles", rows, list(rows[0])))


@app.command()
def show(name: Annotated[str, typer.Argument(help="Profile name or .json path")],
         as_json: JsonOpt = False) -> None:
    """One profile in full."""
    try:
        profile = load_profile(name)
    except EdgefleetError as exc:
        fail(exc, as_json)
    data = profile.model_dump(mode="json")
    rows = [{"field": k, "value": v} for k, v in data.items()]
    emit(data, as_json, table(profile.name, rows, ["field", "value"]))


@app.command()
@needs("device check", "agent")
def check(bundle: Annotated[Path, typer.Argument(help="Bundle (.efb) to check")],
          target: Annotated[list[str], typer.Option(help="Profile name(s) or path(s)")],
          decrypt_key: Annotated[list[Path] | None, typer.Option(
              help="X25519 private key (NAME.x25519) or folder, for an encrypted model")] = None,
          as_json: JsonOpt = False) -> None:
    """Report every reason the bundle cannot run on each target; exit 1 if any."""
    try:
        opened = _open(bundle, decrypt_key or [])
        info = inspect_model(opened.model_bytes, opened.manifest.format)
        profiles = [load_profile(t) for t in target]
    except EdgefleetError as exc:
        fail(exc, as_json)
    results = {p.name: [v.as_dict() for v in check_model(p, opened.manifest, info,
                                                          len(opened.model_bytes))]
               for p in profiles}
    rows = [{"target": name, "kind": v["kind"], "problem": v["message"],
             "nodes": ", ".join(map(str, v["nodes"]))[:80]}  # type: ignore[call-overload]
            for name, found in results.items() for v in found]
    rows += [{"target": name, "kind": "ok", "problem": "fits", "nodes": ""}
             for name, found in results.items() if not found]
    emit(results, as_json, table(f"{bundle.name}: device check", rows,
                                 ["target", "kind", "problem", "nodes"]))
    if any(results.values()):
        raise typer.Exit(1)


def _open(bundle: Path, decrypt_key: list[Path]) -> Bundle:
    """The bundle with its model readable; an encrypted one needs a key for its ops."""
    try:
        return inspect_bundle(bundle, DecryptionKeys.from_paths(decrypt_key))
    except NoDecryptionKeyError as exc:
        raise NoDecryptionKeyError(
            f"{bundle.name}: the model is encrypted, and checking it against a profile needs its "
            f"ops: {exc.message}", hint="pass --decrypt-key NAME.x25519 of a recipient") from exc
