"""``edgefleet fleet serve`` as its own process, with its own peak RSS measured once it stops
(through ``tests.hostile.run_measured``)."""

from __future__ import annotations

import http.client
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgefleet.fleet.mosquitto import free_port
from tests.fleet_harness import TOKEN, wait_until
from tests.hostile import Measured, run_measured

EDGEFLEET = [sys.executable, "-m", "edgefleet"]


@contextmanager
def measured_controller(broker_url: str, public_key: Path, data: Path, fleet: str,
                        timeout_s: float = 300) -> Iterator[tuple[str, dict[str, Measured]]]:
    """The controller's URL while it runs; after, ``done["server"]`` holds what it used."""
    port = free_port()
    argv = [*EDGEFLEET, "fleet", "serve", "--fleet", fleet, "--broker", broker_url,
            "--data-dir", str(data), "--http", f"127.0.0.1:{port}",
            "--trusted-key", str(public_key), "--token", f"ops={TOKEN}"]
    done: dict[str, Measured] = {}
    runner = threading.Thread(target=lambda: done.update(
        server=run_measured(argv, timeout_s=timeout_s)))
    runner.start()
    wait_until(lambda: not runner.is_alive() or answers(port), 60, what="fleet serve")
    try:
        yield f"http://127.0.0.1:{port}", done
    finally:
        stop(str(data))
        runner.join(60)


def answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False


def stop(marker: str) -> None:
    """SIGTERM the ``fleet serve`` whose command line holds ``marker`` (its data dir)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and marker.encode() in argv and b"-c" not in argv[1:4]:
            os.kill(int(proc.name), signal.SIGTERM)
