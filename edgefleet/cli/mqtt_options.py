"""The MQTT security options shared by ``agent run`` and ``fleet serve``.

A password is never taken on the command line (other users of the machine see it in
``ps``): it comes from ``--password-file`` or, when ``--username`` is given, the
``EDGEFLEET_MQTT_PASSWORD`` variable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.agent.errors import BrokerError
from edgefleet.agent.mqtt_config import MqttSecurity

__all__ = ["PASSWORD_ENV", "CaOpt", "CertOpt", "KeyOpt", "PasswordFileOpt", "UsernameOpt",
           "mqtt_security"]

PASSWORD_ENV = "EDGEFLEET_MQTT_PASSWORD"
log = logging.getLogger(__name__)

_FILE = {"exists": True, "dir_okay": False, "readable": True, "resolve_path": True}
CaOpt = Annotated[Path | None, typer.Option(
    "--ca", help="The fleet CA's certificate: checks the broker's (turns TLS on)", **_FILE)]
CertOpt = Annotated[Path | None, typer.Option(
    "--cert", help="Client certificate (from 'edgefleet certs'); with --key", **_FILE)]
KeyOpt = Annotated[Path | None, typer.Option(
    "--key", help="The client certificate's private key", **_FILE)]
UsernameOpt = Annotated[str | None, typer.Option(
    "--username", help="MQTT user name (password mode)")]
PasswordFileOpt = Annotated[Path | None, typer.Option(
    "--password-file", help=f"File holding the MQTT password (or set {PASSWORD_ENV})",
    **_FILE)]


def mqtt_security(ca: Path | None, cert: Path | None, key: Path | None,
                  username: str | None, password_file: Path | None) -> MqttSecurity | None:
    """The options as one :class:`MqttSecurity`; None when none was given."""
    if password_file is not None and not username:
        raise BrokerError("an MQTT password without a user name",
                          hint="pass --username NAME (a device's is its device id)",
                          transient=False)
    password = _password(password_file) if username else None
    if not any((ca, cert, key, username)):
        return None
    return MqttSecurity(ca_file=ca, cert_file=cert, key_file=key, username=username,
                        password=password)


def _password(path: Path | None) -> str | None:
    if path is None:
        return os.environ.get(PASSWORD_ENV) or None
    try:
        text = path.read_text().strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerError(f"cannot read the password file {path}: {exc}",
                          hint="pass a text file holding only the password",
                          transient=False) from exc
    if not text:
        raise BrokerError(f"the password file {path} is empty",
                          hint="write the password printed by 'edgefleet fleet acl "
                               "--password-file' into it", transient=False)
    if mode & 0o077:
        log.warning("%s may be read by other users: chmod 600 %s", path, path)
    return text
