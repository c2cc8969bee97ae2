"""Hostile bundle archives: every tar a header can describe is refused as a BundleError.

The class: member types (regular, contiguous, GNU and pax sparse, hard and symbolic links,
directories, fifos, devices, unknown flags), size fields (honest, lying octal, base-256 up
to 2^88, negative, garbage), names (the bundle's own, unknown, duplicated, with "..",
absolute, unicode, control characters, longer than a ustar field through pax ``path`` or a
GNU long name), pax headers (random keys and values, ``GNU.sparse.*``, ``size``, ``path``),
pax global headers and truncation anywhere. Each is read in this process with its peak
memory traced; the sparse members that used to cost a device or the controller a gigabyte
are also run through ``edgefleet agent install`` and ``edgefleet fleet push`` (a real
``fleet serve``), whose own peak RSS is measured.
"""

from __future__ import annotations

import functools
import http.client
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.protocol.bundle import (
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    Bundle,
    build_bundle,
    read_bundle,
    read_manifest,
)
from edgefleet.agent.protocol.errors import BundleError, BundleFormatError, UnsafeMemberError
from edgefleet.agent.protocol.manifest import Manifest
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys
from edgefleet.fleet.mosquitto import MosquittoBroker
from tests import tamper
from tests.conftest import Keys
from tests.controller_process import measured_controller, stop
from tests.fleet_harness import TOKEN, wait_until
from tests.hostile import HOSTILE, Measured, MiB, peak_traced_bytes, run_measured

EDGEFLEET = [sys.executable, "-m", "edgefleet"]
IN_PROCESS_CAP = 32 * MiB  # peak traced bytes to read any generated archive (a few KB)
EXAMPLE_SECONDS = 5.0  # one generated archive, read twice, on a loaded 2-core machine
CHILD_RSS_CAP = 400 * MiB  # agent install / fleet serve / fleet push with a sparse member
SPARSE_SIZES = {"512 MiB": 512 * MiB, "64 GiB": 64 << 30, "2^70": 1 << 70}

# --- a tar writer that lies on purpose (tarfile cannot) ------------------------------------


def _octal(value: int) -> bytes:
    return b"%011o\0" % value


def _base256(value: int) -> bytes:
    return b"\x80" + value.to_bytes(11, "big")


def header(name: bytes, size: bytes, flag: bytes = b"0", *, magic: bytes = b"ustar\x0000",
           linkname: bytes = b"", extra: dict[int, bytes] | None = None) -> bytes:
    """One 512-byte header with a valid checksum; ``size`` is the raw 12-byte field."""
    block = bytearray(512)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:124] = b"0000644\x000000000\x000000000\x00"
    block[124:136] = size[:12].ljust(12, b"\0")
    block[136:148] = b"00000000000\0"
    block[156:157] = flag[:1]
    block[157:257] = linkname[:100].ljust(100, b"\0")
    block[257:265] = magic[:8].ljust(8, b"\0")
    for offset, data in (extra or {}).items():
        block[offset:offset + len(data)] = data
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def member(name: str, data: bytes) -> bytes:
    return header(name.encode(), _octal(len(data))) + padded(data)


def pax(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        record = f" {key}={value}\n".encode()
        length = len(record) + len(str(len(record)))
        length = len(record) + len(str(length))
        body += str(length).encode() + record
    return header(b"PaxHeaders/x", _octal(len(body)), b"x") + padded(body)


def archive(*members: bytes) -> bytes:
    return b"".join(members) + b"\0" * 1024


def gnu_sparse(name: str, stored: bytes, realsize: int) -> bytes:
    """A GNU ``S`` member: ``stored`` bytes on disk, ``realsize`` once expanded."""
    real = _octal(realsize) if realsize < 8 ** 11 else _base256(realsize)
    sparse_map = _octal(realsize - len(stored) if realsize >= len(stored) else 0)[:12]
    entries = sparse_map + _octal(len(stored))  # one data region at the end of the file
    return header(name.encode(), _octal(len(stored)), b"S", magic=b"ustar  \0",
                  extra={386: entries, 482: b"\0", 483: real}) + padded(stored)


def pax_sparse(name: str, stored: bytes, realsize: int) -> bytes:
    records = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
               "GNU.sparse.realsize": str(realsize)}
    body = padded(b"1\n0\n%d\n" % len(stored)) + stored
    return pax(records) + member(f"GNUSparseFile.0/{name}", body)


# --- the bundle the archives are made from --------------------------------------------------

@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    from edgefleet.agent.protocol.signing import generate_keypair

    return SigningKey.load(generate_keypair(tmp_path_factory.mktemp("hostile-keys"), "k")[0])


@pytest.fixture(scope="module")
def small(signer: SigningKey) -> dict[str, bytes]:
    """The members of a small signed bundle (read_bundle never loads the model)."""
    manifest = Manifest.model_validate({
        "schema_version": 1, "name": "tiny", "version": "1.0.0",
        "created": "2026-01-01T00:00:00Z", "format": "tflite",
        "runtime": {"name": "litert"}, "files": {},
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}]})
    raw = build_bundle(manifest, {"model.tflite": b"TFL3" * 300, "health.npz": b"PK" * 100,
                                  "labels.txt": b"zero\none\n"}, signer)
    return tamper.members(raw)


def _trusted(signer: SigningKey) -> TrustedKeys:
    trusted = TrustedKeys()
    trusted.add(signer.private_key.public_key())
    return trusted


# --- the class, generated ----------------------------------------------------------------

KNOWN = ["manifest.json", "manifest.sig", "model.tflite", "model.onnx", "health.npz",
         "labels.txt", "model.tflite.enc"]
NAMES = st.sampled_from(KNOWN) | st.sampled_from(
    ["../manifest.json", "/etc/passwd", "a/../../x", "./model.tflite", "model.tflite/", "",
     "C:\\x", "[/x]", "mod\u00e9l.tflite", "manifest.json\x1b[2J", "\u202emanifest.json",
     "x" * 99, "x" * 300]) | st.text(max_size=40)
FLAGS = st.sampled_from([b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6", b"S", b"V",
                         b"M", b"D", b"N", b"x", b"L", b"K", b"g", b"Z"])
SIZES = st.one_of(
    st.just("honest"),
    st.integers(0, 8 ** 11 - 1).map(_octal),
    st.sampled_from([1 << 29, 64 << 30, 1 << 70, 1 << 80, (1 << 88) - 1]).map(_base256),
    st.integers(1, 1 << 80).map(lambda n: b"\xff" + (-n % (1 << 88)).to_bytes(11, "big")),
    st.binary(min_size=12, max_size=12),
    st.sampled_from([b"0x12\0", b"  9 \0", b"-1\0", "\u00b2".encode(), b"777777777777"]))
PAX_KEYS = st.sampled_from(["path", "size", "linkpath", "GNU.sparse.map", "GNU.sparse.size",
                            "GNU.sparse.realsize", "GNU.sparse.major", "mtime", "hdrcharset",
                            "comment"]) | st.text(min_size=1, max_size=12).filter(
                                lambda k: "=" not in k)
PAX_VALUES = st.sampled_from(["a,b,c", "536870912", "1" * 30, "-5", "\u00b2", "../x",
                              "model.tflite", "manifest.json", "0"]) | st.text(max_size=30)


@st.composite
def hostile_members(draw: st.DrawFn, real: dict[str, bytes]) -> bytes:
    """One member: a header (of any flag, name and size field) and some data."""
    how = draw(st.sampled_from(["raw", "raw", "pax", "pax raw", "long name", "sparse",
                                "real"]))
    name = draw(NAMES)
    data = draw(st.sampled_from(sorted(real.values())) | st.binary(max_size=700))
    if how == "real":
        return member(*draw(st.sampled_from(sorted(real.items()))))
    if how == "sparse":
        build = draw(st.sampled_from([gnu_sparse, pax_sparse]))
        return build(name, data[:512], draw(st.sampled_from([*SPARSE_SIZES.values(), 4096])))
    if how == "long name":
        raw_name = name.encode("utf-8", "replace") or b"x"
        return (header(b"././@LongLink", _octal(len(raw_name) + 1), b"L")
                + padded(raw_name + b"\0") + member("x", data))
    if how.startswith("pax"):
        records = draw(st.dictionaries(PAX_KEYS, PAX_VALUES, max_size=5))
        head = pax(records)
        if how == "pax raw":  # a pax header whose own data is damaged
            head = header(b"PaxHeaders/x", draw(SIZES.filter(lambda s: s != "honest")), b"x") \
                + draw(st.binary(max_size=600))
        return head + member(name if draw(st.booleans()) else "model.tflite", data)
    size = draw(SIZES)
    field = _octal(len(data)) if size == "honest" else size
    magic = draw(st.sampled_from([b"ustar\x0000", b"ustar  \0", b"garbage!"]))
    return header(name.encode("utf-8", "replace"), field, draw(FLAGS), magic=magic,
                  linkname=draw(st.sampled_from([b"", b"/etc/passwd", b"../../x"]))) \
        + padded(data)


@st.composite
def hostile_archives(draw: st.DrawFn, real: dict[str, bytes]) -> bytes:
    """The real members in any order with hostile ones among them, maybe truncated."""
    members = [member(n, d) for n, d in real.items() if draw(st.integers(0, 9)) > 0]
    for _ in range(draw(st.integers(1, 3))):
        members.insert(draw(st.integers(0, len(members))), draw(hostile_members(real)))
    raw = archive(*members)
    if draw(st.booleans()):
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except BundleError as exc:  # anything else propagates and fails the example
        return exc


def _read_all(raw: bytes, trusted: TrustedKeys, path: Path) -> list[object]:
    """From bytes (the controller's push), and streamed from a file (a device)."""
    path.write_bytes(raw)
    return [_outcome(lambda: read_bundle(raw, trusted)),
            _outcome(lambda: read_bundle(path, trusted)), _outcome(lambda: read_manifest(path))]


def test_any_archive_is_a_verified_bundle_or_a_bundle_error_in_bounded_memory_and_time(
        small: dict[str, bytes], signer: SigningKey, tmp_path: Path) -> None:
    trusted = _trusted(signer)
    expected = read_bundle(archive(*(member(n, d) for n, d in small.items())), trusted)

    @HOSTILE
    @given(raw=hostile_archives(small))
    def check(raw: bytes) -> None:
        started = time.monotonic()
        outcomes, peak = peak_traced_bytes(lambda: _read_all(raw, trusted, tmp_path / "b.efb"))
        assert time.monotonic() - started < EXAMPLE_SECONDS
        assert peak < IN_PROCESS_CAP, f"{peak / MiB:.1f} MiB to read {len(raw)} bytes"
        assert isinstance(outcomes, list), repr(outcomes)  # no exception but a BundleError
        from_bytes, from_file, _ = outcomes
        assert type(from_bytes) is type(from_file)
        for error in (o for o in outcomes if isinstance(o, BundleError)):
            assert error.message.strip() and error.hint.strip(), repr(error)
        if isinstance(from_bytes, Bundle):  # only the signed bundle, its members in any order
            assert from_bytes.manifest_bytes == expected.manifest_bytes
            assert dict(from_bytes.files) == dict(expected.files)

    check()


# --- the cases found outside, named --------------------------------------------------------

def _with(real: dict[str, bytes], name: str, hostile: bytes) -> bytes:
    return archive(*(hostile if n == name else member(n, d) for n, d in real.items()))


def named_cases(real: dict[str, bytes]) -> dict[str, bytes]:
    stored = real["model.tflite"][:512]
    cases = {f"GNU sparse {label}": _with(real, "model.tflite",
                                          gnu_sparse("model.tflite", stored, size))
             for label, size in SPARSE_SIZES.items()}
    cases["pax sparse 512 MiB"] = _with(real, "model.tflite",
                                        pax_sparse("model.tflite", stored, 512 * MiB))
    cases["pax GNU.sparse.map=a,b,c"] = _with(
        real, "model.tflite", pax({"GNU.sparse.map": "a,b,c", "GNU.sparse.size": "9"})
        + member("model.tflite", stored))
    cases["base-256 size 2^80"] = _with(real, "model.tflite", header(
        b"model.tflite", _base256(1 << 80)) + padded(stored))
    cases["octal size of 8 GiB in 3 KB"] = _with(real, "model.tflite", header(
        b"model.tflite", _octal(8 ** 11 - 1)) + padded(stored))
    cases["negative base-256 size"] = _with(real, "model.tflite", header(
        b"model.tflite", b"\xff" * 12) + padded(stored))
    cases["pax size of 30 digits"] = _with(real, "model.tflite", pax({"size": "9" * 30})
                                           + member("model.tflite", stored))
    cases["pax header of 1 GiB"] = _with(real, "model.tflite", header(
        b"PaxHeaders/x", _octal(1 << 30), b"x") + padded(b"30 path=model.tflite\n"))
    return cases


EXPECTED = {"GNU sparse": (UnsafeMemberError, "sparse file"),
            "pax sparse": (UnsafeMemberError, "sparse file"),
            "pax GNU.sparse.map": (UnsafeMemberError, "sparse file"),
            "base-256": (BundleFormatError, "declares 1208925819614629174706176 bytes"),
            "octal size": (BundleFormatError, "declares 8589934591 bytes"),
            "negative": (BundleFormatError, "negative size"),
            "pax size": (BundleFormatError, "size that is not a number"),
            "pax header of": (BundleFormatError, "extended header of 1073741824 bytes")}


def test_the_sparse_and_lying_members_found_outside_are_refused_by_their_header_alone(
        small: dict[str, bytes], signer: SigningKey) -> None:
    trusted = _trusted(signer)
    for what, raw in named_cases(small).items():
        error, peak = peak_traced_bytes(functools.partial(read_bundle, raw, trusted))
        kind, words = next(v for k, v in EXPECTED.items() if what.startswith(k))
        assert isinstance(error, kind), (what, error)
        assert words in error.message and error.hint, (what, error.message)
        assert peak < 2 * len(raw) + MiB, (what, peak)  # nothing beyond the archive's bytes


@pytest.mark.parametrize(("name", "size"), [("manifest.json", MAX_MANIFEST_BYTES + 1),
                                          ("manifest.sig", MAX_SIGNATURE_BYTES + 1),
                                          ("model.tflite", MAX_FILE_BYTES + 1)])
def test_a_member_larger_than_its_cap_is_refused_before_it_is_read(
        small: dict[str, bytes], signer: SigningKey, name: str, size: int) -> None:
    raw = _with(small, name, header(name.encode(), _octal(size)) + padded(small[name]))
    error, peak = peak_traced_bytes(lambda: read_bundle(raw, _trusted(signer)))
    assert isinstance(error, BundleFormatError), error
    assert f"declares {size} bytes, more than the {size - 1} a bundle's {name} may hold" \
        in error.message
    assert peak < 2 * len(raw) + MiB
    assert (4 * MiB, 4096, 1 << 30) == (MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, MAX_FILE_BYTES)


# --- the same archives through the commands ----------------------------------------------

@pytest.fixture(scope="module")
def sparse_files(digits_bundles: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real signed digits bundle with its model replaced by a GNU sparse member."""
    real = tamper.members(digits_bundles["tflite"].read_bytes())
    folder = tmp_path_factory.mktemp("sparse")
    files = {}
    for label, size in SPARSE_SIZES.items():
        files[label] = folder / f"sparse-{label.replace(' ', '').replace('^', '')}.efb"
        files[label].write_bytes(_with(real, "model.tflite",
                                       gnu_sparse("model.tflite", b"\0" * 512, size)))
    return files


def _one_error_line(result: Measured) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


def test_agent_install_refuses_sparse_members_in_one_line_and_bounded_memory(
        digits_bundles: dict[str, Path], sparse_files: dict[str, Path], signing_keys: Keys,
        tmp_path: Path) -> None:
    data = tmp_path / "device"
    install = [*EDGEFLEET, "agent", "install", "--data-dir", str(data),
               "--trusted-key", str(signing_keys.public)]
    good = run_measured([*install, str(digits_bundles["tflite"])])
    assert good.returncode == 0, good.stderr
    for label, path in sparse_files.items():
        result = run_measured([*install, str(path)])
        assert result.returncode == 2, (label, result.stderr)
        line = _one_error_line(result)
        assert "'model.tflite' is a GNU sparse file, not a regular file" in line, line
        assert "fix:" in line
        assert result.peak_rss_bytes < CHILD_RSS_CAP, (label, result.peak_rss_bytes / MiB)
        print(f"agent install, sparse {label}: peak RSS {result.peak_rss_bytes / MiB:.0f} MiB "
              f"(a good install: {good.peak_rss_bytes / MiB:.0f} MiB), {result.seconds:.1f} s")
    status = run_measured([*EDGEFLEET, "agent", "status", "--data-dir", str(data), "--json"])
    active = [s for s in json.loads(status.stdout)["slots"] if "active" in s["role"]]
    assert [(s["name"], s["version"]) for s in active] == [("digits", "1.0.0")]


@pytest.fixture()
def served(mosquitto: MosquittoBroker, signing_keys: Keys,
           tmp_path: Path) -> Iterator[tuple[str, dict[str, Measured], Path]]:
    """``edgefleet fleet serve`` as its own process; its peak RSS once it stopped."""
    data = tmp_path / "fleet-data"
    with measured_controller(mosquitto.url, signing_keys.public, data, "hostile") as (url, done):
        yield url, done, data


def _post(url: str, body: bytes) -> tuple[int, dict[str, str]]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/api/v1/models", body, {"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_fleet_push_of_sparse_members_is_422_in_one_line_and_the_controller_stays_small(
        served: tuple[str, dict[str, Measured], Path], sparse_files: dict[str, Path],
        digits_bundles: dict[str, Path]) -> None:
    url, done, data = served
    push = [*EDGEFLEET, "fleet", "push", "--controller", url, "--token", TOKEN]
    for label, path in sparse_files.items():
        status, body = _post(url, path.read_bytes())
        assert status == 422 and body["kind"] == "UnsafeMemberError", (label, status, body)
        assert "sparse file" in body["error"] and body["hint"]
        result = run_measured([*push, str(path)])
        assert result.returncode == 2, (label, result.stderr)
        assert "is a GNU sparse file" in _one_error_line(result)
    good = run_measured([*push, str(digits_bundles["tflite"])])
    assert good.returncode == 0, good.stderr
    assert [p.suffix for p in (data / "bundles").iterdir()] == [".efb"]
    stop(str(data))
    wait_until(lambda: "server" in done, 60, what="fleet serve to stop")
    server = done["server"]
    assert server.returncode == 0, server.stderr
    assert server.peak_rss_bytes < CHILD_RSS_CAP, server.peak_rss_bytes / MiB
    print(f"fleet serve after 6 sparse pushes: peak RSS {server.peak_rss_bytes / MiB:.0f} MiB")
