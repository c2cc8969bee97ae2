"""One shard of the benchmark's simulated fleet in its own process, driven over a pipe.

One process holds at most as many connections as its open-file limit (20,000 here, soft
and hard): a fleet beyond that runs as several shards, each a :class:`SimulatedFleet`
with its own device-id prefix on its own broker. The parent (:class:`Shard`) writes
commands on the child's stdin, one a line (``start``, ``stop``); the child answers in
JSON lines on stdout: ``{"devices": [...]}`` once built, then ``{"online": n, "serving": n,
"done": n}`` every ``POLL_S`` (``serving``: devices that run the target version, committed
or in probation; ``done``: committed), then
``{"stopped": true}``. Device-side progress costs the controller nothing.

    python -m bench.scale_sim URL FLEET COUNT PREFIX V1_BUNDLE PUBLIC_KEY TARGET OPTIONS_JSON
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

POLL_S = 1.0  # each poll reads every device of the shard (about 1 us each)


# --- the parent's side ------------------------------------------------------------------

@dataclass
class Shard:
    """A shard's process: its device ids, its latest progress line, start and stop."""

    process: subprocess.Popen[bytes]
    devices: list[str] = field(default_factory=list)
    latest: dict[str, Any] = field(default_factory=dict)
    _lines: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)

    @classmethod
    def spawn(cls, argv: list[str], log: IO[bytes]) -> Shard:
        process = subprocess.Popen([sys.executable, "-m", "bench.scale_sim", *argv],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                   cwd=Path(__file__).resolve().parent.parent)
        shard = cls(process)
        threading.Thread(target=shard._read, name="bench-shard", daemon=True).start()
        return shard

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            data = json.loads(line)
            if "online" in data:
                self.latest = data
            else:
                self._lines.put(data)
        self._lines.put({"exited": self.process.poll()})

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        """The next non-progress line; it must hold ``key``."""
        try:
            data = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"simulator shard {self.process.pid}: no {key!r} "
                               f"in {timeout:g} s") from None
        if key not in data:
            raise RuntimeError(f"simulator shard {self.process.pid} said {data}, not {key!r}")
        return data

    def ready(self, timeout: float = 300.0) -> Shard:
        self.devices = list(self.expect("devices", timeout)["devices"])
        return self

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def count(self, key: str) -> int:
        return int(self.latest.get(key, 0))

    def stop(self, timeout: float = 120.0) -> None:
        """Every device says offline and disconnects; the process ends."""
        if self.process.poll() is None:
            self.send("stop")
            self.expect("stopped", timeout)
        self.process.wait(timeout=30)

    def close(self) -> None:
        """Stop if still running; killed if it does not stop (a failed run's cleanup)."""
        with contextlib.suppress(Exception):  # any failure: the kill below ends it
            self.stop(timeout=60)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# --- the child's side -------------------------------------------------------------------

def progress(devices: Any, target: str) -> dict[str, int]:
    views = list(devices.values())
    return {"online": sum(v.online for v in views),
            "serving": sum(1 for v in views if v.active_version == target),
            "done": sum(1 for v in views
                        if v.update_state == "COMMITTED" and v.active_version == target)}


def read_commands(commands: queue.Queue[str]) -> None:
    """Each stdin line; ``stop`` when the parent closes the pipe (or dies)."""
    for line in sys.stdin:
        commands.put(line.strip())
    commands.put("stop")


def say(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def run(url: str, fleet: str, count: int, prefix: str, bundle: Path, public: Path,
        target: str, options: dict[str, Any]) -> None:
    from edgefleet.agent.protocol.signing import TrustedKeys
    from edgefleet.fleet.simulate import SimOptions, SimulatedFleet

    sim = SimulatedFleet(url, fleet, count, TrustedKeys.from_paths([public]),
                         SimOptions(device_prefix=prefix, **options), bundle)
    say({"devices": list(sim.devices)})
    commands: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_commands, args=(commands,), daemon=True).start()
    if commands.get() != "start":
        say({"stopped": True})
        return
    sim.start()
    while True:
        try:
            command = commands.get(timeout=POLL_S)
        except queue.Empty:
            say(progress(sim.devices, target))
            continue
        if command == "stop":
            sim.stop()
            say({"stopped": True})
            return


def main() -> None:
    url, fleet, count, prefix, bundle, public, target, options = sys.argv[1:9]
    started = time.monotonic()
    run(url, fleet, int(count), prefix, Path(bundle), Path(public), target,
        json.loads(options))
    print(f"shard {prefix} ran {time.monotonic() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
