"""Fetch a bundle over HTTP(S), resuming with Range after an interruption.

The partial file lives in ``downloads/<sha256>.part`` and grows in chunks, each
flushed and fsynced, so a process killed mid-download resumes from what reached
the disk. A server that ignores Range (200 instead of 206) restarts the file.
Retries back off exponentially; an attempt that adds to the partial file restarts the
count, so only ``retries + 1`` attempts in a row that bring nothing give up (a link
that keeps flapping slows a download, it does not fail it). A local path or
``file://`` URL is copied.
``https://`` URLs are checked against the system's CAs plus the fleet CA given to
:func:`trust_ca` (``agent run --ca``), so a controller with a certificate from
``edgefleet certs server`` is accepted.
"""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.protocol.errors import EdgefleetError

__all__ = ["DownloadError", "DownloadStats", "fetch", "trust_ca"]

CHUNK = 64 * 1024


class DownloadError(EdgefleetError):
    """The bundle could not be fetched (after retries), or came back the wrong size."""

    transient = True


_tls: ssl.SSLContext | None = None  # None: urllib's default (the system's CAs)


def trust_ca(ca_file: Path) -> None:
    """Also trust ``ca_file`` for every later ``https://`` download of this process."""
    global _tls
    context = _tls or ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ValueError) as exc:
        raise DownloadError(f"cannot use the CA file {ca_file}: {exc}",
                            hint="pass the fleet CA's certificate (ca.crt)",
                            transient=False) from exc
    _tls = context


@dataclass
class DownloadStats:
    """What a fetch did: bytes received over the network, resumes, attempts."""

    received: int = 0
    resumed_from: int = 0
    attempts: int = 0


def fetch(url: str, dest: Path, size: int, *, retries: int = 5, backoff_s: float = 0.2,
          timeout_s: float = 10.0, stats: DownloadStats | None = None,
          on_chunk: Callable[[int], None] = lambda written: None) -> Path:
    """Download ``url`` into ``dest`` (``size`` bytes expected), resuming ``dest.part``."""
    stats = stats or DownloadStats()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.stat().st_size == size:
        return dest
    scheme = urlsplit(url).scheme
    if scheme in ("", "file"):
        return _copy(Path(urlsplit(url).path if scheme else url), dest, size)
    part = dest.with_suffix(dest.suffix + ".part")
    failures = 0  # attempts in a row that added nothing to the partial file
    while True:
        stats.attempts += 1
        had = _size(part)
        try:
            _fetch_once(url, part, size, timeout_s, stats, on_chunk)
            break
        except (OSError, urllib.error.URLError, http.client.HTTPException, DownloadError) as exc:
            # a flapping network costs attempts but not the download: progress restarts
            # the count, only retries + 1 fruitless attempts in a row give up
            failures = 0 if _size(part) > had else failures + 1
            if failures > retries:
                raise DownloadError(f"download of {url} failed after {stats.attempts} "
                                    f"attempts, the last {failures} without a byte: {exc}",
                                    hint="check the URL and the network; the "
                                    "partial file is kept and resumed next time") from exc
            time.sleep(backoff_s * 2 ** max(failures - 1, 0))
    os.replace(part, dest)
    return dest


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fetch_once(url: str, part: Path, size: int, timeout_s: float, stats: DownloadStats,
                on_chunk: Callable[[int], None]) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout_s, context=_tls) as response:
        if have and response.status != 206:
            have = 0  # the server ignored Range: start over
        stats.resumed_from = max(stats.resumed_from, have)
        with open(part, "r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            while chunk := response.read1(CHUNK):  # what has arrived, up to a chunk
                out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                have += len(chunk)
                stats.received += len(chunk)
                on_chunk(have)
    if have != size:
        raise DownloadError(f"download of {url} ended at {have} of {size} bytes",
                            hint="retrying resumes from there")


def _copy(source: Path, dest: Path, size: int) -> Path:
    if not source.exists():
        raise DownloadError(f"bundle {source} does not exist", hint="check the path",
                            transient=False)
    if size and source.stat().st_size != size:
        raise DownloadError(f"{source} is {source.stat().st_size} bytes, expected {size}",
                            hint="the file changed; fetch it again", transient=False)
    tmp = dest.with_suffix(dest.suffix + ".part")
    shutil.copyfile(source, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, dest)
    return dest
