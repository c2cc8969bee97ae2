"""Updates that could never succeed, or never stop, on a real device data dir.

* corrupt downloads (a bit flipped anywhere, served by a real HTTP server) are discarded,
  and a complete file left before is verified again before it is reused;
* downloads are bounded by the declared size: servers that over-send (a Content-Length
  larger than declared, chunked or close-delimited bodies longer than declared, a 200 to a
  Range request) are refused after one GET, with no more than the declared size + one byte
  read and nothing left on disk;
* a full disk (ENOSPC on a real tmpfs out of inodes, EFBIG from RLIMIT_FSIZE at every
  write offset) gives a one-line error, the model served unchanged, no temp file left;
* a new rollout of a bundle the device rolled back installs it (real broker, controller
  and agent), while the same attempt repeated is ignored;
* ``agent rollback`` with nothing to return to is refused, and changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgefleet.agent.core import Agent
from edgefleet.agent.lock import LOCK_FILE
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.payloads import DesiredState
from edgefleet.agent.update import layout, local
from edgefleet.agent.update.attempts import starts_attempt
from edgefleet.agent.update.device import DeviceEffects, UpdateSettings
from edgefleet.agent.update.disk import DiskFullError, sweep
from edgefleet.agent.update.download import CHUNK, DownloadError
from edgefleet.agent.update.runner import UpdateRunner
from edgefleet.agent.update.states import Journal, UpdateState
from edgefleet.agent.update.target import UpdateTarget
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import wait_until
from tests.hostile import HOSTILE, MiB, peak_traced_bytes
from tests.models import TrainedModels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-update")
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            "v2": make_bundle(digits_models.onnx, root / "v2.efb", signing_keys, "2.0.0")}


# --- a server that misbehaves on demand -------------------------------------------------

JUNK = b"\xa5" * CHUNK


@dataclass
class Hostile:
    """``/MODE/ARG/NAME`` serves NAME of ``root``: ``good/0`` honours Range, ``flip/BIT``
    flips one bit (honouring Range), ``over/EXTRA:HOW`` sends EXTRA bytes past the file
    (HOW: ``length`` announces them, ``short`` announces less than the file, ``chunked``
    and ``close`` announce nothing, ``range200`` ignores Range and sends them chunked)."""

    root: Path
    gets: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Hostile:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with outer.lock:
                    outer.gets.append(self.path)
                with contextlib.suppress(OSError):  # the client hung up: it stopped reading
                    outer.answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def url(self, mode: str, arg: object, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/{arg}/{name}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        _, mode, arg, name = h.path.split("/", 3)
        data = (self.root / name).read_bytes()
        if mode == "flip":
            bit = int(arg)
            flipped = bytearray(data)
            flipped[bit // 8] ^= 1 << (bit % 8)
            data = bytes(flipped)
        if mode in ("good", "flip"):
            _ranged(h, data)
            return
        extra, how = arg.split(":")
        _oversend(h, data, int(extra), how)


def _ranged(h: BaseHTTPRequestHandler, data: bytes) -> None:
    spec = h.headers.get("Range")
    start = int(spec.split("=")[1].split("-")[0]) if spec else 0
    h.send_response(206 if spec else 200)
    if spec:
        h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    h.send_header("Content-Length", str(len(data) - start))
    h.end_headers()
    h.wfile.write(data[start:])


def _oversend(h: BaseHTTPRequestHandler, data: bytes, extra: int, how: str) -> None:
    h.send_response(200)
    if how == "length":
        h.send_header("Content-Length", str(len(data) + extra))
    elif how == "short":
        h.send_header("Content-Length", str(len(data) - 1))
    elif how in ("chunked", "range200"):
        h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    chunked = how in ("chunked", "range200")
    for piece in _pieces(data, extra):
        h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
    if chunked:
        h.wfile.write(b"0\r\n\r\n")
    h.close_connection = True


def _pieces(data: bytes, extra: int) -> Iterator[bytes]:
    yield from (data[i:i + CHUNK] for i in range(0, len(data), CHUNK))
    while extra > 0:  # streamed from one buffer: the server holds no copy of what it sends
        yield JUNK[:extra]
        extra -= CHUNK


@pytest.fixture(scope="module")
def server(versions: dict[str, Path]) -> Iterator[Hostile]:
    hostile = Hostile(versions["v1"].parent).start()
    yield hostile
    hostile.stop()


# --- helpers ------------------------------------------------------------------------------

def _target(bundle: Path, keys: Keys, url: str, rollout: str | None = None) -> UpdateTarget:
    verified = read_bundle(bundle, keys.trusted)
    return UpdateTarget(name=verified.manifest.name, version=verified.manifest.version,
                        sha256=verified.sha256, url=url, size=bundle.stat().st_size,
                        rollout=rollout)


def _leftovers(data_dir: Path) -> list[str]:
    """Temp files, partial downloads and downloads anywhere in the data dir."""
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")
                  if p.is_file() and (p.name.endswith((".tmp", ".part"))
                                      or p.parent.name == "downloads"))


@pytest.fixture(scope="module")
def device_dir(versions: dict[str, Path], signing_keys: Keys,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with v1 installed and committed (copied by the tests that change it)."""
    data = tmp_path_factory.mktemp("device-v1")
    agent = Agent(signing_keys.trusted)
    local.install(agent, data, versions["v1"])
    agent.close()
    return data


# --- 1. a corrupt download is discarded; a complete one is verified before reuse --------

def test_a_bit_flipped_anywhere_is_discarded_and_the_next_attempt_downloads_again(
        server: Hostile, versions: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    bundle = versions["v2"]
    bits = bundle.stat().st_size * 8
    effects = DeviceEffects(tmp_path, Agent(signing_keys.trusted))
    good = Journal(UpdateState.DOWNLOADING, _target(bundle, signing_keys,
                                              server.url("good", 0, bundle.name)))
    stored = effects.data_dir / "downloads" / f"{good.target.sha256}.efb"
    refused: list[int] = []

    @HOSTILE
    @given(bit=st.one_of(st.integers(0, bits - 1), st.integers(0, 4096 * 8 - 1)))
    def check(bit: int) -> None:
        flipped = Journal(UpdateState.DOWNLOADING,
                          replace(good.target, url=server.url("flip", bit, bundle.name)))
        effects.download(flipped)
        outcome, peak = peak_traced_bytes(lambda: effects.verify(flipped))
        assert peak < 16 * MiB, f"verifying a {bits // 8} B bundle took {peak} B"
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, EdgefleetError), repr(outcome)  # named, no traceback
            assert _leftovers(tmp_path) == [], "a download that failed is discarded"
            refused.append(bit)
        # the flipped bytes left complete (a run killed before verifying): reused only
        # after they verify again, else fetched again from the good server
        stored.write_bytes(server_bytes(bundle, bit))
        before = len(server.gets)
        effects.download(good)
        effects.verify(good)
        assert read_bundle(stored.read_bytes(), signing_keys.trusted).sha256 == \
            good.target.sha256
        assert len(server.gets) == before + (1 if outcome is not None else 0)
        stored.unlink()

    check()
    assert len(refused) > EXAMPLES_SEEN_FRACTION * HOSTILE.max_examples, \
        "most single-bit flips must be caught (the rest land in tar padding)"


EXAMPLES_SEEN_FRACTION = 0.5


def server_bytes(bundle: Path, bit: int) -> bytes:
    flipped = bytearray(bundle.read_bytes())
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def test_after_a_corrupt_download_the_device_ends_on_the_new_version(
        server: Hostile, versions: dict[str, Path], signing_keys: Keys, device_dir: Path,
        tmp_path: Path) -> None:
    """The flow end to end: bad bytes FAIL the update, the same target from a good server
    (the same attempt re-delivered, then a new rollout) installs and commits."""
    data = tmp_path / "device"
    shutil.copytree(device_dir, data)
    agent = Agent(signing_keys.trusted)
    local.serve_active(agent, data)
    target = _target(versions["v2"], signing_keys,
                     server.url("flip", 8 * 600, versions["v2"].name), rollout="r1")
    desired = DesiredState(name=target.name, version=target.version, sha256=target.sha256,
                           url=target.url, size=target.size or 0, rollout="r1",
                           auto_commit=True)
    runner = UpdateRunner(data, agent, UpdateSettings(probation_s=0.0))
    runner.start()
    try:
        for url, state in [(desired.url, UpdateState.FAILED),
                           (server.url("good", 0, versions["v2"].name), UpdateState.COMMITTED)]:
            runner.desired(desired.model_copy(update={"url": url}))
            _reaches(runner, state, url)
            assert _leftovers(data) == [], "nothing of a failed or finished download stays"
    finally:
        runner.stop()
    assert agent.model is not None and agent.model.version == "2.0.0"
    agent.close()


def _reaches(runner: UpdateRunner, state: UpdateState, url: str) -> None:
    wait_until(lambda: runner.journal.state == state and runner.journal.target.url == url,
               60, what=f"{state.value} from {url} ({runner.journal})")


# --- 2. a download is bounded by its declared size --------------------------------------

def test_a_server_that_oversends_is_refused_after_one_get_having_read_no_more_than_declared(
        server: Hostile, versions: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    bundle = versions["v2"]
    size = bundle.stat().st_size
    effects = DeviceEffects(tmp_path, Agent(signing_keys.trusted))
    downloads = tmp_path / "downloads"

    @HOSTILE
    @given(how=st.sampled_from(["length", "short", "chunked", "close", "range200"]),
           extra=st.one_of(st.integers(1, 64), st.integers(1, 8 * MiB)),
           had=st.integers(1, size - 1))
    def check(how: str, extra: int, had: int) -> None:
        journal = Journal(UpdateState.DOWNLOADING, _target(bundle, signing_keys,
                                                     server.url("over", f"{extra}:{how}",
                                                                bundle.name)))
        if how == "range200":  # a partial file that asks for a Range the server ignores
            downloads.mkdir(exist_ok=True)
            part = downloads / f"{journal.target.sha256}.efb.part"
            part.write_bytes(bundle.read_bytes()[:had])
        effects.stats.received = 0
        before = len(server.gets)
        outcome, peak = peak_traced_bytes(lambda: effects.download(journal))
        assert isinstance(outcome, DownloadError) and not outcome.transient, repr(outcome)
        assert "not the declared bundle" in outcome.message
        assert len(server.gets) == before + 1, "an over-sending server is not retried"
        assert effects.stats.received <= size + 1, "read past the declared size"
        assert _leftovers(tmp_path) == [], "nothing of it is kept"
        assert peak < 4 * MiB, f"{peak} B held while refusing {extra} extra bytes"

    check()


def test_an_honest_200_to_a_range_request_restarts_and_completes(
        server: Hostile, versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    bundle = versions["v2"]
    effects = DeviceEffects(tmp_path, Agent(signing_keys.trusted))
    journal = Journal(UpdateState.DOWNLOADING, _target(bundle, signing_keys,
                                                 server.url("over", "0:range200", bundle.name)))
    part = tmp_path / "downloads" / f"{journal.target.sha256}.efb.part"
    part.parent.mkdir()
    part.write_bytes(b"\0" * 1000)  # a partial file the server's answer replaces
    effects.download(journal)
    effects.verify(journal)
    assert (tmp_path / "downloads" / f"{journal.target.sha256}.efb").read_bytes() == \
        bundle.read_bytes()
    assert effects.stats.received == bundle.stat().st_size


def test_a_partial_download_is_resumed_not_discarded(
        server: Hostile, versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    bundle = versions["v2"]
    size = bundle.stat().st_size
    effects = DeviceEffects(tmp_path, Agent(signing_keys.trusted))
    journal = Journal(UpdateState.DOWNLOADING, _target(bundle, signing_keys,
                                                 server.url("good", 0, bundle.name)))
    part = tmp_path / "downloads" / f"{journal.target.sha256}.efb.part"
    part.parent.mkdir()
    part.write_bytes(bundle.read_bytes()[:size // 2])  # what a killed run had received
    effects.download(journal)
    effects.verify(journal)
    assert effects.stats.resumed_from == size // 2
    assert effects.stats.received == size - size // 2


# --- 3. a full disk ------------------------------------------------------------------------

def _fsize_limited(limit: int) -> None:
    """In the child, before exec: writes past ``limit`` bytes of a file fail with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def worker() -> None:
    """Run in a child process: one ``local.install`` per stdin line under a file-size
    limit (the limit is lifted again before answering), one JSON answer per line."""
    from edgefleet.agent.protocol.signing import TrustedKeys

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    agent: Agent | None = None
    for line in sys.stdin:
        job = json.loads(line)
        if agent is None or agent.model is None or agent.model.version != "1.0.0":
            agent = Agent(TrustedKeys.from_paths([Path(job["key"])]))  # serves each copy's v1
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["limit"], resource.RLIM_INFINITY))
        answer: dict[str, str | None]
        try:
            answer = {"state": local.install(agent, Path(job["data"]), Path(job["bundle"]))
                      .state.value}
        except EdgefleetError as exc:
            answer = {"error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # what the test must never see: reported, not raised
            answer = {"crash": f"{type(exc).__name__}: {exc}"}
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        answer["model"] = agent.model.version if agent.model else None
        print(json.dumps(answer), flush=True)


@pytest.fixture(scope="module")
def limited() -> Iterator[subprocess.Popen[str]]:
    child = subprocess.Popen([sys.executable, "-c",
                              "from tests.test_hostile_update import worker; worker()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    yield child
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=30)


def test_a_file_size_limit_hit_at_any_write_leaves_the_model_and_no_temp_file(
        limited: subprocess.Popen[str], versions: dict[str, Path], signing_keys: Keys,
        device_dir: Path, tmp_path: Path) -> None:
    size = versions["v2"].stat().st_size
    assert limited.stdin is not None and limited.stdout is not None

    @HOSTILE
    @given(limit=st.one_of(st.integers(0, 2048), st.integers(0, size + 4096)))
    def check(limit: int) -> None:
        data = tmp_path / "device"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(device_dir, data)
        limited.stdin.write(json.dumps({"data": str(data), "bundle": str(versions["v2"]),  # type: ignore[union-attr]
                                        "key": str(signing_keys.public),
                                        "limit": limit}) + "\n")
        limited.stdin.flush()  # type: ignore[union-attr]
        answer = json.loads(limited.stdout.readline())  # type: ignore[union-attr]
        assert "crash" not in answer, answer["crash"]
        _assert_unharmed(data, answer, signing_keys)
        seen.add(_outcome(answer))

    seen: set[str] = set()
    check()
    assert seen >= {"refused", "recorded FAILED", "COMMITTED"}, seen


def _assert_unharmed(data: Path, answer: dict[str, Any], keys: Keys) -> None:
    """Installed, or refused with the model unchanged and no temp file; a failure the full
    disk did not let the journal record resumes at the next start, once there is room."""
    if answer.get("state") == "COMMITTED":
        assert answer["model"] == "2.0.0"
        assert _leftovers(data) == []
        return
    assert answer.get("error", "DiskFullError") == "DiskFullError", answer
    assert answer["model"] == "1.0.0", "the model served is unchanged"
    active = next(s for s in local.status(data)["slots"] if "active" in s["role"])
    assert active["version"] == "1.0.0"
    assert not [p for p in _leftovers(data) if p.endswith((".tmp", ".part"))], \
        "every temp file written is removed on failure"
    if "error" in answer:  # refused: the attempt ended, and every file it wrote is gone
        _assert_ended(data)
    recorded = local.status(data)["update"]["state"]
    if recorded not in ("COMMITTED", "FAILED"):
        if recorded in _RESUMED:
            return
        _RESUMED.add(recorded)  # once per state the journal was left in: a full install
        agent = Agent(keys.trusted)
        local.serve_active(agent, data)
        agent.close()
        assert local.status(data)["update"]["state"] in ("COMMITTED", "FAILED")
    assert _leftovers(data) == [], "nothing is left once the update ended"


_RESUMED: set[str] = set()
_ENDED = ("IDLE", "COMMITTED", "ROLLED_BACK", "FAILED")


def _assert_ended(data: Path) -> None:
    """After a refused install of 2.0.0: no update in flight, no download, no staged 2.0.0."""
    shown = local.status(data)
    assert shown["update"]["state"] in _ENDED, shown["update"]
    assert _leftovers(data) == [], "every file of the refused attempt is removed"
    assert [s["version"] for s in shown["slots"]].count("2.0.0") == 0, shown["slots"]


@contextlib.contextmanager
def _tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``folder`` (the tests run as root, as CI does: a machine that
    cannot mount one fails here, naming why, rather than skipping the disk-full tests)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk tests (run them as root): "
                    f"{done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs, so that files stop being created with ENOSPC; unmounted afterwards."""
    with _tmpfs(tmp_path / "disk", "size=64m,nr_inodes=64") as mount:
        yield mount


def test_a_disk_out_of_room_at_any_file_leaves_the_model_and_no_temp_file(
        small_disk: Path, versions: dict[str, Path], signing_keys: Keys,
        device_dir: Path) -> None:
    data = small_disk / "device"

    @HOSTILE
    @given(free=st.integers(0, 12))
    def check(free: int) -> None:
        shutil.rmtree(small_disk / "fill", ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(device_dir, data)
        _fill_inodes(small_disk / "fill", leave=free)
        agent = Agent(signing_keys.trusted)
        answer: dict[str, str | None]
        try:
            answer = {"state": local.install(agent, data, versions["v2"]).state.value}
        except DiskFullError as exc:
            answer = {"error": "DiskFullError", "message": str(exc)}
        answer["model"] = agent.model.version if agent.model else None
        agent.close()
        shutil.rmtree(small_disk / "fill")
        _assert_unharmed(data, answer, signing_keys)
        seen.add(_outcome(answer))

    seen: set[str] = set()
    check()
    assert seen >= {"refused", "COMMITTED"}, seen


def _outcome(answer: dict[str, Any]) -> str:
    """COMMITTED; the failure recorded in the journal; or refused (the error raised)."""
    if "error" in answer:
        return "refused"
    return str(answer["state"]) if answer["state"] == "COMMITTED" else "recorded FAILED"


def _fill_inodes(folder: Path, leave: int) -> None:
    folder.mkdir()
    made = 0
    while True:
        try:
            (folder / str(made)).touch()
        except OSError:
            break
        made += 1
    for index in range(leave):
        (folder / str(made - 1 - index)).unlink()


def _cli_install(data: Path, bundle: Path, keys: Keys,
                 limit: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", "agent", "install", str(bundle),
                           "--data-dir", str(data), "--trusted-key", str(keys.public)],
                          capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "300"},
                          preexec_fn=lambda: _fsize_limited(limit))


@pytest.mark.parametrize("where", ["journal", "download"])
def test_agent_install_on_a_full_disk_prints_one_line_and_no_traceback(
        where: str, versions: dict[str, Path], signing_keys: Keys, device_dir: Path,
        tmp_path: Path) -> None:
    data = tmp_path / "device"
    shutil.copytree(device_dir, data)
    limit = 64 if where == "journal" else versions["v2"].stat().st_size // 2
    done = _cli_install(data, versions["v2"], signing_keys, limit)
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0], done.stderr
    # refused before any step could be recorded: 2 (as every CLI error); the update ran
    # and was recorded FAILED: 1
    assert done.returncode == (2 if where == "journal" else 1)
    _assert_unharmed(_model(data), {"error": "DiskFullError", "model": "1.0.0"}, signing_keys)


def _model(data: Path) -> Path:
    """The folder of the model ``digits`` in a data dir the CLI opened (layout.py)."""
    return data / "models" / "digits"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", "agent", *args],
                          capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "300"})


def _one_error(done: subprocess.CompletedProcess[str], says: str) -> None:
    """Exit 2, and the output is one line: the error (with its fix), no table, no traceback."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.strip() == "", done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], done.stderr


@pytest.mark.parametrize("spare", [0, 1])  # inodes left free once 1.0.0 is installed
def test_agent_install_with_no_inode_left_ends_the_attempt_and_removes_its_files(
        spare: int, versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "disk", "size=40m") as disk:
        data, key = disk / "device", str(signing_keys.public)
        assert _cli("install", str(versions["v1"]), "--data-dir", str(data),
                    "--trusted-key", key).returncode == 0
        before = (_model(data) / "journal.json").read_bytes()
        stat = os.statvfs(disk)
        subprocess.run(["mount", "-o", f"remount,nr_inodes={stat.f_files - stat.f_ffree + spare}",
                        str(disk)], check=True)
        done = _cli("install", str(versions["v2"]), "--data-dir", str(data), "--trusted-key", key)
        _one_error(done, "the disk is full")
        _assert_ended(_model(data))
        journal = (_model(data) / "journal.json").read_bytes()
        assert journal == before or json.loads(journal)["state"] == "FAILED", journal
        shown = _cli("status", "--data-dir", str(data))
        assert "update DOWNLOADING" not in shown.stdout and "2.0.0" not in shown.stdout.split(
            "digits: update")[0], shown.stdout


def test_agent_install_refused_by_the_free_space_check_prints_one_line_and_writes_nothing(
        versions: dict[str, Path], signing_keys: Keys, device_dir: Path, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "disk", "size=16m") as disk:  # under 2 x bundle + the 16 MiB margin
        data = disk / "device"
        shutil.copytree(device_dir, data)
        layout.migrate(data)  # a data dir of this version (the CLI moves an older one first)
        files = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
        done = _cli("install", str(versions["v2"]), "--data-dir", str(data),
                    "--trusted-key", str(signing_keys.public))
        _one_error(done, "not enough free disk in")
        # the data dir's lock file (who holds it, for the next command's message) is no
        # model data: install takes the lock before it looks at the disk
        after = {p: p.read_bytes() for p in data.rglob("*") if p.is_file() and p.name != LOCK_FILE}
        assert after == files


def test_orphans_of_killed_runs_are_swept_at_start_and_a_resumable_download_kept(
        device_dir: Path, signing_keys: Keys, tmp_path: Path) -> None:
    data = tmp_path / "device"
    shutil.copytree(device_dir, data)
    (data / "downloads").mkdir(exist_ok=True)
    orphans = [data / ".journal.json.k1ll3d.tmp", data / ".slots.json.x.tmp",
               data / "slots" / "b" / ".bundle.efb.abc.tmp",
               data / "downloads" / f"{'0' * 64}.efb.part"]
    resumable = data / "downloads" / f"{'f' * 64}.efb.part"
    for path in [*orphans, resumable]:
        path.write_bytes(b"left by a killed run")
    journal = Journal(UpdateState.DOWNLOADING, UpdateTarget(sha256="f" * 64))
    (data / "journal.json").write_text(json.dumps(journal.to_dict()))
    assert sorted(sweep(data, "f" * 64)) == sorted(orphans)
    assert resumable.exists()
    for path in orphans:
        path.write_bytes(b"again")
    agent = Agent(signing_keys.trusted)
    local.serve_active(agent, data, resume=False)  # every start sweeps
    assert not any(p.exists() for p in orphans)
    agent.close()


# --- 4. a new rollout is a new attempt ---------------------------------------------------

SHAS = st.sampled_from(["a" * 64, "b" * 64])
ROLLOUTS = st.sampled_from([None, "r1", "r2"])


@HOSTILE
@given(state=st.sampled_from(list(UpdateState)), target_sha=SHAS, target_rollout=ROLLOUTS,
       sha=SHAS, rollout=ROLLOUTS, active=st.sampled_from([None, "a" * 64, "b" * 64]))
def test_an_attempt_is_the_rollout_the_same_one_never_restarts_a_new_one_always_can(
        state: UpdateState, target_sha: str, target_rollout: str | None, sha: str,
        rollout: str | None, active: str | None) -> None:
    journal = Journal(state, UpdateTarget(sha256=target_sha, rollout=target_rollout))
    desired = DesiredState(name="digits", version="2.0.0", sha256=sha, url="http://x/b.efb",
                           size=1, rollout=rollout, issued_at=12345)
    starts = starts_attempt(journal, desired, active)
    if sha == active:
        assert not starts, "a device never reinstalls what it serves"
    elif sha != target_sha:
        assert starts, "another bundle starts an update"
    elif state == UpdateState.FAILED:
        assert starts, "a failed attempt is retried when its install is re-delivered"
    elif state in (UpdateState.ROLLED_BACK, UpdateState.COMMITTED, UpdateState.IDLE):
        assert starts == (rollout != target_rollout), \
            "the same attempt is ignored once settled, another rollout starts afresh"
    else:
        assert not starts, "an update on its way is not restarted"
    again = desired.model_copy(update={"issued_at": 99999})  # a controller re-sending
    assert starts_attempt(journal, again, active) == starts, "issued_at identifies nothing"


def test_a_version_rolled_back_by_one_rollout_installs_with_the_next(
        fleet: Any, versions: dict[str, Path]) -> None:
    client = fleet.start_controller()
    fleet.add_agent("cam-0", versions["v1"])
    wait_until(lambda: _device(fleet).get("active"), 30, what="cam-0 registered")
    client.upload("/api/v1/models", versions["v2"].read_bytes())
    body = {"model": "digits:2.0.0", "selectors": ["device:cam-0"], "waves": ["100%"],
            "device_timeout_s": 60}
    first = client.post("/api/v1/rollouts", {**body, "soak_s": 600})
    wait_until(lambda: _device(fleet)["update_state"] == "PROBATION", 60, what="probation")
    client.post(f"/api/v1/rollouts/{first['id']}/abort")
    wait_until(lambda: _device(fleet)["update_state"] == "ROLLED_BACK"
               and _device(fleet)["active"]["version"] == "1.0.0", 60, what="rolled back")
    second = client.post("/api/v1/rollouts", {**body, "soak_s": 0.5})
    done = wait_until(lambda: _ended(fleet, second["id"]), 90, what="the second rollout")
    assert done["state"] == "SUCCEEDED", done["reason"]
    assert _device(fleet)["active"]["version"] == "2.0.0"
    agent = fleet.agents["cam-0"].agent
    assert agent.model is not None and agent.model.version == "2.0.0"


@pytest.mark.parametrize(("since", "followed"), [(500, "TARGETED"), (1_100, "FAILED")])
def test_a_failure_reported_before_a_rollout_sent_its_bundle_is_no_answer_to_it(
        since: int, followed: str) -> None:
    """The controller's side: the device's ROLLED_BACK from the earlier rollout (its report
    older than this rollout's install) must not count as this rollout's failure."""
    from edgefleet.agent.protocol.payloads import BundleRef
    from edgefleet.fleet.rollout.executor import DeviceView, Observations, Quality, tick
    from edgefleet.fleet.rollout.spec import RolloutSpec, Selector
    from edgefleet.fleet.rollout.state import Rollout

    old = BundleRef(name="digits", version="1.0.0", sha256="1" * 64)
    new = BundleRef(name="digits", version="2.0.0", sha256="2" * 64)
    spec = RolloutSpec(model=new, url="http://c/b.efb", size=100,
                       selectors=(Selector("device", "d0"),))
    views = {"d0": DeviceView(online=True, active=old, update_state="COMMITTED")}
    first = tick(Rollout("r2", spec), Observations(views, Quality(), Quality()), 1_000)
    assert first.rollout.devices["d0"].state.value == "TARGETED"
    views = {"d0": DeviceView(online=True, active=old, update_state="ROLLED_BACK",
                              update_target=new.sha256, update_since_ms=since)}
    second = tick(first.rollout, Observations(views, Quality(), Quality()), 1_200)
    assert second.rollout.devices["d0"].state.value == followed


def _device(fleet: Any) -> dict[str, Any]:
    devices = {d["id"]: d for d in fleet.client().get("/api/v1/devices")}
    found: dict[str, Any] = devices.get("cam-0", {})
    return found


def _ended(fleet: Any, rollout_id: str) -> dict[str, Any] | None:
    data: dict[str, Any] = fleet.client().get(f"/api/v1/rollouts/{rollout_id}")
    return data if data["state"] in ("SUCCEEDED", "ABORTED", "ROLLED_BACK") else None


# --- 5. a rollback with nothing to return to --------------------------------------------

@pytest.mark.parametrize("installs", [1, 2])
def test_agent_rollback_with_no_earlier_bundle_is_refused_and_changes_nothing(
        installs: int, versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    from edgefleet.cli.agent import app

    agent = Agent(signing_keys.trusted)
    for name in ("v1", "v2")[:installs]:
        local.install(agent, tmp_path, versions[name])
    agent.close()
    layout.migrate(tmp_path)  # as the CLI does first (a data dir of one model)
    args = ["rollback", "--data-dir", str(tmp_path), "--trusted-key", str(signing_keys.public)]
    runner = CliRunner()
    if installs == 2:  # the first rollback has v1 to return to; the second has nothing
        assert runner.invoke(app, args).exit_code == 0
    folder = _model(tmp_path)
    before = (local.status(folder), (folder / "journal.json").read_bytes())
    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output  # as every refusal of the CLI
        assert "error: there is no earlier committed bundle to roll back to" in result.output
        assert "fix: install a bundle" in result.output
        assert "Traceback" not in result.output and "re-entered" not in result.output
        assert (local.status(folder), (folder / "journal.json").read_bytes()) == before
    assert before[0]["update"]["state"] == ("COMMITTED" if installs == 1 else "ROLLED_BACK")
