"""Option values checked while the command line is parsed: HOST:PORT and fleet/device ids.

Each check is a typer option callback, so a bad value is refused before the command
starts anything, and also by ``service install -- ...`` (which parses its options with
the real command). A refusal is an :class:`OptionRefused` (a ``typer.BadParameter``) that
names the option and the form, and prints as one line: ``error: ... (fix: ...)``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from typing import IO, Any

import typer

from edgefleet.agent.protocol.topics import check_id
from edgefleet.agent.systemd import HOST_NAME

__all__ = ["OptionRefused", "api_address", "device_id_option", "fleet_option",
           "host_port", "http_address"]

_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_MAX_HOST = 253  # RFC 1035: a host name's length in text form


class OptionRefused(typer.BadParameter):
    """An option's value that does not parse: names the option, the form and a fix."""

    def __init__(self, option: str, message: str, fix: str) -> None:
        super().__init__(f"{message} (fix: {fix})", param_hint=option)
        self.option, self.fix = option, fix

    def show(self, file: IO[Any] | None = None) -> None:
        """One line on stderr, as the commands' other refusals (no usage block)."""
        line = f"error: {self.option}: {self.message}"
        print(line, file=file or sys.stderr, flush=True)


def host_port(value: str, option: str, *, ephemeral: bool = True,
              ipv6: bool = True) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (IPv4, a host name, or ``[IPv6]`` when ``ipv6``);
    ``OptionRefused`` otherwise. Port 0 (any free port) only when ``ephemeral``."""
    fix = f"give HOST:PORT, e.g. {option} 127.0.0.1:8080" + (
        f" or {option} '[::1]:8080'" if ipv6 else "")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise OptionRefused(option, f"{value!a} is not HOST:PORT", fix)
    if host.startswith("[") and not ipv6:
        raise OptionRefused(option, f"{value!a}: this server listens on IPv4 only, not on "
                                    "[IPv6]:PORT", fix)
    return _host(host, value, option, fix), _port(port, value, option, ephemeral)


def _port(text: str, value: str, option: str, ephemeral: bool) -> int:
    lowest = 0 if ephemeral else 1
    if not _PORT.fullmatch(text) or not lowest <= int(text) <= 65535:
        raise OptionRefused(option, f"{value!a}: the port must be a number {lowest}-65535",
                            f"give HOST:PORT with a port {lowest}-65535, e.g. "
                            f"{option} 127.0.0.1:8080")
    return int(text)


def _host(text: str, value: str, option: str, fix: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        return _ipv6(text[1:-1], value, option, fix)
    if _is_ipv4(text) or _is_host_name(text):
        return text
    raise OptionRefused(option, f"{value!a}: the host is not an IPv4 address, a host name "
                                "or [IPv6]", fix)


def _ipv6(text: str, value: str, option: str, fix: str) -> str:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        address = None
    if address is None or address.scope_id:
        raise OptionRefused(option, f"{value!a}: {text!a} in [...] is not an IPv6 address",
                            fix)
    return str(address)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_host_name(text: str) -> bool:
    labels = text.removesuffix(".").split(".")
    return (len(text) <= _MAX_HOST and not labels[-1].isdigit()
            and all(_LABEL.fullmatch(label) for label in labels))


def http_address(value: str | None) -> str | None:
    """Callback of ``agent run --http``: HOST:PORT, port 0 allowed (any free port); IPv4
    only, as the agent's HTTP server."""
    if value is not None:
        host_port(value, "--http", ipv6=False)
    return value


def api_address(value: str) -> str:
    """Callback of ``fleet serve --http``: HOST:PORT, port 1-65535 (devices are told it);
    IPv4 only, as the controller's HTTP server."""
    host_port(value, "--http", ephemeral=False, ipv6=False)
    return value


def _id(value: str, option: str, what: str) -> str:
    try:
        return check_id(value, what)
    except ValueError as exc:
        raise OptionRefused(option, f"{value!a} is not a {what}",
                            str(exc).rpartition("not allowed: ")[2]) from exc


def fleet_option(value: str) -> str:
    """Callback of ``--fleet``: the fleet's MQTT topic level (agent.protocol.topics)."""
    return _id(value, "--fleet", "fleet name")


def device_id_option(value: str) -> str:
    """Callback of ``--device-id``: the device's MQTT topic level (agent.protocol.topics).
    ``%H`` is this machine's host name, as systemd fills it in the agent's unit."""
    return _id(socket.gethostname() if value == HOST_NAME else value, "--device-id",
               "device id")
