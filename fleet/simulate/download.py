"""Bundle downloads for simulated devices: real HTTP requests, one copy of each body in memory.

Every device requests the URL itself (resuming with ``Range`` after a cut, like
:func:`edgefleet.agent.update.download.fetch`, with the same :class:`DownloadError`), but
the bytes are kept once per content digest, so 10,000 devices do not hold
10,000 copies. With ``share=True`` only the first request per URL goes out.
A local path or ``file://`` URL is read from disk.
"""

from __future__ import annotations

import hashlib
import http.client
import ssl
import threading
import time
import urllib.error
import urllib.request
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
        body = http_get(url, size, tls=self.tls)
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            self.requests += 1
            self._bodies.setdefault(digest, body)
            self._by_url[(url, size)] = digest
        return digest

    def body(self, digest: str) -> bytes:
        with self._lock:
            return self._bodies[digest]


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
