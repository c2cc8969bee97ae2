"""``agent run --http`` over HTTPS with bearer tokens and client certificates.

One real agent process for the module, its certificates made by ``edgefleet certs``,
driven by tritonclient over HTTPS and by raw TLS and TCP sockets.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from edgefleet.agent.core import Agent
from edgefleet.agent.serving.errors import HttpSetupError
from edgefleet.agent.serving.http import InferenceServer
from edgefleet.agent.serving.limits import HttpLimits
from edgefleet.agent.serving.security import HttpSecurity
from edgefleet.fleet.mosquitto import free_port, wait_for_port
from tests.conftest import Keys
from tests.hostile import HOSTILE, MiB
from tests.models import TrainedModels

EDGEFLEET = [sys.executable, "-m", "edgefleet"]
TOKEN = "plant-a-infer-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 1.0  # the agent's --http-timeout here
RSS_GROWTH_CAP = 32 * MiB  # the agent's RSS may grow this much over a hostile run, no more


@dataclass(frozen=True)
class Https:
    process: subprocess.Popen[bytes]
    port: int
    certs: Path
    other: Path
    log: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def context(self, cert_dir: Path | None = None) -> ssl.SSLContext:
        """A client context trusting the fleet CA, with cam-1's certificate of ``cert_dir``."""
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        if cert_dir is not None:
            context.load_cert_chain(cert_dir / "devices" / "cam-1.crt",
                                    cert_dir / "devices" / "cam-1.key")
        return context

    def client(self, cert_dir: Path | None = None) -> triton.InferenceServerClient:
        options: dict[str, Any] = {"ca_certs": str(self.certs / "ca.crt")}
        if cert_dir is not None:
            options |= {"certfile": str(cert_dir / "devices" / "cam-1.crt"),
                        "keyfile": str(cert_dir / "devices" / "cam-1.key")}
        return triton.InferenceServerClient(self.url, ssl=True, ssl_options=options)

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                           context=self.context())

    def rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(row for row in status.splitlines() if row.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024


def _edgefleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEFLEET, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "COLUMNS": "200"})


def _make_certs(certs: Path, other: Path) -> None:
    for args in (("ca", "--dir", certs),
                 ("server", "--dir", certs, "--name", "agent-https", "--host", "127.0.0.1"),
                 ("device", "cam-1", "--dir", certs),
                 ("ca", "--dir", other), ("device", "cam-1", "--dir", other)):
        result = _edgefleet("certs", *args)
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory, digits_bundles: dict[str, Path],
          signing_keys: Keys) -> Iterator[Https]:
    root = tmp_path_factory.mktemp("https")
    certs, other, token, log = root / "certs", root / "other", root / "token", root / "agent.log"
    _make_certs(certs, other)
    token.write_text(f"# the ops team's token\n{TOKEN}\n")
    token.chmod(0o600)
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*EDGEFLEET, "agent", "run", "--bundle", str(digits_bundles["tflite"]),
             "--trusted-key", str(signing_keys.public), "--data-dir", str(root / "data"),
             "--http", f"127.0.0.1:{port}", "--http-timeout", str(TIMEOUT_S),
             "--http-tls-cert", str(certs / "agent-https.crt"),
             "--http-tls-key", str(certs / "agent-https.key"),
             "--http-token-file", str(token), "--http-client-ca", str(certs / "ca.crt")],
            stdout=out, stderr=subprocess.STDOUT)
    assert wait_for_port("127.0.0.1", port, 60), "the agent's HTTPS server did not come up"
    yield Https(process, port, certs, other, log)
    process.terminate()
    assert process.wait(timeout=30) == 0
    text = log.read_text()
    assert "Traceback" not in text and "https://127.0.0.1" in text, text
    warned = text.count("request(s) 401: no valid bearer token")  # hundreds were refused
    assert 1 <= warned <= 20, text  # one warning per 10 s at most, with the count


def _infer(client: triton.InferenceServerClient, x: np.ndarray, binary: bool = True,
           headers: dict[str, str] | None = None) -> np.ndarray:
    meta = client.get_model_metadata("digits", headers=headers)
    tensor = triton.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = triton.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=binary)
    result = client.infer("digits", [tensor], outputs=[wanted], headers=headers)
    probs = result.as_numpy(meta["outputs"][0]["name"])
    assert probs is not None
    return np.asarray(probs)


def _accuracy(probs: np.ndarray, digits_models: TrainedModels) -> float:
    return float((probs.argmax(1) == digits_models.digits.y_test).mean())


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_over_https_with_the_token(
        https: Https, digits_models: TrainedModels, binary: bool) -> None:
    probs = _infer(https.client(), digits_models.digits.x_test, binary, AUTH)
    assert probs.shape == (len(digits_models.digits.x_test), 10)
    assert _accuracy(probs, digits_models) >= 0.95


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer not-the-token-0123456789"},
                                     {"Authorization": f"Basic {TOKEN}"}],
                         ids=["none", "wrong", "not-bearer"])
def test_tritonclient_raises_without_the_token(
        https: Https, digits_models: TrainedModels, headers: dict[str, str] | None) -> None:
    client = https.client()
    x = digits_models.digits.x_test[:4]
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="bearer token"):
        client.infer("digits", [tensor], headers=headers)
    with pytest.raises(InferenceServerException, match="bearer token"):
        client.get_model_metadata("digits", headers=headers)


def test_a_refusal_is_401_with_www_authenticate_before_the_body_is_read(https: Https) -> None:
    conn = https.connection()
    conn.request("GET", "/v2/models/digits", headers={"Authorization": "Bearer wrong-token-xyz"})
    answer = conn.getresponse()
    assert answer.status == 401
    assert answer.getheader("WWW-Authenticate") == 'Bearer realm="edgefleet", error="invalid_token"'
    assert "bearer token" in json.loads(answer.read())["error"]
    conn.close()
    with socket.create_connection(("127.0.0.1", https.port), timeout=10) as raw, \
            https.context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: 4194304\r\n\r\n")  # and never the body
        head = _read_all(tls).partition(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 401 ") and "Connection: close" in head
    assert 'WWW-Authenticate: Bearer realm="edgefleet"\r\n' in head


def test_health_probes_are_open_and_the_rest_is_guarded(https: Https) -> None:
    client = https.client()
    assert client.is_server_live() and client.is_server_ready()
    with pytest.raises(InferenceServerException, match="bearer token"):
        client.get_server_metadata()
    assert not client.is_model_ready("digits")  # tritonclient reads the 401 as not ready
    assert client.get_server_metadata(headers=AUTH)["name"] == "edgefleet"
    assert client.is_model_ready("digits", headers=AUTH)


def test_a_client_certificate_from_the_fleet_ca_needs_no_token(
        https: Https, digits_models: TrainedModels) -> None:
    probs = _infer(https.client(https.certs), digits_models.digits.x_test)
    assert _accuracy(probs, digits_models) >= 0.95


def test_a_client_certificate_from_another_ca_is_refused_in_the_handshake(https: Https) -> None:
    context = https.context(https.other)
    with socket.create_connection(("127.0.0.1", https.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError, match="unknown ca"), \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.recv(100)  # TLS 1.3: the server's alert arrives after the client's Finished


def test_plain_http_on_the_https_port_is_told_so_and_harms_nothing(
        https: Https, digits_models: TrainedModels) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", https.port, timeout=10)
    conn.request("GET", "/v2/health/live")
    answer = conn.getresponse()
    assert answer.status == 400 and b"https://" in answer.read()
    conn.close()
    assert _accuracy(_infer(https.client(), digits_models.digits.x_test, headers=AUTH),
                     digits_models) >= 0.95


@HOSTILE
@given(first=st.binary(min_size=1, max_size=2048))
def test_any_bytes_instead_of_a_handshake_end_the_connection_alone(
        https: Https, first: bytes) -> None:
    answer = _exchange(https.port, first)
    assert answer in (b"", *([] if first[0] == 0x16 else [_NOT_TLS_ANSWER])) or \
        answer.startswith(b"\x15\x03"), answer[:80]  # nothing, the plain 400, or a TLS alert
    with contextlib.closing(https.connection()) as conn:
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200


_NOT_TLS_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 46"
                   b"\r\nConnection: close\r\n\r\nthis port speaks HTTPS: use an https:// URL.\r\n")


def _exchange(port: int, data: bytes) -> bytes:
    """What the server answers ``data`` with, to its end (b"" when it reset the connection:
    it closes a connection at once on a handshake that fails, unread bytes and all)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with contextlib.suppress(OSError):  # the server may have closed it already
            raw.sendall(data)
            raw.shutdown(socket.SHUT_WR)
        try:
            return _read_all(raw)
        except ConnectionResetError:
            return b""


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_stalled_handshakes_block_no_one_and_are_cut_at_the_timeout(
        https: Https, digits_models: TrainedModels) -> None:
    silent = [socket.create_connection(("127.0.0.1", https.port)) for _ in range(8)]
    partial = [socket.create_connection(("127.0.0.1", https.port)) for _ in range(8)]
    opened = time.monotonic()
    for sock in partial:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes, then nothing
    client = https.client()
    started = time.monotonic()
    assert _accuracy(_infer(client, digits_models.digits.x_test, headers=AUTH),
                     digits_models) >= 0.95
    assert time.monotonic() - started < TIMEOUT_S / 2, "a good client waited for stalled ones"
    for sock in silent + partial:
        sock.settimeout(5 * TIMEOUT_S)
        said = _read_all(sock)  # to the server's close, not to this timeout
        assert said == b"" or said.startswith(b"\x15\x03"), said  # nothing, or a TLS alert
        sock.close()
    waited = time.monotonic() - opened
    assert TIMEOUT_S * 0.9 <= waited <= TIMEOUT_S + 1.5, f"cut after {waited:.2f} s"


def test_handshakes_count_against_the_connection_bound(
        https: Https, digits_bundles: dict[str, Path], signing_keys: Keys,
        digits_models: TrainedModels) -> None:
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles["tflite"])
    security = HttpSecurity(https.certs / "agent-https.crt", https.certs / "agent-https.key",
                            tokens=(TOKEN.encode(),))
    limits = HttpLimits(timeout_s=TIMEOUT_S, max_connections=4)
    with InferenceServer(agent, limits=limits, security=security) as server:
        stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        time.sleep(0.2)  # all four accepted, each in its handshake
        started = time.monotonic()
        assert _exchange(server.port, b"") == b""  # one more: closed, no handshake, no answer
        assert time.monotonic() - started < TIMEOUT_S / 2
        for sock in stalled:
            sock.settimeout(5 * TIMEOUT_S)
            _read_all(sock)  # cut by the watchdog
            sock.close()
        client = triton.InferenceServerClient(server.url, ssl=True,
                                              ssl_options={"ca_certs": str(https.certs / "ca.crt")})
        assert _accuracy(_infer(client, digits_models.digits.x_test, headers=AUTH),
                         digits_models) >= 0.95
    agent.close()


@HOSTILE
@given(value=st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
            max_size=200),
    st.builds(lambda a, b: f"Bearer {a}{TOKEN}{b}",
              st.text("abcXYZ019-_.~+/=", max_size=8), st.text("abcXYZ019-_.~+/=", min_size=1,
                                                                max_size=8)),
    st.builds(lambda cut: f"Bearer {TOKEN[:cut]}", st.integers(0, len(TOKEN) - 1))))
def test_no_other_authorization_value_lets_a_caller_in(https: Https, value: str) -> None:
    before = https.rss()
    with contextlib.closing(https.connection()) as conn:
        conn.request("GET", "/v2/models/digits", headers={"Authorization": value})
        answer = conn.getresponse()
        assert answer.status == 401, value
        assert answer.getheader("WWW-Authenticate", "").startswith("Bearer")
        answer.read()
        conn.request("GET", "/v2/models/digits", headers=AUTH)  # the same connection goes on
        assert conn.getresponse().status == 200
    assert https.rss() - before < RSS_GROWTH_CAP


@HOSTILE
@given(value=st.text(max_size=100))
def test_security_accepts_only_its_own_tokens(value: str) -> None:
    security = HttpSecurity(Path("c"), Path("k"), tokens=(TOKEN.encode(), b"x" * 16))
    header = value.encode("utf-8").decode("latin-1")  # as the server reads a header's bytes
    scheme, _, token = header.strip().partition(" ")
    expected = scheme.lower() == "bearer" and token.strip() in (TOKEN, "x" * 16)
    assert security.accepts(header) == expected


def test_a_short_token_is_refused() -> None:
    with pytest.raises(HttpSetupError, match="shorter than 16"):
        HttpSecurity(Path("c"), Path("k"), tokens=(b"letmein",))


@pytest.mark.parametrize(("options", "said"), [
    (["--http-token-file", "TOKEN"], "in clear over plain HTTP"),
    (["--http-client-ca", "CA"], "--http-tls-cert"),
    (["--http-tls-cert", "CERT"], "both --http-tls-cert and --http-tls-key"),
    (["--http-tls-cert", "CLIENT", "--http-tls-key", "CERT_KEY"], "cannot serve HTTPS"),
], ids=["token-without-tls", "client-ca-without-tls", "cert-without-key", "key-of-another"])
def test_security_options_that_cannot_work_are_refused_in_one_line(
        https: Https, tmp_path: Path, options: list[str], said: str) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    files = {"TOKEN": token, "CA": https.certs / "ca.crt", "CERT": https.certs / "agent-https.crt",
             "CLIENT": https.certs / "devices" / "cam-1.crt",
             "CERT_KEY": https.certs / "agent-https.key"}
    result = _edgefleet("agent", "run", "--http", f"127.0.0.1:{free_port()}",
                        "--data-dir", tmp_path / "data", *[files.get(o, o) for o in options])
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_security_options_without_http_are_refused(https: Https, tmp_path: Path) -> None:
    result = _edgefleet("agent", "run", "--data-dir", tmp_path / "data", "--http-tls-cert",
                        https.certs / "agent-https.crt", "--http-tls-key",
                        https.certs / "agent-https.key")
    assert result.returncode == 2 and "pass --http HOST:PORT" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("order", ["bad-then-good", "good-then-bad"])
def test_two_authorization_headers_are_refused_whatever_their_order(
        https: Https, order: str) -> None:
    good, bad = AUTH["Authorization"], "Bearer wrong-token-xyz-123"
    first, second = (bad, good) if order == "bad-then-good" else (good, bad)
    with socket.create_connection(("127.0.0.1", https.port), timeout=10) as raw, \
            https.context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"GET /v2/models/digits HTTP/1.1\r\nHost: x\r\nAuthorization: {first}\r\n"
                    f"Authorization: {second}\r\nConnection: close\r\n\r\n".encode())
        head, _, body = _read_all(tls).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"two Authorization headers" in body
