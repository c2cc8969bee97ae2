"""Bundle downloads for simulated devices: real HTTP requests, one copy of each body in memory.

Every device requests the URL itself (resuming with ``Range`` after a cut, like
:func:`edgefleet.agent.update.download.fetch`, with the same :class:`DownloadError`), but
the bytes are kept once per content digest, so 10,000 devices do not hold
10,000 copies. With ``share=True`` only the first request per URL goes out.
A local path or ``file://`` URL is read from disk. The bytes that came over the network
are counted by kind (``bundle``, ``delta``), as the controller's
``edgefleet_bytes_served_total{kind}`` counts what it sends.
"""

from __future__ import annotations

import hashlib
import http.client
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from edgefleet.agent.update.download import CHUNK, DownloadError

__all__ = ["Downloads", "http_get"]


class Downloads:
    """Fetches bundles and keeps each distinct body once, by its sha256."""

    def __init__(self, share: bool = False, tls: ssl.SSLContext | None = None) -> None:
        """``tls`` checks ``https://`` servers (default: the system's CAs)."""
        self.share, self.tls = share, tls
        self.requests = 0
        self._received: Counter[str] = Counter()  # bytes over the network, by kind
        self._bodies: dict[str, bytes] = {}
        self._by_url: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    def fetch(self, url: str, size: int) -> str:
        """Download ``url`` (``size`` bytes expected); return the digest of what came."""
        if self.share:
            with self._lock:
                known = self._by_url.get((url, size))
            if known is not None:
                return known
        digest = self.keep(self.get(url, size, "bundle"))
        with self._lock:
            self._by_url[(url, size)] = digest
        return digest

    def get(self, url: str, size: int, kind: str, retries: int = 3) -> bytes:
        """The body of ``url`` (``size`` bytes expected), counted as ``kind``; not kept."""
        body = http_get(url, size, retries=retries, tls=self.tls)
        with self._lock:
            self.requests += 1
            if urlsplit(url).scheme not in ("", "file"):
                self._received[kind] += len(body)
        return body

    def keep(self, body: bytes) -> str:
        """Keep ``body`` (once per content) and return its sha256."""
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            self._bodies.setdefault(digest, body)
        return digest

    def body(self, digest: str) -> bytes:
        with self._lock:
            return self._bodies[digest]

    def held(self, digest: str) -> bytes | None:
        """The body of that sha256 if one came or was kept, else None."""
        with self._lock:
            return self._bodies.get(digest)

    @property
    def received(self) -> dict[str, int]:
        """Bytes that came over the network, by kind (bundle, delta)."""
        with self._lock:
            return {kind: self._received.get(kind, 0) for kind in ("bundle", "delta")}


def http_get(url: str, size: int, *, retries: int = 3, backoff_s: float = 0.2,
             timeout_s: float = 10.0, tls: ssl.SSLContext | None = None) -> bytes:
    """The whole body of ``url``, resumed with Range after a cut; DownloadError if it fails."""
    scheme = urlsplit(url).scheme
    if scheme in ("", "file"):
        return _read_local(Path(urlsplit(url).path if scheme else url), size)
    data = bytearray()
    for attempt in range(retries + 1):
        try:
            _get_once(url, data, size, timeout_s, tls)
            return bytes(data)
        except (OSError, urllib.error.URLError, http.client.HTTPException, DownloadError) as exc:
            if attempt == retries:
                raise DownloadError(f"download of {url} failed after {retries + 1} attempts: "
                                    f"{exc}", hint="check the URL and the network") from exc
            time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def _get_once(url: str, data: bytearray, size: int, timeout_s: float,
              tls: ssl.SSLContext | None) -> None:
    if len(data) > size:
        data.clear()
    headers = {"Range": f"bytes={len(data)}-"} if data else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=timeout_s, context=tls) as response:
        if data and response.status != 206:
            data.clear()  # the server ignored Range: start over
        while len(data) < size and (chunk := response.read1(min(CHUNK, size - len(data)))):
            data.extend(chunk)  # bounded by the declared size, like the agent's fetch
    if len(data) != size:
        raise DownloadError(f"download of {url} ended at {len(data)} of {size} bytes",
                            hint="retrying resumes from there")


def _read_local(path: Path, size: int) -> bytes:
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise DownloadError(f"bundle {path} cannot be read: {exc}", hint="check the path",
                            transient=False) from exc
    if size and len(body) != size:
        raise DownloadError(f"{path} is {len(body)} bytes, expected {size}",
                            hint="the file changed; fetch it again", transient=False)
    return body
