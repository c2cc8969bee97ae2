"""Fetch a bundle over HTTP(S), resuming with Range after an interruption.

The partial file lives in ``downloads/<sha256>.part`` and grows in chunks, each
flushed and fsynced, so a process killed mid-download resumes from what reached
the disk. A server that ignores Range (200 instead of 206) restarts the file.
Retries back off exponentially; an attempt that adds to the partial file restarts the
count, so only ``retries + 1`` attempts in a row that bring nothing give up (a link
that keeps flapping slows a download, it does not fail it). A local path or
``file://`` URL is copied.

A download is bounded by its declared size: no read asks for more than what is still
missing, and a server that announces more (``Content-Length``), answers a Range request
from another offset, or sends one byte past the declared size is refused at once,
without a retry (it would send the same again) and without keeping its partial file.
A full disk is not retried either: the partial file is removed and the error says so.
``fetch`` always downloads; a complete file left by an earlier attempt is the caller's
to verify before it reuses it.

``https://`` URLs are checked against the system's CAs plus the fleet CA given to
:func:`trust_ca` (``agent run --ca``), so a controller with a certificate from
``edgefleet certs server`` is accepted.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from edgefleet.agent.errors import AgentError
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.update.disk import StorageError, discard, guarded

__all__ = ["CHUNK", "DownloadError", "DownloadStats", "fetch", "trust_ca"]

CHUNK = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")


class DownloadError(AgentError):
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


OnChunk = Callable[[int], None]


def fetch(url: str, dest: Path, size: int, *, retries: int = 5, backoff_s: float = 0.2,
          timeout_s: float = 10.0, stats: DownloadStats | None = None,
          on_chunk: OnChunk = lambda written: None) -> Path:
    """Download ``url`` into ``dest`` (``size`` bytes declared), resuming ``dest.part``."""
    stats = stats or DownloadStats()
    with guarded(dest.parent):
        dest.parent.mkdir(parents=True, exist_ok=True)
    scheme = urlsplit(url).scheme
    if scheme in ("", "file"):
        return _copy(Path(urlsplit(url).path if scheme else url), dest, size)
    if size <= 0:
        raise DownloadError(f"the desired state declares {size} bytes for {url}",
                            hint="the controller must send the bundle's size", transient=False)
    part = dest.with_suffix(dest.suffix + ".part")
    _retrying(url, part, size, _Attempt(retries, backoff_s, timeout_s, stats, on_chunk))
    with guarded(dest):
        os.replace(part, dest)
    return dest


@dataclass(frozen=True)
class _Attempt:
    retries: int
    backoff_s: float
    timeout_s: float
    stats: DownloadStats
    on_chunk: OnChunk


def _retrying(url: str, part: Path, size: int, how: _Attempt) -> None:
    failures = 0  # attempts in a row that added nothing to the partial file
    while True:
        how.stats.attempts += 1
        had = _size(part)
        try:
            _fetch_once(url, part, size, how)
            return
        except (OSError, urllib.error.URLError, http.client.HTTPException, EdgefleetError) as exc:
            if _fatal(exc):  # a server that over-sends, or a full disk: the same again
                discard(part)
                raise
            # a flapping network costs attempts but not the download: progress restarts
            # the count, only retries + 1 fruitless attempts in a row give up
            failures = 0 if _size(part) > had else failures + 1
            if failures > how.retries:
                raise DownloadError(f"download of {url} failed after {how.stats.attempts} "
                                    f"attempts, the last {failures} without a byte: {exc}",
                                    hint="check the URL and the network; the "
                                    "partial file is kept and resumed next time") from exc
            time.sleep(how.backoff_s * 2 ** max(failures - 1, 0))


def _fatal(exc: BaseException) -> bool:
    """Errors a retry would meet again: the disk, or what the server sends."""
    return isinstance(exc, StorageError) or (
        isinstance(exc, EdgefleetError) and not exc.transient)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fetch_once(url: str, part: Path, size: int, how: _Attempt) -> None:
    have = _size(part)
    if have > size:
        discard(part)
        have = 0
    if have == size:
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=how.timeout_s, context=_tls) as response:
        have = _start_of(response, have, size, url)
        _expect_length(response, size - have, url)
        how.stats.resumed_from = max(how.stats.resumed_from, have)
        have = _receive(response, part, have, size, how)
        if have == size and response.read1(1):  # one byte past the declared size is enough
            how.stats.received += 1
            raise _oversent(url, size, "sent more than that")
    if have != size:
        raise DownloadError(f"download of {url} ended at {have} of {size} bytes",
                            hint="retrying resumes from there")


def _start_of(response: http.client.HTTPResponse, have: int, size: int, url: str) -> int:
    """Where the body starts in the file: 0 for a whole body (a 200, also to a Range
    request), ``have`` for a 206 whose Content-Range says so; anything else is refused."""
    if response.status == 200:
        return 0
    found = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    total = found[3] if found else "*"
    if (response.status != 206 or not have or found is None or int(found[1]) != have
            or (total != "*" and int(total) != size)):
        raise _oversent(url, size, f"answered {response.status} "
                        f"{response.headers.get('Content-Range', '')!r} to bytes={have}-")
    return have


def _expect_length(response: http.client.HTTPResponse, expected: int, url: str) -> None:
    """A Content-Length (when sent) must be what is still missing of the declared size."""
    if response.length is not None and response.length != expected:
        raise _oversent(url, expected, f"announced {response.length} bytes")


def _oversent(url: str, size: int, what: str) -> DownloadError:
    return DownloadError(f"{url} is not the declared bundle: {size} bytes expected, the "
                         f"server {what}",
                         hint="the URL or the size in the desired state is wrong; "
                              "publish the bundle again", transient=False)


def _receive(response: http.client.HTTPResponse, part: Path, have: int, size: int,
             how: _Attempt) -> int:
    """Append the body to ``part`` from ``have``; never read past ``size``."""
    with ExitStack() as files:
        with guarded(part):
            out = files.enter_context(open(part, "r+b" if have else "wb"))
            out.seek(have)
            out.truncate()
        while have < size and (chunk := response.read1(min(CHUNK, size - have))):
            _append(out, chunk, part)
            have += len(chunk)
            how.stats.received += len(chunk)
            how.on_chunk(have)
    return have


def _append(out: BinaryIO, chunk: bytes, part: Path) -> None:
    with guarded(part):
        out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _copy(source: Path, dest: Path, size: int) -> Path:
    if not source.is_file():
        raise DownloadError(f"bundle {source} does not exist", hint="check the path",
                            transient=False)
    if size and source.stat().st_size != size:
        raise DownloadError(f"{source} is {source.stat().st_size} bytes, expected {size}",
                            hint="the file changed; fetch it again", transient=False)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with guarded(tmp):
            shutil.copyfile(source, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, dest)
    except BaseException:
        discard(tmp)  # a full disk must not keep what it half wrote
        raise
    return dest
