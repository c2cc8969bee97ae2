"""``edgefleet certs``: the certificates of secure mode (see docs/security.md).

Everything lives under one folder (``--dir``, default ``certs``)::

    certs/ca.key  ca.crt                 the fleet CA (keep ca.key offline if you can)
    certs/server.key  server.crt         the broker's (and the controller's HTTPS)
    certs/edgefleet-controller.key .crt  the controller's client certificate
    certs/devices/ID.key  ID.crt         one per device; CN = the device id
    certs/ca.crl                         revoked certificates (``certs revoke``)

Keys are written with mode 0600 and never over an existing file without ``--force``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.output import emit, fail, table
from edgefleet.fleet import certs, crl
from edgefleet.fleet.acl import CONTROLLER_USER

app = typer.Typer(help="Certificates for secure mode: a fleet CA, the broker's, the "
                       "controller's and one per device.", no_args_is_help=True)

DirOpt = Annotated[Path, typer.Option("--dir", help="The CA's folder (ca.key, ca.crt)")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Where to write (default: --dir; devices: DIR/devices)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing files")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines")]
_COLUMNS = ["certificate", "key", "CN", "hosts", "valid until", "days left"]


def _days(default: int) -> Any:
    return typer.Option(min=1, help=f"Validity in days (default {default})")


@app.command()
def ca(cert_dir: DirOpt = Path("certs"),
       name: Annotated[str, typer.Option(help="The CA's common name")] = "edgefleet fleet CA",
       days: Annotated[int, _days(certs.CA_DAYS)] = certs.CA_DAYS,
       force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Create the fleet CA: DIR/ca.key (mode 0600) and DIR/ca.crt (give this one out)."""
    _issue(as_json, "fleet CA", lambda: (certs.make_ca(name, days), cert_dir, "ca"), force)


@app.command()
def server(host: Annotated[list[str], typer.Option(
               "--host", help="DNS name or IP address clients dial (repeatable)")],
           cert_dir: DirOpt = Path("certs"), out: OutOpt = None,
           name: Annotated[str, typer.Option(help="File stem")] = "server",
           days: Annotated[int, _days(certs.SERVER_DAYS)] = certs.SERVER_DAYS,
           force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """A server certificate for the broker (and the controller's HTTPS) naming every host."""
    _issue(as_json, "server certificate",
           lambda: (certs.issue_server(_ca(cert_dir), host, days), out or cert_dir, name),
           force)


@app.command()
def device(device_id: Annotated[list[str], typer.Argument(help="Device id(s)")],
           cert_dir: DirOpt = Path("certs"), out: OutOpt = None,
           days: Annotated[int, _days(certs.CLIENT_DAYS)] = certs.CLIENT_DAYS,
           controller_user: Annotated[str, typer.Option(
               help="The controller's user name, which no device may take")] = CONTROLLER_USER,
           force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """A client certificate per device: CN = device id = its MQTT user name."""
    try:
        authority = _ca(cert_dir)
        rows = [_save(certs.issue_device(authority, d, days, controller=controller_user),
                      out or cert_dir / "devices", d, force) for d in device_id]
    except EdgefleetError as exc:
        fail(exc, as_json)
    emit(rows, as_json, table("device certificates", [_flat(r) for r in rows], _COLUMNS))


@app.command()
def controller(cert_dir: DirOpt = Path("certs"), out: OutOpt = None,
               user: Annotated[str, typer.Option(
                   help="Common name = the controller's MQTT user name in the ACL")] =
               CONTROLLER_USER,
               days: Annotated[int, _days(certs.CLIENT_DAYS)] = certs.CLIENT_DAYS,
               force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """The controller's client certificate (the only writer of desired states)."""
    _issue(as_json, "controller certificate",
           lambda: (certs.issue_client(_ca(cert_dir), user, days), out or cert_dir, user),
           force)


@app.command()
def show(paths: Annotated[list[Path], typer.Argument(help="Certificate files (.crt)")],
         as_json: JsonOpt = False) -> None:
    """What a certificate says: name, purpose, hosts, expiry (days left), fingerprint."""
    try:
        rows = [{"certificate": str(p), **certs.describe(certs.read_cert(p))} for p in paths]
    except EdgefleetError as exc:
        fail(exc, as_json)
    columns = ["certificate", "CN", "purpose", "hosts", "valid until", "days left", "sha256"]
    emit(rows, as_json, table("certificates", [_flat(r) for r in rows], columns))


@app.command()
def revoke(paths: Annotated[list[Path] | None, typer.Argument(
               help="Certificates to revoke (.crt), e.g. certs/devices/cam-7.crt")] = None,
           cert_dir: DirOpt = Path("certs"),
           days: Annotated[int, typer.Option(
               min=1, help="The list's validity: re-run before it ends (--renew)")] =
           crl.CRL_DAYS,
           renew: Annotated[bool, typer.Option(
               "--renew", help="Re-sign the list with a new validity, revoking nothing new")]
           = False,
           as_json: JsonOpt = False) -> None:
    """Revoke certificates (a lost or compromised device): DIR/ca.crl lists them, signed by
    the CA; a broker with ``crlfile DIR/ca.crl`` refuses them once it reads the list again
    (SIGHUP: ``systemctl reload mosquitto``)."""
    if not paths and not renew:
        fail(EdgefleetError("nothing to revoke", hint="pass the .crt files to revoke, or "
                                                      "--renew to re-sign the list"), as_json)
    path = cert_dir / crl.CRL_FILE
    try:
        revoked = [certs.read_cert(p) for p in paths or []]
        authority = _ca(cert_dir)
        listed = crl.revoke(authority, revoked, crl.read_crl(path), days)
        crl.save_crl(listed, path)
    except EdgefleetError as exc:
        fail(exc, as_json)
    rows = [{"certificate": str(p), **certs.describe(c)} for p, c in zip(paths or [], revoked,
                                                                        strict=True)]
    result = {**crl.summary(listed, path), "certificates": rows}
    emit(result, as_json, table(
        f"revoked; {path} now lists {len(listed)} (valid until "
        f"{str(result['next_update'])[:10]})", [_flat(r) for r in rows],
        ["certificate", "CN", "purpose", "sha256"]))


def _issue(as_json: bool, title: str, make: Callable[[], tuple[certs.Issued, Path, str]],
           force: bool) -> None:
    try:
        issued, folder, stem = make()
        row = _save(issued, folder, stem, force)
    except EdgefleetError as exc:
        fail(exc, as_json)
    emit(row, as_json, table(title, [_flat(row)], _COLUMNS))


def _save(issued: certs.Issued, folder: Path, stem: str, force: bool) -> dict[str, Any]:
    key_path, cert_path = certs.save(issued, folder, stem, overwrite=force)
    return {"certificate": str(cert_path), "key": str(key_path),
            **certs.describe(issued.cert)}


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """The table's view of a row (JSON keeps every field)."""
    return {**row, "CN": row["common_name"], "hosts": ", ".join(row["sans"]),
            "valid until": row["not_after"][:10], "days left": row["days_left"],
            "sha256": row["sha256"][:16]}


def _ca(cert_dir: Path) -> certs.Issued:
    return certs.load(cert_dir / "ca.key", cert_dir / "ca.crt")
