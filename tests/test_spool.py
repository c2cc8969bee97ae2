"""The telemetry spool: bounded, oldest dropped first and counted, durable across reopen."""

from __future__ import annotations

from pathlib import Path

from edgefleet.agent.telemetry.spool import Spool


def _fill(spool: Spool, count: int, size: int = 100) -> None:
    for i in range(count):
        spool.append(f"{i:04d}".encode().ljust(size, b"."))


def test_points_come_back_in_arrival_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    _fill(spool, 5)
    assert [data[:4] for _, data in spool.peek_batch(10)] == [b"0000", b"0001", b"0002",
                                                             b"0003", b"0004"]


def test_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1_000)
    _fill(spool, 25)
    kept = [int(data[:4]) for _, data in spool.peek_batch(100)]
    assert kept == list(range(15, 25))
    assert spool.dropped == 15 and spool.size_bytes <= 1_000


def test_a_point_larger_than_the_bound_is_dropped_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=500)
    _fill(spool, 2)
    spool.append(b"x" * 501)
    assert len(spool) == 2 and spool.dropped == 1


def test_removed_points_are_gone(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    _fill(spool, 4)
    batch = spool.peek_batch(2)
    spool.remove([seq for seq, _ in batch])
    assert [data[:4] for _, data in spool.peek_batch(10)] == [b"0002", b"0003"]


def test_reopening_finds_points_and_drop_count(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1_000)
    _fill(spool, 12)
    again = Spool(tmp_path, max_bytes=1_000)
    assert len(again) == 10 and again.dropped == 2
    again.append(b"new")
    assert again.peek_batch(100)[-1][1] == b"new"


def test_a_vanished_file_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    _fill(spool, 3)
    first = sorted(tmp_path.glob("*.json"))[0]
    first.unlink()
    assert [data[:4] for _, data in spool.peek_batch(10)] == [b"0001", b"0002"]
    assert len(spool) == 2
