"""Bundle deltas on the device: rebuilt exactly, resumed with Range, and every way a delta
can be wrong ends in the full download (never a wrong file); hostile deltas only ever
give a clean DeltaError, within the output and memory bounds."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.delta import DeltaError, apply_delta, build_delta, max_window
from edgefleet.agent.protocol.payloads import DeltaRef, DesiredState, decode, encode
from edgefleet.agent.update.delta import DeltaStats, fetch_bundle
from edgefleet.agent.update.download import DownloadStats
from edgefleet.agent.update.target import UpdateTarget
from tests.conftest import Keys, make_bundle
from tests.hostile import HOSTILE, MiB, peak_traced_bytes
from tests.http_files import FileServer
from tests.models import TrainedModels


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def pair(digits_models: TrainedModels, signing_keys: Keys,
         tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same model as 1.0.0 and 1.0.1: what most updates of a model look like."""
    root = tmp_path_factory.mktemp("delta-bundles")
    return (make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            make_bundle(digits_models.tflite, root / "v2.efb", signing_keys, "1.0.1"))


@pytest.fixture(scope="module")
def server(pair: tuple[Path, Path]) -> Iterator[FileServer]:
    base, new = pair
    root = base.parent
    (root / "good.delta").write_bytes(build_delta(base.read_bytes(), new.read_bytes()))
    served = FileServer(root)
    yield served
    served.stop()


def _target(new: Path, server: FileServer, delta: str, keys: Keys, base: bytes,
            **changes: object) -> UpdateTarget:
    data = (new.parent / delta).read_bytes() if (new.parent / delta).exists() else b"x"
    ref = DeltaRef(url=server.url(delta), sha256=_sha(data), size=len(data), base=_sha(base),
                   result=_sha(new.read_bytes()))
    ref = ref.model_copy(update=changes)
    bundle = read_bundle(new, keys.trusted)
    return UpdateTarget(name="digits", version="1.0.1", sha256=bundle.sha256,
                        url=server.url(new.name), size=new.stat().st_size, delta=ref)


def _run(target: UpdateTarget, base: Path, tmp_path: Path) -> tuple[bytes, DeltaStats,
                                                                      DownloadStats]:
    deltas, stats = DeltaStats(), DownloadStats()
    out = fetch_bundle(target, tmp_path / "downloads" / "new.efb", base, stats=stats,
                       deltas=deltas)
    assert not list(out.parent.glob("*.delta*")) and not list(out.parent.glob("*.rebuild"))
    return out.read_bytes(), deltas, stats


def test_a_delta_rebuilds_the_new_bundle_exactly_from_far_fewer_bytes(
        pair: tuple[Path, Path], server: FileServer, signing_keys: Keys,
        tmp_path: Path) -> None:
    base, new = pair
    target = _target(new, server, "good.delta", signing_keys, base.read_bytes())
    assert target.delta is not None
    data, deltas, stats = _run(target, base, tmp_path)
    assert data == new.read_bytes()
    assert (deltas.used, deltas.fallbacks) == (1, 0)
    assert stats.received == target.delta.size < new.stat().st_size // 10


def test_a_delta_download_resumes_with_range(pair: tuple[Path, Path], server: FileServer,
                                             signing_keys: Keys, tmp_path: Path) -> None:
    base, new = pair
    target = _target(new, server, "good.delta", signing_keys, base.read_bytes())
    assert target.delta is not None
    half = target.delta.size // 2
    server.faults.cut_after, server.faults.cuts = half, 1
    server.faults.requests.clear()
    data, deltas, _ = _run(target, base, tmp_path)
    server.faults.cuts = 0
    assert data == new.read_bytes() and deltas.used == 1
    assert server.faults.requests == [None, f"bytes={half}-"]


@pytest.mark.parametrize("case", ["corrupted", "wrong base", "altered base", "missing",
                                  "too large", "wrong result"])
def test_every_wrong_delta_ends_in_the_full_download(
        case: str, pair: tuple[Path, Path], server: FileServer, signing_keys: Keys,
        tmp_path: Path) -> None:
    base, new = pair
    base_bytes, root = base.read_bytes(), base.parent
    good = (root / "good.delta").read_bytes()
    name, changes = "good.delta", dict[str, object]()
    if case == "corrupted":  # the bytes served are not the delta offered
        name = "corrupted.delta"
        (root / name).write_bytes(good[:40] + bytes(b ^ 0xFF for b in good[40:80]) + good[80:])
        changes = {"sha256": _sha(good), "size": len(good)}
    elif case == "wrong base":  # offered as if for this base, built from another bundle
        name = "wrong-base.delta"
        (root / name).write_bytes(build_delta(new.read_bytes()[::-1], new.read_bytes()))
    elif case == "altered base":  # the device's copy changed since it was installed
        altered = tmp_path / "altered.efb"
        altered.write_bytes(base_bytes + b"\0" * 512)
        base = altered
    elif case == "missing":
        name = "no-such.delta"
    elif case == "too large":
        changes = {"size": new.stat().st_size}
    elif case == "wrong result":
        changes = {"result": _sha(b"another bundle")}
    target = _target(new, server, name, signing_keys, base_bytes, **changes)
    data, deltas, _ = _run(target, base, tmp_path)
    assert data == new.read_bytes(), "the full bundle, never a wrong file"
    assert (deltas.used, deltas.fallbacks) == (0, 1), deltas.last_fallback


def test_an_older_agent_reads_a_desired_state_with_a_delta_and_ignores_it() -> None:
    sha = "a" * 64
    desired = DesiredState(name="digits", version="1.0.1", sha256=sha, url="http://c/b.efb",
                           size=10, delta=DeltaRef(url="http://c/deltas/x", sha256=sha,
                                                   size=3, base=sha, result=sha))
    raw = encode(desired)
    assert decode(DesiredState, raw).delta == desired.delta
    assert UpdateTarget.from_dict(UpdateTarget.from_desired(desired).to_dict()).delta == \
        desired.delta

    class OlderDesiredState(DesiredState):  # the schema before deltas: no such field
        pass

    OlderDesiredState.model_fields.pop("delta")
    OlderDesiredState.model_rebuild(force=True)
    older = decode(OlderDesiredState, raw)
    assert older.sha256 == sha and "delta" not in older.model_dump()


# --- hostile deltas ------------------------------------------------------------------------

_BASE = bytes(range(256)) * 256  # 64 KiB that compress well, like a model's tensors
_NEW = _BASE[:30_000] + b"new tensor" * 500 + _BASE[30_000:]
_GOOD = build_delta(_BASE, _NEW)


def _apply(delta: bytes, expected: int = len(_NEW)) -> bytes:
    out = io.BytesIO()

    def write(chunk: bytes) -> None:
        assert out.tell() + len(chunk) <= expected, "never more than the expected size"
        out.write(chunk)

    apply_delta(_BASE, delta, expected, write)
    return out.getvalue()


@st.composite
def _hostile(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "flip", "truncate", "splice", "prefix"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "truncate":
        return _GOOD[:draw(st.integers(0, len(_GOOD) - 1))]
    if kind == "prefix":  # a valid header, then garbage
        return _GOOD[:draw(st.integers(4, 18))] + draw(st.binary(max_size=4096))
    at = draw(st.integers(0, len(_GOOD) - 1))
    if kind == "flip":
        return _GOOD[:at] + bytes([_GOOD[at] ^ draw(st.integers(1, 255))]) + _GOOD[at + 1:]
    return _GOOD[:at] + draw(st.binary(min_size=1, max_size=64)) + _GOOD[at:]


@HOSTILE
@given(delta=_hostile())
def test_a_hostile_delta_never_gives_anything_but_the_bundle_or_a_delta_error(
        delta: bytes) -> None:
    result, peak = peak_traced_bytes(lambda: _apply(delta))
    assert result == _NEW or isinstance(result, DeltaError), repr(result)
    assert peak < 2 * MiB


def test_a_good_delta_applies() -> None:
    assert _apply(_GOOD) == _NEW


def test_a_frame_declaring_a_larger_window_or_size_is_refused_before_decoding() -> None:
    # a frame header (RFC 8878 3.1.1.1): magic, descriptor (4-byte size, checksum, not one
    # segment), window log 27 (128 MiB), the right content size; then a raw last block and
    # its checksum (never checked: the window is refused first)
    wide = (b"\x28\xb5\x2f\xfd\x84" + bytes([(27 - 10) << 3]) + len(_NEW).to_bytes(4, "little")
            + ((len(_NEW) << 3) | 1).to_bytes(3, "little") + _NEW + b"\0" * 4)
    assert zstandard.get_frame_parameters(wide).window_size > max_window(len(_BASE), len(_NEW))
    with pytest.raises(DeltaError, match="window"):
        _apply(wide)
    with pytest.raises(DeltaError, match="declares"):
        _apply(_GOOD, expected=len(_NEW) - 1)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(_NEW)
    with pytest.raises(DeltaError, match="declares"):
        _apply(unsized)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 * MiB))  # declares 64 MiB
    with pytest.raises(DeltaError, match="declares"):
        _apply(bomb)


# --- the controller's shelf -----------------------------------------------------------------

def test_the_controller_builds_a_pair_once_and_offers_only_deltas_worth_it(
        pair: tuple[Path, Path], signing_keys: Keys, tmp_path: Path) -> None:
    from edgefleet.fleet.deltas import DeltaShelf

    base, new = pair
    noise = tmp_path / "noise.efb"
    noise.write_bytes(os.urandom(new.stat().st_size))  # shares nothing with the base
    files = {"b" * 64: base, "n" * 64: new, "z" * 64: noise}
    shelf = DeltaShelf(tmp_path / "deltas", files.get, "http://ctl:8080/")
    assert shelf.path("b" * 64, "n" * 64) is None, "a request never starts a build"
    assert not (tmp_path / "deltas").exists()
    offer = shelf.offer("b" * 64, "n" * 64)
    assert offer is not None and offer.url == f"http://ctl:8080/deltas/{'b' * 64}-{'n' * 64}"
    built = shelf.path("b" * 64, "n" * 64)
    assert built is not None and _sha(built.read_bytes()) == offer.sha256
    assert (offer.base, offer.result) == (_sha(base.read_bytes()), _sha(new.read_bytes()))
    stamp = built.stat().st_mtime_ns
    again = DeltaShelf(tmp_path / "deltas", files.get, "http://ctl:8080")  # a restart
    assert again.offer("b" * 64, "n" * 64) == offer and built.stat().st_mtime_ns == stamp
    assert shelf.offer("b" * 64, "z" * 64) is None, "not smaller than the share: whole"
    record = shelf.record("b" * 64, "z" * 64)
    assert record is not None and record.none and shelf.path("b" * 64, "z" * 64) is None
    assert shelf.offer("b" * 64, "x" * 64) is None, "a bundle the controller does not hold"


# --- a rebuilt bundle that fails verification -------------------------------------------

def _poisoned(new: Path) -> bytes:
    """``new`` with one byte of its middle changed: the same size, no longer its signature."""
    data = bytearray(new.read_bytes())
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def test_a_rebuilt_bundle_that_fails_verification_is_dropped_for_the_full_download(
        pair: tuple[Path, Path], server: FileServer, signing_keys: Keys,
        tmp_path: Path) -> None:
    base, new = pair
    root, poisoned = base.parent, _poisoned(new)
    (root / "poisoned.delta").write_bytes(build_delta(base.read_bytes(), poisoned))
    # the delta's own checks all pass: its record names the poisoned file as the result
    target = _target(new, server, "poisoned.delta", signing_keys, base.read_bytes(),
                     result=_sha(poisoned))
    checked: list[bytes] = []

    def verify(path: Path) -> None:
        checked.append(path.read_bytes())
        assert read_bundle(path, signing_keys.trusted).sha256 == target.sha256

    deltas, stats = DeltaStats(), DownloadStats()
    out = fetch_bundle(target, tmp_path / "downloads" / "new.efb", base, stats=stats,
                       deltas=deltas, verify=verify)
    assert checked == [poisoned], "the rebuilt file was verified, once"
    assert out.read_bytes() == new.read_bytes(), "then the full bundle came, unchecked here"
    assert (deltas.used, deltas.fallbacks, dict(deltas.reasons)) == (0, 1, {"verify": 1})
    assert not list(out.parent.glob("*.delta*")) and not list(out.parent.glob("*.rebuild"))


def test_a_used_delta_counts_its_bytes_against_the_full_bundle(
        pair: tuple[Path, Path], server: FileServer, signing_keys: Keys,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base, new = pair
    target = _target(new, server, "good.delta", signing_keys, base.read_bytes())
    assert target.delta is not None
    with caplog.at_level("INFO", logger="edgefleet.agent.update.delta"):
        _, deltas, _ = _run(target, base, tmp_path)
    assert (deltas.delta_bytes, deltas.full_bytes) == (target.delta.size, target.size)
    assert "rebuilt from a delta" in caplog.text


# --- only one real zstd frame -----------------------------------------------------------

def _skippable(payload: bytes, magic: int = 0x184D2A50) -> bytes:
    return magic.to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


@pytest.mark.parametrize("case", ["skippable first", "skippable sized as the bundle",
                                  "skippable after", "two frames", "trailing bytes",
                                  "cut short"])
def test_anything_but_exactly_one_zstd_frame_is_refused(case: str) -> None:
    second = zstandard.ZstdCompressor().compress(b"x" * 100)
    delta = {
        "skippable first": _skippable(b"\0" * 8) + _GOOD,
        # a skippable frame whose length is the bundle's size read as a frame header
        "skippable sized as the bundle": _skippable(b"\0" * len(_NEW), 0x184D2A5F) + _GOOD,
        "skippable after": _GOOD + _skippable(b"junk"),
        "two frames": _GOOD + second,
        "trailing bytes": _GOOD + b"\0",
        "cut short": _GOOD[:-1],
    }[case]
    with pytest.raises(DeltaError):
        _apply(delta)


def test_the_frame_walk_measures_real_frames() -> None:
    from edgefleet.agent.protocol.delta import _frame_length

    for data in (_GOOD, zstandard.ZstdCompressor().compress(b""),
                 zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(300_000)),
                 zstandard.ZstdCompressor(level=1).compress(b"\0" * 1_000_000)):
        assert _frame_length(data) == len(data)


# --- the controller's shelf: records checked, builds outside the lock -------------------

def test_a_cached_record_that_does_not_match_the_bundles_is_built_again(
        pair: tuple[Path, Path], tmp_path: Path) -> None:
    from edgefleet.fleet.deltas import DeltaShelf

    base, new = pair
    files, folder = {"b" * 64: base, "n" * 64: new}, tmp_path / "deltas"
    folder.mkdir()
    poisoned = _poisoned(new)
    bad = build_delta(base.read_bytes(), poisoned)  # a stale record: another result file
    (folder / f"{'b' * 64}-{'n' * 64}.zst").write_bytes(bad)
    (folder / f"{'b' * 64}-{'n' * 64}.json").write_text(json.dumps({
        "base_file": _sha(base.read_bytes()), "result_file": _sha(poisoned),
        "full_size": len(poisoned), "sha256": _sha(bad), "size": len(bad)}))
    shelf = DeltaShelf(folder, files.get, "http://ctl")
    offer = shelf.offer("b" * 64, "n" * 64)
    assert offer is not None and offer.result == _sha(new.read_bytes()), "rebuilt, not trusted"
    built = shelf.path("b" * 64, "n" * 64)
    assert built is not None and _sha(built.read_bytes()) == offer.sha256 != _sha(bad)
    built.write_bytes(bad)  # the delta file altered beside a good record: built again
    assert DeltaShelf(folder, files.get, "http://ctl").offer("b" * 64, "n" * 64) == offer


def test_a_lookup_of_another_pair_is_answered_while_a_build_runs(
        pair: tuple[Path, Path], tmp_path: Path) -> None:
    from edgefleet.fleet.deltas import DeltaShelf

    base, new = pair
    files = {"b" * 64: base, "n" * 64: new, "m" * 64: new}
    entered, release = threading.Event(), threading.Event()
    builds: list[int] = []

    def slow_build(old: bytes, target: bytes) -> bytes:
        builds.append(1)
        entered.set()
        release.wait(120)
        return build_delta(old, target)

    DeltaShelf(tmp_path, files.get, "http://ctl").offer("b" * 64, "m" * 64)  # built before
    shelf = DeltaShelf(tmp_path, files.get, "http://ctl", build=slow_build)
    building = [threading.Thread(target=shelf.offer, args=("b" * 64, "n" * 64))
                for _ in range(2)]
    for thread in building:
        thread.start()
    assert entered.wait(120)
    answers: list[object] = []
    lookup = threading.Thread(target=lambda: answers.extend(
        [shelf.path("b" * 64, "m" * 64), shelf.offer("b" * 64, "m" * 64),
         shelf.path("b" * 64, "n" * 64)]))
    lookup.start()
    lookup.join(60)  # a liveness guard, not a timing: the lookup blocks forever otherwise
    stalled = lookup.is_alive()
    release.set()
    for thread in [*building, lookup]:
        thread.join()
    assert not stalled, "a lookup waited for another pair's build"
    assert answers[0] is not None and answers[1] is not None and answers[2] is None
    assert builds == [1], "a pair is built once, the second asker waits for it"
    assert shelf.path("b" * 64, "n" * 64) is not None


# --- the device's sweep ------------------------------------------------------------------

def test_delta_leftovers_are_swept_when_no_update_is_in_flight(tmp_path: Path) -> None:
    from edgefleet.agent.update.disk import sweep

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    sha = "f" * 64
    leftovers = [downloads / f"{sha}{suffix}"
                 for suffix in (".efb", ".efb.part", ".efb.rebuild", ".delta", ".delta.part")]
    for path in leftovers:
        path.write_bytes(b"left")
    kept = sorted(sweep(tmp_path, sha))  # in flight: only the half-rebuilt file goes
    assert kept == [downloads / f"{sha}.efb.rebuild"]
    for path in leftovers:
        path.write_bytes(b"left")
    assert sorted(sweep(tmp_path, None)) == sorted(leftovers)  # nothing in flight


def test_the_device_sweeps_everything_once_its_journal_is_committed(
        tmp_path: Path, signing_keys: Keys) -> None:
    from edgefleet.agent.core import Agent
    from edgefleet.agent.update.device import DeviceEffects
    from edgefleet.agent.update.states import Journal, UpdateState

    sha = "f" * 64
    (tmp_path / "downloads").mkdir()
    leftover = tmp_path / "downloads" / f"{sha}.delta"
    leftover.write_bytes(b"left")
    agent = Agent(signing_keys.trusted)
    try:
        effects = DeviceEffects(tmp_path, agent)
        target = UpdateTarget(sha256=sha)
        assert effects.sweep(Journal(UpdateState.DOWNLOADING, target)) == []
        assert effects.sweep(Journal(UpdateState.COMMITTED, target)) == [leftover]
    finally:
        agent.close()
