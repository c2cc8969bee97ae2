"""A test HTTP server for bundles: Range requests, and faults on demand."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Faults:
    """Cut the connection after ``cut_after`` body bytes, for the next ``cuts`` requests."""

    cut_after: int = 0
    cuts: int = 0
    throttle_s: float = 0.0  # pause after every 4 KiB, to make a download take a while
    requests: list[str | None] = field(default_factory=list)
    sent: int = 0


class FileServer:
    """Serves files of one folder at /NAME, honouring ``Range: bytes=N-``."""

    def __init__(self, root: Path) -> None:
        self.root, self.faults = root, Faults()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer._get(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{name}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        path = self.root / h.path.lstrip("/")
        if not path.is_file():
            h.send_error(404)
            return
        data = path.read_bytes()
        spec = h.headers.get("Range")
        self.faults.requests.append(spec)
        start = int(spec.split("=")[1].split("-")[0]) if spec else 0
        body = data[start:]
        h.send_response(206 if spec else 200)
        if spec:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if self.faults.cuts > 0:
            self.faults.cuts -= 1
            h.wfile.write(body[: self.faults.cut_after])
            self.faults.sent += min(len(body), self.faults.cut_after)
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        step = 4096 if self.faults.throttle_s else len(body) or 1
        try:
            for start_at in range(0, len(body), step):
                h.wfile.write(body[start_at:start_at + step])
                self.faults.sent += len(body[start_at:start_at + step])
                if self.faults.throttle_s:
                    time.sleep(self.faults.throttle_s)
        except OSError:
            pass  # the client went away (it was killed)
