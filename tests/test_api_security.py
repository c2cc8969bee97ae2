"""The controller's REST API under hostile input, over real HTTP: every mutating call needs a
token, uploads are verified before a byte is stored, ids and names are checked against the
device contract, traversal attempts are refused, and bodies are capped (413).

Requests go through ``http.client`` so paths are sent exactly as written (no client-side
normalisation of ``..`` or ``%2e``) and a raw socket where the body must not be sent.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from edgefleet.agent.protocol.signing import SigningKey, generate_keypair
from tests import tamper
from tests.conftest import Keys
from tests.fleet_harness import TOKEN, Fleet

WRONG = "not-the-token-at-all"

MUTATING = [
    ("POST", "/api/v1/models"),
    ("POST", "/api/v1/keyring"),
    ("POST", "/api/v1/devices/group"),
    ("POST", "/api/v1/devices/cam-0/tags"),
    ("POST", "/api/v1/rollouts"),
    ("POST", "/api/v1/rollouts/r1/pause"),
    ("POST", "/api/v1/rollouts/r1/resume"),
    ("POST", "/api/v1/rollouts/r1/abort"),
    ("POST", "/api/v1/rollouts/r1/rollback"),
    ("POST", "/api/v1/rollback"),
    ("POST", "/api/v1/devices/remove"),
    ("DELETE", "/api/v1/devices/cam-0"),
    ("PUT", "/api/v1/models"),
    ("PUT", "/api/v1/rollouts/r1"),
    ("DELETE", "/api/v1/rollouts/r1"),
    ("DELETE", "/api/v1/models"),
    ("DELETE", f"/bundles/{'0' * 64}.efb"),
    ("PATCH", "/api/v1/devices/cam-0/tags"),
]


class Api:
    """Raw HTTP to the controller: exact paths, any method, any header."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = str(parts.hostname), int(parts.port or 80)

    def call(self, method: str, path: str, body: bytes | None = None,
             token: str | None = TOKEN, headers: dict[str, str] | None = None,
             conn: http.client.HTTPConnection | None = None) -> tuple[int, Any, dict[str, str]]:
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=20)
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            raw = response.read()
            data = json.loads(raw) if raw and "json" in (response.getheader("Content-Type")
                                                        or "") else raw
            return response.status, data, dict(response.getheaders())
        finally:
            if own:
                conn.close()

    def json(self, method: str, path: str, data: Any, token: str | None = TOKEN
             ) -> tuple[int, Any]:
        status, body, _ = self.call(method, path, json.dumps(data).encode(), token,
                                    {"Content-Type": "application/json"})
        return status, body

    def raw(self, request: bytes) -> bytes:
        """Send bytes as they are; return what the server answers before it closes."""
        with socket.create_connection((self.host, self.port), timeout=20) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture()
def api(fleet: Fleet) -> Iterator[Api]:
    fleet.start_controller()
    assert fleet.api is not None
    yield Api(fleet.api.url)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _artifacts(fleet: Fleet) -> list[str]:
    return _tree(fleet.root / "controller" / "bundles")


def _history(api: Api) -> list[dict[str, Any]]:
    status, data, _ = api.call("GET", "/api/v1/history?limit=1000")
    assert status == 200
    return list(data)


def test_every_mutating_endpoint_refuses_a_missing_or_wrong_token(
        api: Api, fleet: Fleet, digits_bundles: dict[str, Path]) -> None:
    bundle = digits_bundles["tflite"].read_bytes()
    before = _tree(fleet.root / "controller")
    for method, path in MUTATING:
        body = bundle if path == "/api/v1/models" else b'{"devices": ["cam-0"], "group": "g"}'
        for token in (None, WRONG, ""):
            status, data, _ = api.call(method, path, body, token=token)
            assert status == 401, (method, path, token, data)
            assert data["kind"] == "AuthError" and data["hint"], (method, path)
    assert _tree(fleet.root / "controller") == before, "a refused request wrote something"
    assert _history(api) == [], "a refused request reached the controller"
    status, data, headers = api.call("DELETE", "/api/v1/rollouts/r1")
    assert status == 405 and headers["Allow"] == "GET, HEAD", "the methods of that path"
    assert "not an API method" in data["error"]
    status, data, headers = api.call("PUT", "/api/v1/devices/cam-0")
    assert status == 405 and headers["Allow"] == "DELETE"


def test_a_refused_body_is_never_read_as_the_next_request(api: Api) -> None:
    conn = http.client.HTTPConnection(api.host, api.port, timeout=20)
    smuggled = b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\n\r\n"
    status, _, _ = api.call("POST", "/api/v1/rollouts", smuggled, token=None, conn=conn)
    assert status == 401
    status, data, _ = api.call("GET", "/healthz", token=None, conn=conn)
    assert status == 200 and data["ok"] is True
    conn.close()


def _bad_bundles(source: Path, keys: Keys, stranger: SigningKey) -> dict[str, bytes]:
    raw = source.read_bytes()

    def rename(name: str) -> bytes:
        files = tamper.members(raw)
        files[name] = files.pop("labels.txt", b"x")
        return tamper.pack(files)

    def fifo(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("labels.txt")
        info.type = tarfile.FIFOTYPE
        archive.addfile(info)

    return {
        "truncated": raw[: len(raw) // 2],
        "not a tar": b"\x00\x01 not a bundle " * 100,
        "signed by a stranger": tamper.resigned(source, stranger, lambda m: None),
        "name ../x, signed by a trusted key": tamper.resigned(
            source, keys.signer, lambda m: m.update(name="../x")),
        "version with a slash, signed": tamper.resigned(
            source, keys.signer, lambda m: m.update(version="1.0.0/../../x")),
        "absolute member": rename("/tmp/edgefleet-evil"),
        "climbing member": rename("../../edgefleet-evil"),
        "symlink member": tamper.with_link(source, "evil", "/etc/passwd"),
        "hard link member": tamper.with_link(source, "evil", "../../x", hard=True),
        "fifo member": tamper.pack({k: v for k, v in tamper.members(raw).items()
                                    if k != "labels.txt"}, fifo),
        "model altered after signing": tamper.with_member(source, "model.tflite",
                                                          b"\x00" * 1000),
    }


def test_a_bundle_that_does_not_verify_leaves_the_artifact_folder_unchanged(
        api: Api, fleet: Fleet, digits_bundles: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    stranger = SigningKey.load(generate_keypair(tmp_path / "stranger", "x")[0])
    for what, data in _bad_bundles(digits_bundles["tflite"], signing_keys, stranger).items():
        status, body, _ = api.call("POST", "/api/v1/models", data,
                                   headers={"Content-Type": "application/octet-stream"})
        assert status == 422, (what, body)
        assert body["error"] and body["hint"], what
        assert _artifacts(fleet) == [], what
    status, models, _ = api.call("GET", "/api/v1/models")
    assert models == []
    assert not Path("/tmp/edgefleet-evil").exists()
    assert not list(tmp_path.parent.rglob("*evil*")), "a member was written outside"
    refused = [e for e in _history(api) if e["action"] == "model.push"]
    assert len(refused) == 11 and {e["outcome"] for e in refused} == {"refused"}


def test_the_same_name_and_version_with_other_bytes_is_refused_and_not_stored(
        api: Api, fleet: Fleet, digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    first = digits_bundles["tflite"].read_bytes()
    assert api.call("POST", "/api/v1/models", first)[0] == 201
    stored = _artifacts(fleet)
    other = tamper.resigned(digits_bundles["tflite"], signing_keys.signer,
                            lambda m: m.update(created="2000-01-01T00:00:00Z"))
    status, body, _ = api.call("POST", "/api/v1/models", other)
    assert status == 409 and "digits:1.0.0" in body["error"]
    assert _artifacts(fleet) == stored


@pytest.mark.parametrize("path", [
    "/bundles/../../etc/passwd",
    "/bundles/%2e%2e/%2e%2e/etc/passwd",
    "/bundles/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/dashboard/../../../etc/passwd",
    "/dashboard/..%2f..%2fetc%2fpasswd",
    "/api/v1/devices/..%5c..%5cx/tags",
    "/api/v1/../../../etc/passwd",
])
def test_a_traversal_attempt_gets_a_clear_400_with_or_without_a_token(
        api: Api, path: str) -> None:
    for method in ("GET", "POST"):
        for token in (TOKEN, None):
            status, body, _ = api.call(method, path, b"{}", token=token)
            assert status == 400, (method, path, token)
            assert "is not allowed" in body["error"] and "'..'" in body["hint"]


def test_ids_names_and_versions_are_checked_against_the_contract(api: Api) -> None:
    refused = [
        ("POST", "/api/v1/devices/bad%20id/tags", {"add": ["t"]}, "device id 'bad id'"),
        ("POST", "/api/v1/devices/_fleet/tags", {"add": ["t"]}, "device id '_fleet'"),
        ("POST", f"/api/v1/devices/{'d' * 65}/tags", {"add": ["t"]}, "1-64 letters"),
        ("POST", "/api/v1/devices/cam-0/tags", {"add": ["a\nb"]}, "tag 'a\\nb'"),
        ("POST", "/api/v1/devices/cam-0/tags", {"remove": ["t" * 65]}, "1-64 printable"),
        ("POST", "/api/v1/devices/cam-0/tags", {"add": "abc"}, "add must be a list"),
        ("POST", "/api/v1/devices/group", {"devices": ["../x"], "group": "g"},
         "device id '../x'"),
        ("POST", "/api/v1/devices/group", {"devices": "cam-0", "group": "g"},
         "devices must be a list"),
        ("POST", "/api/v1/devices/group", {"devices": [7], "group": "g"},
         "device id must be a string"),
        ("POST", "/api/v1/devices/group", {"devices": ["cam-0"], "group": ""},
         "group '' is not allowed"),
        ("POST", "/api/v1/rollback", {"group": ["g"]}, "group must be a string"),
        ("POST", "/api/v1/rollouts", {"model": "../x:1.0.0", "selectors": ["group:g"]},
         "NAME:VERSION"),
        ("POST", "/api/v1/rollouts", {"model": "digits:1.0", "selectors": ["group:g"]},
         "NAME:VERSION"),
        ("POST", "/api/v1/rollouts", {"model": 12}, "NAME:VERSION"),
        ("POST", "/api/v1/rollouts/r1%3Bdrop/pause", {}, "rollout id"),
        ("GET", "/api/v1/rollouts/r1'or'1", None, "rollout id"),
        ("GET", "/api/v1/history?limit=abc", None, "limit must be"),
        ("GET", "/api/v1/history?limit=%C2%B2", None, "limit must be"),
    ]
    for method, path, data, expected in refused:
        status, body = api.json(method, path, data)
        assert status == 400, (path, data, body)
        assert expected in body["error"], (path, body)
    status, body = api.json("POST", "/api/v1/rollouts", "[1, 2]")
    assert status == 400 and "JSON object" in body["error"]
    status, body = api.json("POST", "/api/v1/rollouts/r999/pause", {})
    assert status == 404, "a well-formed id reaches the controller"


def test_bodies_are_capped_before_they_are_read(api: Api) -> None:
    huge = api.raw(f"POST /api/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
                   f"\r\nContent-Length: {10 * 1024 ** 3}\r\n\r\n".encode())
    assert huge.startswith(b"HTTP/1.1 413"), huge[:200]
    assert b"at most 536870912 bytes here" in huge
    status, body, _ = api.call("POST", "/api/v1/rollouts", b"{" + b" " * (2 * 1024 * 1024)
                               + b"}", headers={"Content-Type": "application/json"})
    assert status == 413 and "too large" in body["error"] and "1048576" in body["hint"]
    status, body, _ = api.call("POST", "/api/v1/keyring", b"x" * (65 * 1024))
    assert status == 413
    bad_length = api.raw(f"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nAuthorization: "
                         f"Bearer {TOKEN}\r\nContent-Length: 12abc\r\n\r\n".encode())
    assert bad_length.startswith(b"HTTP/1.1 400") and b"not a byte count" in bad_length
    chunked = api.raw(f"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      f"{TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    assert chunked.startswith(b"HTTP/1.1 411"), chunked[:200]


def test_a_keyring_that_does_not_verify_is_refused_and_not_stored(
        api: Api, fleet: Fleet, tmp_path: Path) -> None:
    from edgefleet.agent.protocol.keyring import build_keyring

    thief = SigningKey.load(generate_keypair(tmp_path / "thief", "thief")[0])
    raw = build_keyring([("thief", thief.private_key.public_key())], 99, [thief])
    status, body, _ = api.call("POST", "/api/v1/keyring", raw)
    assert status == 422 and "none of which is trusted here" in body["error"]
    assert not (fleet.root / "controller" / "keyring.json").exists()
    assert api.call("GET", "/api/v1/keyring")[0] == 404
    status, body, _ = api.call("POST", "/api/v1/keyring", b"\xff\xfe{not json")
    assert status == 422 and "not valid JSON" in body["error"]
    assert [e["outcome"] for e in _history(api)] == ["refused", "refused"]


def test_the_page_and_bundle_routes_serve_nothing_outside_their_folders(api: Api) -> None:
    for path in ("/dashboard/index.html", "/dashboard/app.js"):
        assert api.call("GET", path, token=None)[0] == 200
    for path in ("/dashboard/..", "/dashboard/%2e%2e/api.py", "/dashboard/static/../x.py",
                 f"/bundles/{'a' * 64}.efb", "/bundles/x.efb", "/bundles/%00.efb"):
        status, _, _ = api.call("GET", path, token=None)
        assert status in (400, 401, 404), path
    buffer = io.BytesIO(api.raw(b"GET /bundles/..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: x\r\n"
                                b"Connection: close\r\n\r\n"))
    assert buffer.read().startswith(b"HTTP/1.1 400")


def test_a_store_failure_is_answered_503_when_a_retry_may_pass_and_500_otherwise() -> None:
    from edgefleet.fleet.api import _status
    from edgefleet.fleet.errors import StoreError

    assert _status(StoreError("deadlock detected", hint="retry it")) == 503
    assert _status(StoreError("the store is closed", transient=False)) == 500
