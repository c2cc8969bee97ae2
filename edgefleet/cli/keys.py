"""``edgefleet keys``: generate and inspect Ed25519 bundle-signing keys, rotate and retire them
(a signed keyring the fleet publishes to its devices: docs/keys.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.agent.protocol.errors import EdgefleetError, KeyFileError
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.protocol.keyring import (
    KEYRING_FILE,
    SignedKeyring,
    build_keyring,
    load_keyring,
    parse_keyring,
)
from edgefleet.agent.protocol.signing import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    SigningKey,
    TrustedKeys,
    generate_keypair,
    key_id_of,
)
from edgefleet.cli.output import emit, fail, table

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


@app.command("generate-encryption")
def generate_encryption(
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Folder for NAME.x25519 and NAME.x25519pub")] =
    Path("keys"),
    name: Annotated[str, typer.Option(help="Key name: a device id, or the fleet's")] = "device",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """An X25519 key pair for models encrypted at rest: NAME.x25519 (private, mode 0600) goes
    to the device (DATA_DIR/keys, or --decrypt-key); NAME.x25519pub to 'convert --encrypt-for'."""
    from edgefleet.agent.protocol.encryption import DeviceKey, generate_device_key

    try:
        secret, public = generate_device_key(out, name)
        key_id = DeviceKey.load(secret).key_id
    except EdgefleetError as exc:
        fail(exc, as_json)
    data = {"key_id": key_id, "private_key": str(secret), "public_key": str(public)}
    emit(data, as_json, table("new encryption key (X25519)", [data], list(data)))


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


KeysDir = Annotated[Path, typer.Option("--keys", help="The signing keys folder (NAME.key, "
                                                     "NAME.pub, keyring.json)")]


@app.command()
def rotate(
    keys: KeysDir,
    name: Annotated[str | None, typer.Option(help="Name of the new key (default "
                                                  "signing-SERIAL)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Add a new signing key and write the next keyring (docs/keys.md).

    Writes NAME.key and NAME.pub, and keyring.json: the current keys and the new one,
    serial + 1, signed by the current keys. Then: edgefleet fleet keyring publish.
    """
    try:
        serial, current = _current(keys)
        signers = _signers(keys, current)
        if not signers:
            raise KeyFileError(f"no private key of the current keys ({', '.join(current)}) "
                               f"is in {keys}", hint="rotate where the current .key files are")
        secret, _ = generate_keypair(keys, name or f"signing-{serial + 1}")
        new = SigningKey.load(secret)
        entries = [*current.values(), (secret.stem, new.private_key.public_key())]
        keyring = _write(keys, build_keyring(entries, serial + 1, signers))
    except EdgefleetError as exc:
        fail(exc, as_json)
    _show(keyring, keys, as_json, f"added {new.key_id} ({secret})")


@app.command()
def retire(
    key: Annotated[str, typer.Argument(help="Key id or key name to stop trusting")],
    keys: KeysDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Stop trusting a key: write the next keyring without it (docs/keys.md).

    keyring.json without the key, serial + 1, signed by the keys that stay, and by the
    retired one while its .key is here, so devices that missed the rotation follow.
    """
    try:
        serial, current = _current(keys)
        gone = [key_id for key_id, (name, _) in current.items() if key in (key_id, name)]
        if not gone:
            raise KeyFileError(f"{key} is not in the keyring of {keys} "
                               f"(keys: {', '.join(current)})",
                               hint=f"pass a key id or a key name listed in {keys / KEYRING_FILE}")
        staying = {k: v for k, v in current.items() if k not in gone}
        if not staying:
            raise KeyFileError(f"retiring {key} would leave devices trusting no key",
                               hint="add its successor first: edgefleet keys rotate")
        signers = _signers(keys, staying)
        if not signers:
            raise KeyFileError(f"no private key of the keys that stay is in {keys}",
                               hint="the keyring must be signed by a key that stays")
        raw = build_keyring(staying.values(), serial + 1, [*signers, *_signers(keys, {
            k: current[k] for k in gone})])
        keyring = _write(keys, raw)
    except EdgefleetError as exc:
        fail(exc, as_json)
    _show(keyring, keys, as_json, f"retired {', '.join(gone)}")


def _current(keys: Path) -> tuple[int, dict[str, tuple[str, Ed25519PublicKey]]]:
    """(serial, key id -> (name, public key)) of keyring.json, else of the .pub files (0)."""
    keyring = load_keyring(keys / KEYRING_FILE)
    if keyring is not None:
        public = keyring.trusted().public_keys()
        return keyring.serial, {e.key_id: (e.name, public[e.key_id]) for e in keyring.keys}
    files = sorted(keys.glob(f"*{PUBLIC_SUFFIX}")) if keys.is_dir() else []
    if not files:
        raise KeyFileError(f"no keyring.json and no .pub file in {keys}",
                           hint="generate the first key: edgefleet keys generate --out DIR")
    found = {}
    for file in files:
        public_key = next(iter(TrustedKeys.from_paths([file]).public_keys().values()))
        found[key_id_of(public_key)] = (file.stem, public_key)
    return 0, found


def _signers(keys: Path, wanted: dict[str, tuple[str, Ed25519PublicKey]]) -> list[SigningKey]:
    """The private keys in ``keys`` of the ``wanted`` key ids."""
    loaded = [SigningKey.load(path) for path in sorted(keys.glob(f"*{SECRET_SUFFIX}"))]
    return [key for key in loaded if key.key_id in wanted]


def _write(keys: Path, raw: bytes) -> SignedKeyring:
    atomic_write(keys / KEYRING_FILE, raw)
    return parse_keyring(raw)


def _show(keyring: SignedKeyring, keys: Path, as_json: bool, what: str) -> None:
    path = keys / KEYRING_FILE
    data = {**keyring.summary(), "file": str(path), "change": what}
    rows = [{"key_id": k["key_id"], "name": k["name"],
             "signed it": "yes" if k["key_id"] in keyring.signed_by else ""}
            for k in data["keys"]]
    emit(data, as_json, table(f"keyring serial {keyring.serial}: {what}; next: edgefleet fleet "
                              f"keyring publish {path}", rows, ["key_id", "name", "signed it"]))
