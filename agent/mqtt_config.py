"""Where the broker is and how the client trusts it and proves who it is: plain data.

No paho here, so the command line can build these before the [agent] extra is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from edgefleet.agent.errors import BrokerError

__all__ = ["MqttSecurity", "parse_broker_url"]

_DEFAULT_PORTS = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}
_URL_HINT = "write it like mqtt://127.0.0.1:1883 or mqtts://broker.example:8883"


@dataclass(frozen=True)
class MqttSecurity:
    """How the client checks the broker and proves who it is; every field is optional.

    TLS is on when ``ca_file`` or a client certificate is given, or the URL is
    ``mqtts://`` (then, without ``ca_file``, the system's CAs check the broker). The
    broker's certificate must name the host of the URL. The password never shows in a
    repr or a log.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise BrokerError("a client certificate needs both its certificate and its key",
                              hint="pass --cert DEVICE.crt and --key DEVICE.key together",
                              transient=False)
        if self.password is not None and not self.username:
            raise BrokerError("a password without a user name",
                              hint="pass --username too", transient=False)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None

    def describe(self) -> str:
        """What a log line may say about it (never the password)."""
        parts = [f"CA {self.ca_file}" if self.ca_file else "",
                 f"certificate {self.cert_file}" if self.cert_file else "",
                 f"user {self.username}" if self.username else ""]
        return ", ".join(p for p in parts if p) or "no credentials"


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (host, port)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise BrokerError(
            f"broker URL {url!r} is not mqtt://HOST:PORT", hint=_URL_HINT, transient=False
        )
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise BrokerError(
            f"broker URL {url!r} has a bad port", hint=_URL_HINT, transient=False
        ) from exc
    return parts.hostname, port
