"""``make arm-check``: the agent on 64-bit Arm Linux, emulated on this machine.

An arm64 Debian root filesystem (``scripts/arm_check_rootfs.py``, cached) runs under
qemu-user-static through binfmt_misc. Inside it, the rootfs's own Python gets a venv with
``edgefleet[agent]`` from PyPI's aarch64 wheels and this checkout's own wheel. The agent
then runs there (arm64 code end to end) while this machine plays the rest of the fleet
with the project's own code: a Mosquitto of its own on a free port, ``edgefleet fleet
serve``, tritonclient, and bundles trained, converted and signed here.

Checks: the Python inside is aarch64 and the runtimes are aarch64 wheels; the agent
serves a ``.tflite`` bundle to tritonclient (outputs agree with the same model run here);
it reports telemetry and registers with the controller; it takes an over-the-air update
to an ``.onnx`` bundle from a rollout; it serves that; it stops cleanly. Exit 1 when any
check fails; a table of checks and times at the end. Times under emulation are not
device figures.

Run as root (apt-get, binfmt_misc, chroot): ``make arm-check``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import arm_check_rootfs as rootfs
import numpy as np
import numpy.typing as npt
import tritonclient.http as triton
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefleet.agent.runtime import load_runtime
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port, stop_process, wait_for_port

REPO = Path(__file__).resolve().parent.parent
WORK = rootfs.CACHE / "arm-check-run"
FLEET, DEVICE, TOKEN = "armcheck", "pi-arm64", "arm-check-token"
VENV, INSIDE = "/opt/edgefleet", "/tmp/arm-check"
DATA_DIR = "/var/lib/edgefleet"
EMULATED_TIMEOUT_S = 600.0
PIP_TIMEOUT_S = 3600.0  # a first install compiles every module under emulation
CHROOT_ENV = {"PATH": f"{VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
              "LANG": "C.UTF-8", "TF_CPP_MIN_LOG_LEVEL": "3",
              "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1",
              "PIP_CERT": rootfs.HOST_CA, "SSL_CERT_FILE": rootfs.HOST_CA}
ARM_WHEELS = ("ai_edge_litert", "onnxruntime", "numpy")
# Piped (make, CI logs): wide enough that step lines and the table print whole.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
F32 = npt.NDArray[np.float32]


class CheckFailedError(rootfs.ArmCheckError):
    """A check ran and what it measured is not what the agent promises."""


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    seconds: float
    detail: str


@dataclass
class Run:
    """Steps in order; a failed step that later ones need stops the run."""

    results: list[Result] = field(default_factory=list)
    stopped: bool = False

    def step(self, name: str, action: Callable[[], str], *, needed: bool = True) -> None:
        if self.stopped:
            self.results.append(Result(name, False, 0.0, "not run: an earlier step failed"))
            return
        console.print(f"[bold]▶[/] {escape(name)} …")
        start = time.monotonic()
        ok, detail = _attempt(action)
        seconds = time.monotonic() - start
        self.results.append(Result(name, ok, seconds, detail))
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        console.print(f"{mark} {escape(name)}  [dim]{seconds:.1f} s[/]  {escape(detail)}")
        self.stopped = not ok and needed

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)


def _attempt(action: Callable[[], str]) -> tuple[bool, str]:
    try:
        return True, action()
    except rootfs.ArmCheckError as exc:
        return False, str(exc)
    except Exception as exc:  # a broken step is a failed check with its reason, not a crash
        return False, f"{type(exc).__name__}: {exc}"


@dataclass
class Fleet:
    """This machine's side (broker, controller, tritonclient) and the emulated device."""

    root: Path = Path()
    stack: ExitStack = field(default_factory=ExitStack)
    bundles: dict[str, Path] = field(default_factory=dict)
    keys: Path = WORK / "keys"
    broker: MosquittoBroker | None = None
    client: FleetClient | None = None
    agent: subprocess.Popen[bytes] | None = None
    http_port: int = 0
    events: Any = None
    x: F32 = field(default_factory=lambda: np.zeros((0,), np.float32))
    y: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((0,), np.int64))

    def inside(self, argv: Sequence[str], timeout: float = EMULATED_TIMEOUT_S) -> str:
        """Run ``argv`` as arm64 in the root filesystem; its stdout."""
        done = subprocess.run([*rootfs.NICE, *rootfs.chroot_command(self.root, argv, CHROOT_ENV)],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            raise CheckFailedError(f"{' '.join(argv[:3])} failed in the arm64 root: {tail}")
        return done.stdout.strip()

    def host_path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")


# --- the emulated machine ------------------------------------------------------------

def host_tools() -> str:
    installed = rootfs.ensure_host_tools()
    return f"installed {', '.join(installed)}" if installed else "all present"


def binfmt() -> str:
    return f"qemu-aarch64 registered, flags {rootfs.ensure_binfmt()}"


def build_rootfs(fleet: Fleet) -> str:
    recipe = rootfs.host_recipe()
    fleet.root, built = rootfs.ensure_rootfs(recipe)
    size = _du(fleet.root)
    how = "built now" if built else "cached (recipe unchanged)"
    return f"{recipe.release} {recipe.arch} from {recipe.mirror}: {how}, {size} in {fleet.root}"


def _du(path: Path) -> str:
    done = subprocess.run(["du", "-shx", str(path)], capture_output=True, text=True, check=False)
    return done.stdout.split("\t")[0] if done.returncode == 0 else "?"


def arm_python(fleet: Fleet) -> str:
    fleet.stack.enter_context(rootfs.mounted(fleet.root))
    found = fleet.inside(["python3", "-c", "import platform, sys; "
                          "print(platform.machine(), platform.python_version())"])
    machine = found.split()[0] if found else ""
    if machine != "aarch64":
        raise CheckFailedError(f"python3 in the root filesystem says {found!r}, not aarch64")
    return f"python3 {found.split()[-1]} on {machine} (uname -m: {fleet.inside(['uname', '-m'])})"


# --- what the host builds --------------------------------------------------------------

def wheel() -> str:
    """The wheel of the committed tree (HEAD): what a release of this checkout would ship."""
    source, out = WORK / "source", WORK / "wheel"
    for folder in (source, out):
        shutil.rmtree(folder, ignore_errors=True)
    source.mkdir(parents=True)
    commit = _git("rev-parse", "--short", "HEAD").decode().strip()
    with tarfile.open(fileobj=io.BytesIO(_git("archive", "HEAD"))) as tar:
        tar.extractall(source, filter="data")
    _host([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)])
    built = next(out.glob("edgefleet-*.whl"))
    return f"{built.name} from commit {commit} ({built.stat().st_size // 1024} KiB)"


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                          check=True).stdout


def bundles(fleet: Fleet) -> str:
    from tests.conftest import Keys, make_bundle
    from tests.models import train_digits_cnn

    shutil.rmtree(fleet.keys, ignore_errors=True)
    _host([str(Path(sys.executable).with_name("edgefleet")), "keys", "generate",
           "--out", str(fleet.keys)])
    keys = Keys(fleet.keys / "signing.key", fleet.keys / "signing.pub")
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):  # Keras' export chatter
        warnings.simplefilter("ignore", FutureWarning)
        models = train_digits_cnn(WORK / "models")
    fleet.x, fleet.y = models.digits.x_test, models.digits.y_test
    fleet.bundles = {
        "tflite": make_bundle(models.tflite, WORK / "digits-1.0.0.efb", keys, "1.0.0"),
        "onnx": make_bundle(models.onnx, WORK / "digits-2.0.0.efb", keys, "2.0.0")}
    return ", ".join(f"{path.name} ({fmt}, {path.stat().st_size // 1024} KiB)"
                     for fmt, path in fleet.bundles.items())


def _host(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CheckFailedError(f"{' '.join(argv[:4])} failed: {done.stderr.strip()[-800:]}")


# --- the install on the device -----------------------------------------------------------

def pip_install(fleet: Fleet) -> str:
    staged = fleet.host_path(INSIDE)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    built = next((WORK / "wheel").glob("edgefleet-*.whl"))
    shutil.copy2(built, staged / built.name)
    shutil.copy2(REPO / "constraints.txt", staged / "constraints.txt")
    start = time.monotonic()
    if not fleet.host_path(f"{VENV}/bin/pip").exists():
        fleet.inside(["python3", "-m", "venv", VENV])
    venv = time.monotonic() - start
    target = f"{INSIDE}/{built.name}"
    fleet.inside(["pip", "install", "-q", "-c", f"{INSIDE}/constraints.txt", f"{target}[agent]"],
                 timeout=PIP_TIMEOUT_S)
    fleet.inside(["pip", "install", "-q", "--no-deps", "--force-reinstall", target])
    return f"venv {venv:.0f} s, pip {time.monotonic() - start - venv:.0f} s; {_installed(fleet)}"


def _installed(fleet: Fleet) -> str:
    listed = {p["name"].lower(): p["version"]
              for p in json.loads(fleet.inside(["pip", "list", "--format", "json"]))}
    if any(name.startswith("tensorflow") for name in listed):
        raise CheckFailedError("TensorFlow was installed: edgefleet[agent] must not need it")
    fleet.inside(["pip", "check"])
    wanted = ("edgefleet", "ai-edge-litert", "onnxruntime", "numpy", "paho-mqtt")
    return "pip check clean, no TensorFlow; " + ", ".join(
        f"{name} {listed.get(name, 'missing')}" for name in wanted)


def arm_wheels(fleet: Fleet) -> str:
    site = next(fleet.host_path(f"{VENV}/lib").glob("python3*/site-packages"))
    tags = {name: _wheel_tags(site, name) for name in ARM_WHEELS}
    foreign = {name: tag for name, tag in tags.items() if "aarch64" not in tag}
    if foreign:
        raise CheckFailedError(f"not aarch64 builds: {foreign}")
    return "; ".join(f"{name}: {tag}" for name, tag in tags.items())


def _wheel_tags(site: Path, name: str) -> str:
    found = next(site.glob(f"{name}-*.dist-info/WHEEL"), None)
    if found is None:
        return "not installed"
    return ",".join(line.split(":", 1)[1].strip() for line in found.read_text().splitlines()
                    if line.startswith("Tag:"))


# --- this machine's side of the fleet ----------------------------------------------------

def host_fleet(fleet: Fleet) -> str:
    from tests.brokers import Subscriber

    for stale in ("fleet.db", "controller", "mosquitto"):  # each run starts a new fleet
        target = WORK / stale
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    fleet.broker = MosquittoBroker(workdir=WORK / "mosquitto").start()
    fleet.stack.callback(fleet.broker.stop)
    fleet.events = Subscriber(fleet.broker.url, [f"edgefleet/v1/{FLEET}/{DEVICE}/#"])
    fleet.stack.callback(fleet.events.close)
    port = free_port()
    argv = [sys.executable, "-m", "edgefleet", "fleet", "serve", "--fleet", FLEET,
            "--broker", fleet.broker.url, "--db", f"sqlite:///{WORK / 'fleet.db'}",
            "--data-dir", str(WORK / "controller"), "--http", f"127.0.0.1:{port}",
            "--trusted-key", str(fleet.keys / "signing.pub"), "--token", f"ops={TOKEN}",
            "--tick", "0.5"]
    controller = _spawn(argv, WORK / "controller.log")
    fleet.stack.callback(stop_process, controller)
    if not wait_for_port("127.0.0.1", port, 60):
        raise CheckFailedError(f"the controller did not listen; see {WORK / 'controller.log'}")
    fleet.client = FleetClient(f"http://127.0.0.1:{port}", TOKEN)
    return (f"Mosquitto on {fleet.broker.url} (PID {fleet.broker.pid}), controller on "
            f"127.0.0.1:{port} (PID {controller.pid})")


def _spawn(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT)


def agent_starts(fleet: Fleet) -> str:
    data = fleet.host_path(DATA_DIR)
    shutil.rmtree(data, ignore_errors=True)
    (data / "keys").mkdir(parents=True)
    shutil.copy2(fleet.keys / "signing.pub", data / "keys" / "signing.pub")
    shutil.copy2(fleet.bundles["tflite"], fleet.host_path(f"{INSIDE}/digits-1.0.0.efb"))
    assert fleet.broker is not None
    fleet.http_port = free_port()
    argv = ["edgefleet", "agent", "run", "--bundle", f"{INSIDE}/digits-1.0.0.efb",
            "--broker", fleet.broker.url, "--fleet", FLEET, "--device-id", DEVICE,
            "--http", f"127.0.0.1:{fleet.http_port}", "--data-dir", DATA_DIR,
            "--profile", "generic-arm64", "--telemetry-interval", "2"]
    fleet.agent = _spawn([*rootfs.NICE, *rootfs.chroot_command(fleet.root, argv, CHROOT_ENV)],
                         WORK / "agent.log")
    fleet.stack.callback(stop_process, fleet.agent)
    if not wait_for_port("127.0.0.1", fleet.http_port, EMULATED_TIMEOUT_S):
        raise CheckFailedError(f"the agent did not listen; see {WORK / 'agent.log'}")
    return f"installed v1.0.0 and listening on 127.0.0.1:{fleet.http_port} (agent PID " \
           f"{fleet.agent.pid}; start-up time is emulation time, not a device figure)"


def serves(fleet: Fleet, fmt: str, version: str) -> str:
    client = triton.InferenceServerClient(f"127.0.0.1:{fleet.http_port}",
                                          network_timeout=EMULATED_TIMEOUT_S)
    meta = client.get_model_metadata("digits")
    if meta.get("versions") != [version]:
        raise CheckFailedError(f"the agent serves {meta.get('versions')}, not {version}")
    tensor = triton.InferInput(meta["inputs"][0]["name"], list(fleet.x.shape), "FP32")
    tensor.set_data_from_numpy(fleet.x, binary_data=True)
    start = time.monotonic()
    probs = client.infer("digits", [tensor]).as_numpy(meta["outputs"][0]["name"])
    took = time.monotonic() - start
    return _judge(fleet, fmt, probs, meta) + f"; one request of {len(fleet.x)} images " \
        f"took {took * 1000:.0f} ms under emulation (not a device latency)"


def _judge(fleet: Fleet, fmt: str, probs: Any, meta: dict[str, Any]) -> str:
    if probs is None:
        raise CheckFailedError("the response has no output tensor")
    accuracy = float((probs.argmax(1) == fleet.y).mean())
    here = _host_outputs(fleet.bundles[fmt], fleet.x, meta["outputs"][0]["name"])
    delta = float(np.abs(probs - here).max())
    if accuracy < 0.95 or delta > 1e-4:
        raise CheckFailedError(f"accuracy {accuracy:.3f} (want ≥ 0.95), max |arm64 − x86| "
                               f"{delta:.2g} (want ≤ 1e-4)")
    return (f"{meta.get('platform')}: accuracy {accuracy:.3f} on {len(fleet.y)} digits, "
            f"max |arm64 − x86_64| {delta:.1g}")


def _host_outputs(bundle: Path, x: F32, output: str) -> Any:
    """The same model run on this machine (x86_64), from the bundle's own model file."""
    with tarfile.open(bundle) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("model."))
        extracted = tar.extractfile(member)
        if extracted is None:
            raise CheckFailedError(f"{bundle} has no readable {member.name}")
        runtime = load_runtime(extracted.read(), member.name.rsplit(".", 1)[-1])
    try:
        return runtime.run_array(x)[output]
    finally:
        runtime.close()


def telemetry(fleet: Fleet) -> str:
    def counted(messages: list[Any]) -> list[dict[str, Any]]:
        points = [_points(m.payload) for m in messages if m.topic.endswith("/telemetry")]
        return [p for batch in points for p in batch if p.get("values", {}).get("inferences")]

    if not fleet.events.wait_for(lambda ms: bool(counted(ms)), 60):
        raise CheckFailedError("no telemetry point counting the inferences reached the host's "
                               f"Mosquitto in 60 s; see {WORK / 'agent.log'}")
    status = [m.payload for m in fleet.events.on("/status")]
    if b"online" not in status:
        raise CheckFailedError(f"the retained status is {status}, not online")
    values = counted(fleet.events.messages)[0]["values"]
    return f"status online; telemetry {_short(values)}"


def _points(payload: bytes) -> list[dict[str, Any]]:
    decoded = json.loads(payload)
    return decoded if isinstance(decoded, list) else [decoded]


def _short(values: dict[str, Any]) -> str:
    shown = {k: v for k, v in values.items() if isinstance(v, int | str) or k == "inferences"}
    return json.dumps(dict(list(shown.items())[:6]))


def registered(fleet: Fleet) -> str:
    assert fleet.client is not None
    client = fleet.client

    def found() -> dict[str, Any] | None:
        device = {d["id"]: d for d in client.get("/api/v1/devices")}.get(DEVICE)
        return device if device and (device.get("active") or {}).get("version") else None

    device = _wait(found, 60, "the controller to list the device with its active bundle")
    return (f"{DEVICE}: active {device['active']['name']} {device['active']['version']}, "
            f"profile {device.get('profile')}, runtimes {device.get('runtimes')}")


def over_the_air(fleet: Fleet) -> str:
    assert fleet.client is not None
    client = fleet.client
    client.upload("/api/v1/models", fleet.bundles["onnx"].read_bytes())
    rollout = client.post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": [f"device:{DEVICE}"], "waves": ["100%"],
        "soak_s": 2, "device_timeout_s": EMULATED_TIMEOUT_S})
    path = f"/api/v1/rollouts/{rollout['id']}"
    done = _wait(lambda: (r := client.get(path))["state"] not in ("PENDING", "RUNNING") and r,
                 EMULATED_TIMEOUT_S, "the rollout to end")
    states = _update_states(fleet, "2.0.0")
    if done["state"] != "SUCCEEDED" or states[-1:] != ["COMMITTED"]:
        raise CheckFailedError(f"rollout {done['state']} ({done.get('reason')}); the device "
                               f"went {' → '.join(states)}")
    return f"rollout {rollout['id']} SUCCEEDED; device went {' → '.join(states)}"


def _update_states(fleet: Fleet, version: str) -> list[str]:
    seen: dict[int, str] = {}
    for message in fleet.events.on("/events"):
        event = json.loads(message.payload)
        if event.get("kind") == "update" and (event.get("bundle") or {}).get("version") == version:
            seen[int(event["seq"])] = str(event["state"])
    return [seen[seq] for seq in sorted(seen)]


def clean_stop(fleet: Fleet) -> str:
    process, fleet.agent = fleet.agent, None
    assert process is not None
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired as exc:
        process.kill()
        raise CheckFailedError("the agent did not stop within 120 s of SIGTERM") from exc
    said = fleet.events.wait_for(lambda _: fleet.events.on("/status")[-1].payload == b"offline",
                                 30)
    if code != 0 or not said:
        raise CheckFailedError(f"exit code {code}, status offline published: {said}")
    return "SIGTERM → exit 0, retained status offline"


def _wait(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    raise CheckFailedError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- the run -------------------------------------------------------------------------------

def steps(fleet: Fleet) -> list[tuple[str, Callable[[], str], bool]]:
    """(name, action, later steps need it)."""
    return [
        ("host tools (apt-get)", host_tools, True),
        ("binfmt_misc: qemu-aarch64", binfmt, True),
        ("debootstrap arm64 root filesystem", lambda: build_rootfs(fleet), True),
        ("python3 inside is aarch64", lambda: arm_python(fleet), True),
        ("wheel of this checkout (host)", wheel, True),
        ("keys, digits CNN, .tflite + .onnx bundles (host)", lambda: bundles(fleet), True),
        ("pip install edgefleet[agent] (arm64)", lambda: pip_install(fleet), True),
        ("runtimes are aarch64 wheels", lambda: arm_wheels(fleet), False),
        ("Mosquitto + fleet serve (host)", lambda: host_fleet(fleet), True),
        ("agent run starts (arm64)", lambda: agent_starts(fleet), True),
        (".tflite bundle served to tritonclient", lambda: serves(fleet, "tflite", "1.0.0"),
         False),
        ("telemetry to the host's Mosquitto", lambda: telemetry(fleet), False),
        ("registered with the controller", lambda: registered(fleet), False),
        ("over-the-air update to .onnx 2.0.0", lambda: over_the_air(fleet), True),
        (".onnx bundle served to tritonclient", lambda: serves(fleet, "onnx", "2.0.0"), False),
        ("clean stop on SIGTERM", lambda: clean_stop(fleet), False),
    ]


def table(run: Run, total: float) -> Table:
    out = Table(title=f"arm-check: {'passed' if run.ok else 'FAILED'} in {total:.0f} s "
                      "(times under qemu emulation are not device figures)")
    for column in ("check", "result", "seconds", "measured"):
        out.add_column(column, overflow="fold")
    for result in run.results:
        out.add_row(escape(result.name), "[green]ok[/]" if result.ok else "[red]FAILED[/]",
                    f"{result.seconds:.1f}", escape(result.detail))
    return out


def main() -> int:
    sys.path.insert(0, str(REPO))  # tests.models and tests.conftest build the bundles
    if os.geteuid() != 0:
        console.print("[red]arm-check needs root[/] (apt-get, binfmt_misc, chroot): "
                      "run: sudo make arm-check")
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    console.print(f"arm-check: work files and logs in {WORK}")
    run, fleet, start = Run(), Fleet(), time.monotonic()
    with fleet.stack:
        for name, action, needed in steps(fleet):
            run.step(name, action, needed=needed)
    console.print(table(run, time.monotonic() - start))
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
