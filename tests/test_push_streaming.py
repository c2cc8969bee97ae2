"""Pushes stream to a file in the controller's data dir: one real ``fleet serve`` process
(its own peak RSS measured), uploads of hundreds of MB of zeros (sparse files: no disk
cost), uploads held open to fill the concurrency bound, and ``fleet push`` of an
oversized file whose 413 the CLI reports in one line.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.fleet.mosquitto import MosquittoBroker
from tests.conftest import Keys
from tests.controller_process import measured_controller, stop
from tests.fleet_harness import TOKEN, wait_until
from tests.hostile import Measured, MiB, run_measured
from tests.test_hostile_bundle import _one_error_line

EDGEFLEET = [sys.executable, "-m", "edgefleet"]
SERVER_RSS_CAP = 150 * MiB  # fleet serve after every push below (it idles near 80 MiB)
CLI_RSS_CAP = 150 * MiB  # fleet push of a 1 GiB file (it used to read it whole: 1.1 GB)
ZEROS = 200 * MiB
MAX_PUSHES = 2  # fleet/handlers/models.py MAX_PUSHES
HELD = 16 * MiB  # an upload held open, then finished: written to disk, then refused


@pytest.fixture(scope="module")
def served(signing_keys: Keys, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, dict[str, Measured], Path]]:
    """One ``edgefleet fleet serve`` process for the module; its peak RSS once stopped."""
    folder = tmp_path_factory.mktemp("push-streaming")
    broker = MosquittoBroker(workdir=folder / "mosquitto").start()
    data = folder / "fleet-data"
    with measured_controller(broker.url, signing_keys.public, data, "push", 600) as (url, done):
        yield url, done, data
    broker.stop()


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sparse-uploads")
    files = {"zeros": folder / "z200.bin", "huge": folder / "z1g.bin"}
    subprocess.run(["truncate", "-s", str(ZEROS), str(files["zeros"])], check=True)
    subprocess.run(["truncate", "-s", str(1 << 30), str(files["huge"])], check=True)
    return files


def _connect(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=120)


def _start_upload(url: str, length: int) -> http.client.HTTPConnection:
    conn = _connect(url)
    conn.putrequest("POST", "/api/v1/models")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    return conn


def _stream_zeros(conn: http.client.HTTPConnection, length: int, first: bytes = b"",
                  ) -> tuple[int, dict[str, str], dict[str, str]]:
    """Send ``first`` then zeros up to ``length``; stop early when the controller hangs up."""
    left, chunk = length, first
    try:
        while left > 0:
            chunk = chunk or bytes(min(1 * MiB, left))
            conn.send(chunk)
            left, chunk = left - len(chunk), b""
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused early: its answer is already there
    response = conn.getresponse()
    headers = dict(response.getheaders())
    body = json.loads(response.read())
    conn.close()
    return response.status, body, headers


def _no_upload_left(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "bundles").iterdir() if p.suffix != ".efb")


def test_three_pushes_of_200_mb_of_zeros_at_once_are_422_from_their_first_block(
        served: tuple[str, dict[str, Measured], Path]) -> None:
    url, _, data = served
    results: list[tuple[int, dict[str, str], dict[str, str]]] = []
    threads = [threading.Thread(target=lambda: results.append(
        _stream_zeros(_start_upload(url, ZEROS), ZEROS))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 3
    for status, body, _ in results:
        assert status in (422, 503), (status, body)
        if status == 422:
            assert body["error"] == "not a bundle: the archive holds no members", body
            assert "edgefleet convert" in body["hint"] and "build_bundle" not in body["hint"]
    assert _no_upload_left(data) == []
    conn = _connect(url)
    conn.request("GET", "/api/v1/history", headers={"Authorization": f"Bearer {TOKEN}"})
    refused = [e for e in json.loads(conn.getresponse().read())
               if e["action"] == "model.push" and e["outcome"] == "refused"]
    assert len(refused) == sum(status == 422 for status, _, _ in results)


def test_an_empty_push_is_named_an_empty_file(
        served: tuple[str, dict[str, Measured], Path]) -> None:
    status, body, _ = _stream_zeros(_start_upload(served[0], 0), 0)
    assert (status, body["error"]) == (422, "an empty file, not a bundle")


def test_more_pushes_than_the_bound_are_503_with_retry_after_and_leave_no_file(
        served: tuple[str, dict[str, Measured], Path], digits_bundles: dict[str, Path]) -> None:
    """Uploads held open after a real bundle's first header fill the bound; one more is 503.
    The held ones, finished with zeros, stream to disk and are refused (422) after."""
    url, _, data = served
    header = digits_bundles["tflite"].read_bytes()[:512]
    held = [_start_upload(url, HELD) for _ in range(MAX_PUSHES)]
    for conn in held:
        conn.send(header)
    wait_until(lambda: len(_no_upload_left(data)) == MAX_PUSHES, 30, what="uploads to start")
    status, body, headers = _stream_zeros(_start_upload(url, ZEROS), ZEROS, header)
    assert status == 503, (status, body)
    assert f"{MAX_PUSHES} pushes are already uploading" in body["error"]
    assert int(headers["Retry-After"]) > 0
    for conn in held:
        status, body, _ = _stream_zeros(conn, HELD - len(header))
        assert status == 422 and body["kind"] == "MissingFileError", (status, body)
    assert _no_upload_left(data) == []


def test_cli_push_of_an_oversized_file_reports_the_413_in_one_line_in_small_memory(
        served: tuple[str, dict[str, Measured], Path], sparse: dict[str, Path]) -> None:
    result = run_measured([*EDGEFLEET, "fleet", "push", "--controller", served[0],
                           "--token", TOKEN, str(sparse["huge"])])
    assert result.returncode != 0
    line = _one_error_line(result)
    assert line.startswith(f"error: the controller refused the upload: request body of "
                           f"{1 << 30} bytes is too large (limit {512 * MiB})"), line
    assert "cannot reach" not in line and "Broken pipe" not in line
    assert result.peak_rss_bytes < CLI_RSS_CAP, result.peak_rss_bytes / MiB
    print(f"fleet push of 1 GiB: peak RSS {result.peak_rss_bytes / MiB:.0f} MiB")


def test_a_good_bundle_pushed_after_is_stored_and_the_controller_stayed_small(
        served: tuple[str, dict[str, Measured], Path], digits_bundles: dict[str, Path]) -> None:
    url, done, data = served
    push = [*EDGEFLEET, "fleet", "push", "--controller", url, "--token", TOKEN]
    good = run_measured([*push, "--json", str(digits_bundles["tflite"])])
    assert good.returncode == 0, good.stderr
    pushed = json.loads(good.stdout)
    assert pushed["added"] and pushed["model"]["size"] == digits_bundles["tflite"].stat().st_size
    stored = data / "bundles" / f"{pushed['model']['sha256']}.efb"
    assert stored.read_bytes() == digits_bundles["tflite"].read_bytes()
    assert _no_upload_left(data) == []
    stop(str(data))
    wait_until(lambda: "server" in done, 60, what="fleet serve to stop")
    server = done["server"]
    assert server.returncode == 0, server.stderr
    assert server.peak_rss_bytes < SERVER_RSS_CAP, server.peak_rss_bytes / MiB
    print(f"fleet serve after every push: peak RSS {server.peak_rss_bytes / MiB:.0f} MiB")
