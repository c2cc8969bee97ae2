"""Run a Mosquitto broker of our own: generated config, free port, stopped by its PID.

Used by the demo, the tests (which never touch the system's broker) and the scale bench
(a tree of brokers: :func:`bridge_lines`, docs/scale-out.md). Plain mode
(``security=None``) listens without TLS and lets anyone in. Secure mode
(:class:`BrokerSecurity`) is the example configuration for operators
(``docs/security.md``): one TLS listener, no anonymous clients, and either client
certificates whose CN becomes the user name (``require_certificate`` and
``use_identity_as_username``) or a password file; the ACL written by
``edgefleet fleet acl`` decides what each user may publish and read.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.protocol.topics import FLEET_LEVEL, PREFIX, Leaf, check_id, fleet_filter
from edgefleet.fleet.clears import DEVICE_RETAINED, clear_prefix
from edgefleet.fleet.errors import FleetError

__all__ = ["BrokerSecurity", "MosquittoBroker", "MosquittoMissingError", "add_passwords",
           "bridge_lines", "find_mosquitto", "free_port", "stop_process", "wait_for_port"]

_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")
_UP = (Leaf.STATUS, Leaf.REPORTED, Leaf.EVENTS, Leaf.TELEMETRY)  # what devices write


class MosquittoMissingError(FleetError):
    """The mosquitto binary is not installed."""


def find_mosquitto(program: str = "mosquitto") -> str:
    """The path of ``mosquitto`` (or of one of its tools, e.g. ``mosquitto_passwd``)."""
    found = shutil.which(program) or shutil.which(program, path=":".join(_SEARCH))
    if not found:
        raise MosquittoMissingError(f"{program} is not installed (it comes with Mosquitto)",
                                    hint="run: sudo apt-get install -y mosquitto")
    return found


def add_passwords(path: Path, users: Iterable[str]) -> dict[str, str]:
    """Give each of ``users`` a new random password in the Mosquitto password file ``path``.

    Other users already in the file keep theirs. Only hashes are written (by
    ``mosquitto_passwd -U`` on a private temporary file), the file gets mode 0600, and the
    plain passwords are returned once: nothing else keeps them.
    """
    new = {user: secrets.token_urlsafe(24) for user in users}
    hashed = _hash(path.parent, new)
    try:
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and line.split(":", 1)[0] not in new]
    except FileNotFoundError:
        kept = []
    except OSError as exc:
        raise EdgefleetError(f"cannot read {path}: {exc.strerror}",
                             hint="pass a password file this user may read and write") from exc
    atomic_write(path, ("\n".join([*kept, *hashed]) + "\n").encode(), mode=0o600)
    return new


def _hash(folder: Path, passwords: dict[str, str]) -> list[str]:
    """``user:hash`` lines for plain ``passwords``, via ``mosquitto_passwd -U``."""
    binary = find_mosquitto("mosquitto_passwd")
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".passwd.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.writelines(f"{user}:{password}\n" for user, password in passwords.items())
        done = subprocess.run([binary, "-U", name], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise EdgefleetError(f"mosquitto_passwd failed: {done.stderr.strip()}",
                                 hint="check that Mosquitto 2.x is installed")
        return [line for line in Path(name).read_text().splitlines() if line.strip()]
    finally:
        Path(name).unlink(missing_ok=True)


def bridge_lines(name: str, root: tuple[str, int], fleet: str) -> list[str]:
    """The Mosquitto config of a leaf broker's bridge to the root broker, for one fleet.

    A tree of brokers (docs/scale-out.md): devices connect to leaf brokers, the
    controller to the root. What devices write (status and its will, reported state,
    events, telemetry) goes up, what the controller writes (desired states, fleet-wide
    topics such as the keyring) comes down, both at QoS 1 with the retain flag kept
    (Mosquitto to Mosquitto, ``try_private``). ``name`` must be unique among the leaves:
    it names the bridge's client id on the root. The bridge keeps its session
    (``cleansession false``), so QoS 1 messages wait on the leaf while the root is away.
    A decommission's clears of the devices' retained status and reports come down from
    ``_clear/`` on the root onto the devices' own topics (:mod:`edgefleet.fleet.clears`).
    """
    check_id(name, "bridge name")
    host, port = root
    up = [f"topic {fleet_filter(fleet, leaf)} out 1" for leaf in _UP]
    down = [f"topic {fleet_filter(fleet, Leaf.DESIRED)} in 1",
            f"topic {PREFIX}/{fleet}/{FLEET_LEVEL}/# in 1"]
    clears = [f"topic +/{leaf.value} in 1 {PREFIX}/{fleet}/ {clear_prefix(fleet)}"
              for leaf in DEVICE_RETAINED]
    return [f"connection {name}", f"address {host}:{port}", "bridge_protocol_version mqttv311",
            "cleansession false", *up, *down, *clears]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to a child, wait (kill after 10 s), and close its stderr pipe."""
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr:
        process.stderr.close()


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


@dataclass(frozen=True)
class BrokerSecurity:
    """A TLS listener that admits only clients with a certificate or a password.

    ``client_certificates``: every client shows a certificate signed by ``cafile`` and
    its CN is its user name (``require_certificate``, ``use_identity_as_username``).
    Otherwise clients authenticate with ``password_file`` (``mosquitto_passwd``) and use
    TLS only to check the broker and to hide the password. ``acl_file`` limits topics;
    ``username_as_clientid`` makes the client id the user name, so one device's
    credential cannot take over another device's session by reusing its client id.
    """

    cafile: Path
    certfile: Path
    keyfile: Path
    client_certificates: bool = True
    password_file: Path | None = None
    acl_file: Path | None = None
    username_as_clientid: bool = True
    crlfile: Path | None = None  # revoked client certificates (``edgefleet certs revoke``)

    def __post_init__(self) -> None:
        if not self.client_certificates and self.password_file is None:
            raise EdgefleetError("a secure broker needs client certificates or a password "
                                 "file", hint="pass client_certificates=True or "
                                              "password_file=PATH")
        for path in (self.cafile, self.certfile, self.keyfile, self.password_file,
                     self.acl_file, self.crlfile):
            if path is not None and not Path(path).is_file():
                raise EdgefleetError(f"{path} does not exist",
                                     hint="see docs/security.md for the files to create")

    def listener_lines(self) -> list[str]:
        """The options that belong to the TLS listener."""
        lines = [f"cafile {self.cafile}", f"certfile {self.certfile}",
                 f"keyfile {self.keyfile}", "tls_version tlsv1.2"]  # the lowest allowed
        if self.client_certificates:
            lines += ["require_certificate true", "use_identity_as_username true"]
        if self.username_as_clientid:
            lines.append("use_username_as_clientid true")
        if self.crlfile is not None:
            lines.append(f"crlfile {self.crlfile}")
        return lines

    def global_lines(self) -> list[str]:
        lines = ["allow_anonymous false"]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        return lines


@dataclass
class MosquittoBroker:
    """A private Mosquitto on 127.0.0.1 with persistence in its own folder."""

    host: str = "127.0.0.1"
    port: int = 0
    workdir: Path | None = None
    extra_config: list[str] = field(default_factory=list)
    security: BrokerSecurity | None = None
    # seconds between saves of the whole in-memory database: 1 for the tests (a SIGKILL
    # loses at most a second); Mosquitto's default is 1800. A save blocks the broker's
    # only thread for as long as it takes to write every retained and queued message
    autosave_interval_s: int = 1
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="edgefleet-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.security else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def config_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "mosquitto.conf"

    def write_config(self) -> Path:
        assert self.workdir is not None
        # Started as root, Mosquitto switches to the 'mosquitto' user, which cannot write
        # into a private (0700) folder: nothing would persist across a restart. Keep the
        # user it was started as.
        lines = [f"user {getpass.getuser()}", *self._access_lines(),
                 "persistence true", f"persistence_location {self.workdir}/",
                 f"autosave_interval {self.autosave_interval_s}",
                 f"log_dest file {self.workdir}/mosquitto.log",
                 "max_queued_messages 100000", *self.extra_config]
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    def _access_lines(self) -> list[str]:
        listener = f"listener {self.port} {self.host}"
        if self.security is None:
            return [listener, "allow_anonymous true"]
        return [*self.security.global_lines(), listener, *self.security.listener_lines()]

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        binary = find_mosquitto()
        self._process = subprocess.Popen([binary, "-c", str(self.write_config())],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise EdgefleetError(f"mosquitto did not listen on {self.host}:{self.port}",
                                 hint=f"see {self.workdir}/mosquitto.log")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop by PID (SIGTERM saves persistent sessions; SIGKILL simulates a crash)."""
        process, self._process = self._process, None
        stop_process(process, sig)

    def reload(self, timeout: float = 10.0) -> None:
        """Re-read the password file, the ACL and the revocation list (SIGHUP); connected
        clients stay. Returns once the broker logged the reload (its main loop handles
        the signal between two rounds of network work, so a connection made after this
        returns meets the new files)."""
        if self._process is None:
            return
        log = Path(self.workdir) / "mosquitto.log" if self.workdir is not None else None
        before = self._reloads(log)
        self._process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while log is not None and self._reloads(log) <= before:
            if time.monotonic() >= deadline:
                raise EdgefleetError(f"mosquitto did not reload within {timeout:g} s",
                                     hint=f"see {log}")
            time.sleep(0.02)

    @staticmethod
    def _reloads(log: Path | None) -> int:
        try:
            return log.read_text(errors="replace").count("Reloading config.") if log else 0
        except FileNotFoundError:
            return 0

    def restart(self) -> MosquittoBroker:
        self.stop()
        return self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
