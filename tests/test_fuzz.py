"""Fuzzing what the agent and the controller take in from outside, with hypothesis.

Targets, each fed to the real handler in this process:

* agent: the desired state (``AgentService._desired_message``), the fleet keyring
  (``AgentService._keyring_message``), bundle bytes on the install path (``local.install``);
* controller: status, state/reported, telemetry (one point and batches) and events through
  ``MessageIntake.message``, and bundle bytes through ``FleetController.push``;
* the contract itself: ``read_bundle`` on mutated bundles.

Payloads start as valid documents drawn from each schema, then are mutated: a field dropped
or retyped, a wrong ``schema_version``, huge numbers, NaN and Infinity, deep nesting, bytes
that are not UTF-8, truncation, garbage. Bundles get bit flips, truncation, members renamed to
absolute or ``..`` paths, links and special files, duplicated or dropped members, manifest
edits (unsigned, re-signed with the trusted key, signed by a stranger) and broken signatures.

Every example asserts: no exception escapes but the project's own (``EdgefleetError``, with a
message), a rejection is logged with its reason, and a rejection changes nothing (the agent's
desired state, trusted keys and active slot, which still serves; the controller's registry,
telemetry, models and artifact folder). Each target runs ``EDGEFLEET_FUZZ_EXAMPLES`` (1,000
by default) derandomized examples, so CI runs the same ones every time.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.files import read_int
from edgefleet.agent.protocol.keyring import KEYRING_FILE, build_keyring, parse_keyring
from edgefleet.agent.protocol.payloads import DesiredModels, DesiredState, decode_desired
from edgefleet.agent.protocol.schema import NAME_PATTERN
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from edgefleet.agent.protocol.topics import Leaf, check_id, keyring_topic
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.agent.update import local
from edgefleet.agent.update.slots import SlotStore
from edgefleet.fleet import dashboard
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.ingest import UPDATE_STATES
from edgefleet.fleet.store import Store, open_store
from tests import tamper
from tests.conftest import Keys
from tests.models import load_digits

EXAMPLES = int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# --- logs ---------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def logged(*names: str) -> Iterator[list[logging.LogRecord]]:
    """Every record the named loggers write inside the block (INFO and up)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _said(records: list[logging.LogRecord], level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= level]


def _tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Records with an exception attached: an exception someone caught as a surprise."""
    return [r.getMessage() for r in records if r.exc_info]


# --- JSON documents and their mutations ---------------------------------------------------

NAMES = st.from_regex(NAME_PATTERN.replace("{0,63}", "{0,15}"), fullmatch=True)
SEMVER = st.builds("{}.{}.{}".format, *(st.integers(0, 40) for _ in range(3)))
SHA256 = st.text("0123456789abcdef", min_size=64, max_size=64)
TEXT = st.text(max_size=24)
LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT)
ANY_JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(TEXT, inner, max_size=3), max_leaves=10)
NUMBER = st.floats(0, 1e4, allow_nan=False)
COUNT = st.integers(0, 10**6)

URL = st.builds("{}://{}".format, st.sampled_from(["http", "https"]),
                st.text("abcdefghijklmnopqrstuvwxyz0123456789.-:/%?=&", min_size=1, max_size=50))
BUNDLE_REF = st.fixed_dictionaries({"schema_version": st.just(1), "name": NAMES,
                                    "version": SEMVER, "sha256": SHA256})
DESIRED = st.fixed_dictionaries(
    {"schema_version": st.just(1), "name": NAMES, "version": SEMVER, "sha256": SHA256,
     "url": URL, "size": st.integers(0, 2**40)},
    optional={"rollout": st.none() | NAMES, "action": st.sampled_from(["install", "commit",
                                                                      "rollback"]),
              "auto_commit": st.booleans(), "issued_at": st.integers(0, 2**50)})
# a device's figures as the telemetry schema takes them (agent.protocol.telemetry_schema:
# null or absent is "not reported"); figures out of it are refused whole on arrival, see
# tests/test_hostile_controller.py
STATS = st.fixed_dictionaries(
    {"inferences": COUNT | st.none(), "errors": COUNT | st.none()},
    optional={"latency_p50_ms": NUMBER | st.none(), "latency_p95_ms": NUMBER | st.none(),
              "agreement": st.fixed_dictionaries({"top1": st.floats(0, 1) | st.none(),
                                                  "samples": COUNT | st.none()})})
POINT = st.fixed_dictionaries({
    "ts": st.integers(0, 2**45),
    "values": st.fixed_dictionaries(
        {"schema_version": st.just(1), "seq": COUNT},
        optional={"model": NAMES, "model_version": SEMVER, "inferences": COUNT,
                  "latency_p95_ms": NUMBER, "cpu_percent": NUMBER | st.none(),
                  "versions": st.dictionaries(SEMVER, STATS, max_size=2)})})
EVENT = st.fixed_dictionaries(
    {"schema_version": st.just(1), "seq": COUNT, "ts": st.integers(0, 2**45), "kind": TEXT},
    optional={"state": st.none() | TEXT, "detail": TEXT, "bundle": st.none() | BUNDLE_REF})


def reported(device: str) -> st.SearchStrategy[dict[str, Any]]:
    update = st.fixed_dictionaries({}, optional={
        "state": st.sampled_from(sorted(UPDATE_STATES)), "target": st.none() | BUNDLE_REF,
        "detail": TEXT, "since": st.integers(0, 2**45)})
    return st.fixed_dictionaries(  # a device reports the fleet it belongs to
        {"schema_version": st.just(1), "fleet": st.just("fuzz"), "device": st.just(device),
         "agent_version": SEMVER},
        optional={"active": st.none() | BUNDLE_REF, "previous": st.none() | BUNDLE_REF,
                  "slot": st.sampled_from([None, "a", "b"]), "update": update,
                  "runtimes": st.dictionaries(NAMES, SEMVER, max_size=2),
                  "profile": st.none() | NAMES, "serving": st.booleans(),
                  "ts": st.integers(0, 2**45)})


BAD_VERSIONS = [0, 2, 99, -1, "1", None, True, 1.5, 2**64, [1], {"v": 1}]
LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"9" * 5000,
            b"123456789012345678901234567890", b"-0", b"1e-400", b"0.0000001"]
_SENTINEL = "\u2063edgefleet-fuzz\u2063"
MUTATIONS = ["none", "none", "drop", "retype", "version", "literal", "extra", "nest",
             "insert", "flip", "truncate", "garbage", "other", "utf16"]


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def _containers(doc: Any) -> list[Any]:
    """Every non-empty dict and list inside ``doc`` (itself first)."""
    found, todo = [], [doc]
    while todo:
        node = todo.pop(0)
        if isinstance(node, dict | list) and node:
            found.append(node)
            todo.extend(node.values() if isinstance(node, dict) else node)
    return found


def _set_versions(doc: Any, value: Any) -> None:
    for node in _containers(doc):
        if isinstance(node, dict) and "schema_version" in node:
            node["schema_version"] = value


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> tuple[bytes, bool]:
    """(payload, untouched): a valid document, or that document broken in one way."""
    doc = copy.deepcopy(draw(valid))
    how = draw(st.sampled_from(MUTATIONS))
    containers = _containers(doc)
    node = draw(st.sampled_from(containers)) if containers else None
    key: Any = None
    if node is not None:
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict)
                                   else list(range(len(node)))))
    raw = _dumps(doc)
    if how == "none" or (node is None and how in ("drop", "retype", "literal", "extra")):
        return raw, how == "none"
    if how == "drop" and node is not None:
        del node[key]
    elif how == "retype" and node is not None:
        node[key] = draw(ANY_JSON)
    elif how == "literal" and node is not None:
        node[key] = _SENTINEL
        return _dumps(doc).replace(json.dumps(_SENTINEL).encode(),
                                   draw(st.sampled_from(LITERALS))), False
    elif how == "extra" and node is not None:
        if isinstance(node, dict):
            node[draw(TEXT)] = draw(ANY_JSON)
        else:
            node.append(draw(ANY_JSON))
    elif how == "version":
        _set_versions(doc, draw(st.sampled_from(BAD_VERSIONS)))
    elif how == "nest":
        depth = draw(st.sampled_from([2, 50, 998, 1000, 3000, 100_000]))
        opening = draw(st.sampled_from([b"[", b'{"a":']))
        closing = b"]" if opening == b"[" else b"}"
        return opening * depth + raw + closing * depth, False
    elif how == "insert":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=6)) + raw[at:], False
    elif how == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([raw[at] ^ (1 << draw(st.integers(0, 7)))]) + raw[at + 1:], False
    elif how == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))], False
    elif how == "garbage":
        return draw(st.binary(max_size=200)), False
    elif how == "other":
        return _dumps(draw(ANY_JSON)), False
    elif how == "utf16":
        return raw.decode().encode(draw(st.sampled_from(["utf-16", "utf-32", "latin-1"]))), False
    return _dumps(doc), False


# --- the agent ----------------------------------------------------------------------------

@dataclass
class Pool:
    """Keys a keyring may list or be signed by; ``root`` is the one the device trusts."""

    keys: dict[str, SigningKey]

    def public(self, name: str) -> Any:
        return self.keys[name].private_key.public_key()

    def trusted(self, *names: str) -> TrustedKeys:
        return TrustedKeys({self.keys[n].key_id: self.public(n) for n in names})


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    folder = tmp_path_factory.mktemp("fuzz-keys")
    return Pool({name: SigningKey.load(generate_keypair(folder, name)[0])
                  for name in ("root", "next", "spare", "thief")})


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """Where the handlers under fuzz keep their files: tmpfs when there is one, because every
    rejection writes (an event counter, an audit row) with fsync, and durability is not what
    these tests are about."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="edgefleet-fuzz-",
                                   dir=shm if shm.is_dir() and os.access(shm, os.W_OK)
                                   else None))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def idle_service(scratch: Path, pool: Pool) -> AgentService:
    """An agent service as ``agent run`` builds it, its handlers called directly (no broker)."""
    return AgentService(ServiceConfig(fleet="fuzz", device_id="pi-1", data_dir=scratch / "agent"),
                        Agent(pool.trusted("root")))


def test_the_agent_takes_any_desired_state_payload(idle_service: AgentService) -> None:
    service = idle_service
    topic, counter = service.topic(Leaf.DESIRED), service.config.data_dir / "events.seq"

    @FUZZ
    @given(message=mutated(DESIRED))
    def check(message: tuple[bytes, bool]) -> None:
        payload, untouched = message
        before, seq = service.desired, read_int(counter)
        with logged("edgefleet.agent.service") as records:
            service._desired_message(topic, payload)
        try:
            expected: DesiredState | DesiredModels | None = decode_desired(payload)
        except EdgefleetError:
            expected = None
        assert not _tracebacks(records)
        if not payload:  # a cleared retained message: nothing to do, nothing to say
            assert service.desired is before and not _said(records)
        elif expected is None:
            assert service.desired is before, "a refused desired state replaced the last one"
            said = _said(records)
            assert said and "dropped malformed desired state" in said[0]
            assert said[0].split(": ", 1)[1], "the reason is missing"
            assert read_int(counter) == seq + 1, "no payload_rejected event"
        else:
            assert service.desired == expected and not _said(records)
        assert expected is not None or not untouched, "a valid desired state was refused"

    check()


@st.composite
def keyring_docs(draw: st.DrawFn, pool: Pool) -> dict[str, Any]:
    names = sorted(pool.keys)
    members = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    signers = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    if not set(signers) & set(members):
        signers.append(members[0])
    raw = build_keyring([(n, pool.public(n)) for n in members], draw(st.integers(1, 6)),
                        [pool.keys[n] for n in signers], issued="2025-01-01T00:00:00Z")
    doc: dict[str, Any] = json.loads(raw)
    return doc


def _signed_by_one_of(payload: bytes, trusted: TrustedKeys) -> bool:
    """Independently of the keyring module: one signature verifies with a trusted key."""
    doc = json.loads(payload)
    body = json.dumps(doc["keyring"], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()
    keys = trusted.public_keys()
    for signature in doc["signatures"]:
        key = keys.get(signature["key_id"])
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(signature["sig"]), body)
            return True
        except InvalidSignature:
            continue
    return False


def _body(payload: bytes) -> bytes | None:
    try:
        return parse_keyring(payload).signed_bytes
    except EdgefleetError:
        return None


def test_the_agent_takes_any_keyring_payload(idle_service: AgentService, pool: Pool) -> None:
    service = idle_service
    stored = service.config.data_dir / KEYRING_FILE
    topic = keyring_topic("fuzz")
    held_raw = build_keyring([("root", pool.public("root")), ("next", pool.public("next"))],
                             3, [pool.keys["root"]], issued="2025-01-01T00:00:00Z")
    held_body = parse_keyring(held_raw).signed_bytes

    @FUZZ
    @given(message=mutated(keyring_docs(pool)), held=st.booleans())
    def check(message: tuple[bytes, bool], held: bool) -> None:
        payload, untouched = message
        if held:
            stored.write_bytes(held_raw)
            service.keyring = parse_keyring(held_raw)
            service.models.trust(service.keyring.trusted())
        else:
            stored.unlink(missing_ok=True)
            service.keyring = None
            service.models.trust(pool.trusted("root"))
        trusted, serial = service.models.trusted, 3 if held else 0
        with logged("edgefleet.agent.service") as records:
            service._keyring_message(topic, payload)
        assert not _tracebacks(records)
        if service.models.trusted is not trusted:
            keyring = service.keyring
            assert keyring is not None and keyring.serial > serial
            assert _signed_by_one_of(payload, trusted)
            assert stored.read_bytes() == payload
            assert service.models.trusted.key_ids == keyring.key_ids
        elif not payload:  # a cleared retained message: the keyring held stays
            assert not _said(records) and stored.exists() == held
        elif not (held and _body(payload) == held_body):  # the held keyring: nothing to do
            said = _said(records)
            assert said and "refused the keyring" in said[0], said
            assert said[0].split(": ", 1)[1], "the reason is missing"
            assert stored.exists() == held and (not held or stored.read_bytes() == held_raw)
        if untouched:
            doc = json.loads(payload)
            expect = doc["keyring"]["serial"] > serial and _signed_by_one_of(payload, trusted)
            assert (service.models.trusted is not trusted) == expect or (
                held and _body(payload) == held_body)

    check()


# --- bundles --------------------------------------------------------------------------------

HOSTILE_NAMES = ["/etc/passwd", "../x", "a/../../x", "../../../../tmp/edgefleet-fuzz",
                 "C:\\x", "\\x", "..\\..\\x", "x/../../y", "./manifest.json", "sub/model.tflite",
                 "a" * 300, "model.tflite/..", ".", "..", "/", "manifest.json "]


@dataclass(frozen=True)
class Original:
    raw: bytes
    members: dict[str, bytes]
    signer: SigningKey
    stranger: SigningKey


def _pack(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


@st.composite
def mutated_bundles(draw: st.DrawFn, original: Original) -> tuple[bytes, str]:
    """(bundle bytes, how): the original bundle broken in one way."""
    how = draw(st.sampled_from(["none", "flip", "truncate", "append", "rename", "link",
                                "special", "duplicate", "drop", "extra", "many", "manifest",
                                "resign", "stranger", "signature", "garbage"]))
    raw, members = original.raw, original.members
    names = sorted(members)
    if how == "flip":
        out = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(out), how
    if how == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))], how
    if how == "append":
        return raw + draw(st.binary(min_size=1, max_size=2048)), how
    if how == "garbage":
        return draw(st.binary(max_size=4096)), how
    entries = [_file(name, data) for name, data in members.items()]
    if how == "rename":
        index = draw(st.integers(0, len(entries) - 1))
        entries[index][0].name = draw(st.sampled_from(HOSTILE_NAMES) | st.text(min_size=1,
                                                                                max_size=40))
    elif how in ("link", "special"):
        info = tarfile.TarInfo(draw(st.sampled_from([*names, "evil"])))
        info.type = draw(st.sampled_from([tarfile.SYMTYPE, tarfile.LNKTYPE]) if how == "link"
                         else st.sampled_from([tarfile.DIRTYPE, tarfile.FIFOTYPE,
                                               tarfile.CHRTYPE, tarfile.BLKTYPE]))
        info.linkname = draw(st.sampled_from(["/etc/passwd", "../../x", "manifest.json"]))
        entries = [e for e in entries if e[0].name != info.name] + [(info, b"")]
    elif how == "duplicate":
        entries.append(_file(draw(st.sampled_from(names)), draw(st.binary(max_size=64))))
    elif how == "drop":
        entries.pop(draw(st.integers(0, len(entries) - 1)))
    elif how == "extra":
        entries.append(_file(draw(NAMES), draw(st.binary(max_size=64))))
    elif how == "many":
        entries += [_file(f"x{i}", b"") for i in range(draw(st.integers(10, 40)))]
    elif how in ("manifest", "resign", "stranger"):
        manifest, _ = draw(mutated(st.just(json.loads(members["manifest.json"]))))
        entries = [_file(n, manifest if n == "manifest.json" else d) for n, d in members.items()]
        signer = {"resign": original.signer, "stranger": original.stranger}.get(how)
        if signer is not None:
            entries = [_file(n, signer.sign(manifest) if n == "manifest.sig" else d)
                       for n, d in ((e[0].name, e[1]) for e in entries)]
    elif how == "signature":
        signature, _ = draw(mutated(st.just(json.loads(members["manifest.sig"]))))
        entries = [_file(n, signature if n == "manifest.sig" else d) for n, d in members.items()]
    try:
        return _pack(entries), how
    except (ValueError, UnicodeError, tarfile.TarError):
        assume(False)  # a name tarfile cannot even write
        raise


@pytest.fixture(scope="module")
def original(digits_bundles: dict[str, Path], signing_keys: Keys, pool: Pool) -> Original:
    raw = digits_bundles["tflite"].read_bytes()
    return Original(raw, tamper.members(raw), signing_keys.signer, pool.keys["thief"])


def _refused(exc: EdgefleetError) -> None:
    assert exc.message.strip(), f"{type(exc).__name__} without a message"


def test_read_bundle_refuses_every_mutation_that_is_not_the_signed_bundle(
        original: Original, signing_keys: Keys) -> None:
    trusted = signing_keys.trusted
    expected = read_bundle(original.raw, trusted)

    @FUZZ
    @given(case=mutated_bundles(original))
    def check(case: tuple[bytes, str]) -> None:
        data, how = case
        try:
            bundle = read_bundle(data, trusted)
        except EdgefleetError as exc:
            _refused(exc)
            return
        if how != "resign":  # only the trusted key can make another valid bundle
            assert bundle.manifest_bytes == expected.manifest_bytes
            assert dict(bundle.files) == dict(expected.files)

    check()


@pytest.fixture()
def controller(scratch: Path, request: pytest.FixtureRequest,
               signing_keys: Keys) -> Iterator[FleetController]:
    """A controller as ``fleet serve`` builds it (not started: its handlers are called
    directly), with the dashboard's event journal listening as the API server attaches it."""
    root = scratch / request.node.name
    root.mkdir()
    store: Store = open_store(f"sqlite:///{root / 'fleet.db'}")
    config = ControllerConfig(fleet="fuzz", broker_url="mqtt://127.0.0.1:1",
                              data_dir=root / "controller",
                              public_url="http://127.0.0.1:1", trusted=signing_keys.trusted)
    ctl = FleetController(config, store, clock=lambda: 1_000_000)
    dashboard.attach(ctl)
    yield ctl
    store.close()


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def test_the_controller_push_stores_nothing_it_refuses(
        controller: FleetController, original: Original, signing_keys: Keys) -> None:
    artifacts = controller.artifacts

    @FUZZ
    @given(case=mutated_bundles(original))
    def check(case: tuple[bytes, str]) -> None:
        data, how = case
        before, models = _listing(artifacts), controller.store.models()
        try:
            model, _ = controller.push(data, "fuzz")
        except EdgefleetError as exc:
            _refused(exc)
            assert _listing(artifacts) == before, f"a refused push ({how}) left a file"
            assert controller.store.models() == models
            return
        stored = read_bundle(artifacts / f"{model.sha256}.efb", signing_keys.trusted)
        assert stored.sha256 == model.sha256
        assert [p.name for p in artifacts.iterdir() if p.name.startswith(".")] == []

    check()


@pytest.fixture()
def flashed(scratch: Path, original: Original, signing_keys: Keys) -> tuple[Agent, Path]:
    """A device that runs the original bundle, installed the way ``agent install`` does."""
    agent = Agent(signing_keys.trusted)
    data = scratch / "device"
    source = scratch / "original.efb"
    source.write_bytes(original.raw)
    journal = local.install(agent, data, source)
    assert journal.state.value == "COMMITTED"
    return agent, data


def test_the_agent_install_path_refuses_mutated_bundles_and_keeps_serving(
        flashed: tuple[Agent, Path], original: Original, scratch: Path) -> None:
    agent, data = flashed
    sample = load_digits().x_test[:1]
    reference = agent.predict(sample)
    candidate = scratch / "candidate.efb"

    @FUZZ
    @given(case=mutated_bundles(original))
    def check(case: tuple[bytes, str]) -> None:
        data_bytes, _how = case
        candidate.write_bytes(data_bytes)
        pointer, model = SlotStore(data).pointer(), agent.model
        try:
            journal = local.install(agent, data, candidate)
        except EdgefleetError as exc:
            _refused(exc)
            assert SlotStore(data).pointer() == pointer and agent.model is model
        else:
            assert journal.state.value in ("COMMITTED", "FAILED", "ROLLED_BACK"), journal
        assert agent.model is not None
        outputs = agent.predict(sample)
        if agent.model is model:
            for name, value in reference.items():
                np.testing.assert_allclose(outputs[name], value, rtol=1e-5, atol=1e-5)

    check()


# --- the controller's ingest ------------------------------------------------------------------

DEVICE_IDS = st.sampled_from(["cam-1", "cam-2"]) | NAMES | st.sampled_from(
    ["_fleet", "a b", "é", "+", "#", "", "x" * 65, "..", "-x"]) | st.text(max_size=70)


@st.composite
def controller_messages(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """(topic, payload, valid): what a device, or anyone with broker access, may publish."""
    device = draw(DEVICE_IDS)
    leaf = draw(st.sampled_from(["status", "state/reported", "telemetry", "telemetry",
                                 "events", "state/desired", "nonsense"]))
    topic = draw(st.just(f"edgefleet/v1/fuzz/{device}/{leaf}")
                 | st.text(max_size=80).map(lambda t: f"edgefleet/v1/fuzz/{t}"))
    if leaf == "status":
        payload = draw(st.sampled_from([b"online", b"offline"]) | st.binary(max_size=16))
        untouched = payload in (b"online", b"offline")
    elif leaf == "state/reported":
        payload, untouched = draw(mutated(reported(device)))
    elif leaf == "telemetry":
        payload, untouched = draw(mutated(POINT | st.lists(POINT, min_size=1, max_size=4)))
    elif leaf == "events":
        payload, untouched = draw(mutated(EVENT))
    else:
        payload, untouched = draw(st.binary(max_size=64)), False
    ok_id = _is_id(device) and topic == f"edgefleet/v1/fuzz/{device}/{leaf}"
    return topic, payload, untouched and ok_id and leaf not in ("state/desired", "nonsense")


def _foreign_level(topic: str) -> bool:
    """The device level of the topic is no device id (e.g. "_fleet", "a b"): refuse it."""
    parts = topic.split("/")
    return len(parts) >= 5 and not _is_id(parts[3])


def _is_id(device: str) -> bool:
    try:
        check_id(device)
    except ValueError:
        return False
    return True


def _ingest_state(ctl: FleetController) -> tuple[Any, ...]:
    return ([d.as_dict() for d in ctl.registry.all()], ctl.telemetry.points,
            json.dumps(ctl.telemetry.latest, sort_keys=True, default=str))


def test_the_controller_ingest_takes_any_message(controller: FleetController) -> None:
    ctl = controller
    journal = dashboard.attach(ctl)

    @FUZZ
    @given(message=controller_messages())
    def check(message: tuple[str, bytes, bool]) -> None:
        topic, payload, valid = message
        before, rejected = _ingest_state(ctl), ctl.rejected
        events_before = len(journal.recent(10**6))
        with logged("edgefleet.fleet.controller", "edgefleet.fleet.dashboard._journal") as records:
            ctl.intake.message(topic, payload)
        assert not _tracebacks(records), _tracebacks(records)
        if ctl.rejected > rejected:
            assert ctl.rejected == rejected + 1
            assert _ingest_state(ctl) == before, "a refused message changed the registry"
            said = _said(records)
            assert said and "dropped a message on" in said[-1]
            assert said[-1].split(": ", 1)[1], "the reason is missing"
        if valid:
            assert ctl.rejected == rejected, f"a valid message was refused: {_said(records)}"
        if _foreign_level(topic):
            assert ctl.rejected == rejected + 1, "a topic level that is no device id got in"
        if topic.endswith("/events") and ctl.rejected == rejected:
            recorded = len(journal.recent(10**6)) > events_before
            assert recorded or _said(records, logging.INFO), "an event vanished unlogged"

    check()


@pytest.mark.parametrize("url", ["/etc/passwd", "file:///etc/passwd", "ftp://host/x.efb",
                                 "../slots/a/bundle.efb", "http://", "http://host/a b"])
def test_a_desired_state_that_points_at_anything_but_http_is_refused(url: str) -> None:
    from edgefleet.agent.protocol.payloads import DesiredState, decode

    body = {"schema_version": 1, "name": "digits", "version": "1.0.0", "sha256": "0" * 64,
            "url": url, "size": 1}
    with pytest.raises(EdgefleetError, match="url"):
        decode(DesiredState, json.dumps(body).encode())
    body["url"] = "https://fleet.example/bundles/x.efb"
    assert decode(DesiredState, json.dumps(body).encode()).url == body["url"]
