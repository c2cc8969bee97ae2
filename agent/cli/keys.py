"""``edgefleet keys``: generate and inspect Ed25519 bundle-signing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agent.cli.output import emit, fail, table
from agent.protocol.errors import EdgefleetError
from agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair

app = typer.Typer(help="Bundle-signing keys (Ed25519).", no_args_is_help=True)


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for NAME.key and NAME.pub")] =
    Path("keys"),
    name: Annotated[str, typer.Option(help="Key name")] = "signing",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Write a new private key (NAME.key, mode 0600) and its public key (NAME.pub)."""
    try:
        secret, public = generate_keypair(out, name)
        key_id = SigningKey.load(secret).key_id
    except EdgefleetError as exc:
        fail(exc, as_json)
    data = {"key_id": key_id, "private_key": str(secret), "public_key": str(public)}
    emit(data, as_json, table("new signing key", [data], list(data)))


@app.command("list")
def list_keys(
    paths: Annotated[list[Path], typer.Argument(help=".pub files or folders of them")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show the key ids of public keys (what a device would trust)."""
    try:
        trusted = TrustedKeys.from_paths(paths)
    except EdgefleetError as exc:
        fail(exc, as_json)
    rows = [{"key_id": key_id} for key_id in trusted.key_ids]
    emit(rows, as_json, table("trusted keys", rows, ["key_id"]))
