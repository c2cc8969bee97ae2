"""Run a Mosquitto broker of our own: generated config, free port, stopped by its PID.

Used by the demo and the tests (which never touch the system's broker), and
the place where later the secure configuration (TLS, passwords, ACL) is written.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from agent.protocol.errors import EdgefleetError

__all__ = ["MosquittoBroker", "MosquittoMissingError", "find_mosquitto", "free_port",
           "stop_process", "wait_for_port"]

_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")


class MosquittoMissingError(EdgefleetError):
    """The mosquitto binary is not installed."""


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path=":".join(_SEARCH))
    if not found:
        raise MosquittoMissingError("the mosquitto broker is not installed",
                                    hint="run: sudo apt-get install -y mosquitto")
    return found


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


@dataclass
class MosquittoBroker:
    """A private Mosquitto on 127.0.0.1 with persistence in its own folder."""

    host: str = "127.0.0.1"
    port: int = 0
    workdir: Path | None = None
    extra_config: list[str] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="edgefleet-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

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
        lines = [f"user {getpass.getuser()}", f"listener {self.port} {self.host}",
                 "allow_anonymous true",
                 "persistence true", f"persistence_location {self.workdir}/",
                 "autosave_interval 1", f"log_dest file {self.workdir}/mosquitto.log",
                 "max_queued_messages 100000", *self.extra_config]
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

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

    def restart(self) -> MosquittoBroker:
        self.stop()
        return self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
