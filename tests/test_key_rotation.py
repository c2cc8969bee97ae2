"""Key rotation: the signed keyring (pure checks), the ``edgefleet keys rotate/retire`` commands,
and a whole rotation on a real fleet: a controller and a real agent on a private Mosquitto.

The root of trust is the key a device was provisioned with (``signing_keys``). A keyring is
accepted only when a key trusted *now* signed it and its serial is newer than the one held.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from edgefleet.agent.models import ModelSet
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.errors import EdgefleetError, UnknownKeyError
from edgefleet.agent.protocol.keyring import (
    KEYRING_FILE,
    KeyringError,
    StaleKeyringError,
    accept_keyring,
    build_keyring,
    parse_keyring,
    trust_at_start,
)
from edgefleet.agent.protocol.payloads import DesiredState, encode
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from edgefleet.agent.protocol.topics import Leaf, device_topic, keyring_topic
from edgefleet.agent.protocol.update_state import UpdateState
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.agent.update import local
from edgefleet.cli import app
from edgefleet.fleet.errors import ConflictError
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import TOKEN, Fleet, wait_until
from tests.http_files import FileServer
from tests.models import TrainedModels

runner = CliRunner()


def _key(folder: Path, name: str) -> SigningKey:
    return SigningKey.load(generate_keypair(folder, name)[0])


def _pub(key: SigningKey) -> Any:
    return key.private_key.public_key()


def _only(key: SigningKey) -> TrustedKeys:
    return TrustedKeys({key.key_id: _pub(key)})


@pytest.fixture()
def two(tmp_path: Path) -> tuple[SigningKey, SigningKey]:
    return _key(tmp_path, "old"), _key(tmp_path, "new")


# --- the keyring document -----------------------------------------------------------------

def test_a_keyring_signed_by_a_trusted_key_is_accepted_and_trusts_exactly_its_keys(
        two: tuple[SigningKey, SigningKey]) -> None:
    old, new = two
    raw = build_keyring([("old", _pub(old)), ("new", _pub(new))], 1, [old])
    keyring = accept_keyring(raw, _only(old), None)
    assert keyring is not None and keyring.serial == 1
    assert keyring.trusted().key_ids == sorted([old.key_id, new.key_id])
    assert keyring.signed_by == [old.key_id]


def test_a_keyring_signed_by_a_key_not_trusted_here_is_refused(
        two: tuple[SigningKey, SigningKey], tmp_path: Path) -> None:
    old, _new = two
    thief = _key(tmp_path / "thief", "thief")
    raw = build_keyring([("thief", _pub(thief))], 9, [thief])
    with pytest.raises(KeyringError) as refused:
        accept_keyring(raw, _only(old), None)
    assert thief.key_id in refused.value.message and old.key_id in refused.value.message


def test_an_older_serial_is_refused_as_a_replay_and_the_held_one_again_changes_nothing(
        two: tuple[SigningKey, SigningKey]) -> None:
    old, new = two
    first = build_keyring([("old", _pub(old)), ("new", _pub(new))], 1, [old])
    second = build_keyring([("new", _pub(new))], 2, [new, old])
    held = accept_keyring(second, _only(old), accept_keyring(first, _only(old), None))
    assert held is not None and held.serial == 2
    assert accept_keyring(second, held.trusted(), held) is None
    both = TrustedKeys({old.key_id: _pub(old), new.key_id: _pub(new)})
    with pytest.raises(StaleKeyringError, match="older"):
        accept_keyring(first, both, held)
    same_serial = build_keyring([("new", _pub(new)), ("old", _pub(old))], 2, [new])
    with pytest.raises(StaleKeyringError, match="same serial"):
        accept_keyring(same_serial, held.trusted(), held)


def test_a_keyring_altered_after_signing_is_refused(two: tuple[SigningKey, SigningKey],
                                                    tmp_path: Path) -> None:
    old, _new = two
    doc = json.loads(build_keyring([("old", _pub(old))], 1, [old]))
    thief = _key(tmp_path / "thief", "thief")
    doc["keyring"]["keys"].append(json.loads(build_keyring(
        [("thief", _pub(thief))], 1, [thief]))["keyring"]["keys"][0])
    with pytest.raises(KeyringError, match="does not verify"):
        accept_keyring(json.dumps(doc).encode(), _only(old), None)
    doc = json.loads(build_keyring([("old", _pub(old))], 1, [old]))
    doc["keyring"]["serial"] = 1000
    with pytest.raises(KeyringError, match="does not verify"):
        parse_keyring(json.dumps(doc).encode())


def test_a_keyring_must_be_signed_by_one_of_its_own_keys(
        two: tuple[SigningKey, SigningKey]) -> None:
    old, new = two
    with pytest.raises(KeyringError, match="not signed by any key it lists"):
        build_keyring([("new", _pub(new))], 2, [old])


def test_a_key_id_that_is_not_its_keys_id_is_refused(two: tuple[SigningKey, SigningKey]) -> None:
    old, new = two
    doc = json.loads(build_keyring([("old", _pub(old)), ("new", _pub(new))], 1, [old]))
    entries = doc["keyring"]["keys"]
    entries[0]["public_key"], entries[1]["public_key"] = (entries[1]["public_key"],
                                                          entries[0]["public_key"])
    with pytest.raises(KeyringError, match="holds the public key of"):
        parse_keyring(json.dumps(doc).encode())


def test_the_stored_keyring_replaces_the_provisioned_keys_at_start(
        two: tuple[SigningKey, SigningKey], tmp_path: Path) -> None:
    old, new = two
    data = tmp_path / "device"
    data.mkdir()
    assert trust_at_start(_only(old), data).key_ids == [old.key_id]
    (data / KEYRING_FILE).write_bytes(build_keyring([("new", _pub(new))], 2, [new, old]))
    assert trust_at_start(_only(old), data).key_ids == [new.key_id]
    (data / KEYRING_FILE).write_bytes(b'{"schema_version": 1, "keyring": {}')
    with pytest.raises(KeyringError, match="damaged") as damaged:
        trust_at_start(_only(old), data)
    assert "remove it" in damaged.value.hint


# --- edgefleet keys rotate / retire ---------------------------------------------------------

def _cli(*args: str) -> Result:
    return runner.invoke(app, list(args), catch_exceptions=False)


def said(result: Result) -> str:
    """Everything a command printed, words only (rich wraps lines to the terminal)."""
    return " ".join((result.stdout + result.stderr).split())


def _keys_dir(tmp_path: Path, root: Keys) -> Path:
    folder = tmp_path / "keys"
    folder.mkdir()
    shutil.copy(root.secret, folder / "signing.key")
    shutil.copy(root.public, folder / "signing.pub")
    return folder


def test_rotate_then_retire_write_keyrings_that_a_device_which_missed_the_rotation_follows(
        tmp_path: Path, signing_keys: Keys) -> None:
    keys = _keys_dir(tmp_path, signing_keys)
    root = signing_keys.signer.key_id
    rotated = _cli("keys", "rotate", "--keys", str(keys), "--name", "next", "--json")
    assert rotated.exit_code == 0, rotated.output
    first = json.loads(rotated.output)
    new_id = SigningKey.load(keys / "next.key").key_id
    assert first["serial"] == 1 and first["signed_by"] == [root]
    assert {k["key_id"] for k in first["keys"]} == {root, new_id}

    retired = _cli("keys", "retire", "signing", "--keys", str(keys), "--json")
    assert retired.exit_code == 0, retired.output
    second = json.loads(retired.output)
    assert second["serial"] == 2 and [k["key_id"] for k in second["keys"]] == [new_id]
    assert set(second["signed_by"]) == {root, new_id}
    # a device still on the provisioned key alone (offline during the rotation) follows
    kept = accept_keyring((keys / KEYRING_FILE).read_bytes(), signing_keys.trusted, None)
    assert kept is not None and kept.key_ids == [new_id]

    last = _cli("keys", "retire", new_id, "--keys", str(keys))
    assert last.exit_code == 2 and "trusting no key" in said(last)
    unknown = _cli("keys", "retire", "nope", "--keys", str(keys))
    assert unknown.exit_code == 2 and "not in the keyring" in said(unknown)
    assert parse_keyring((keys / KEYRING_FILE).read_bytes()).serial == 2


def test_rotate_refuses_without_a_current_private_key(tmp_path: Path,
                                                      signing_keys: Keys) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(signing_keys.public, keys / "signing.pub")
    result = _cli("keys", "rotate", "--keys", str(keys))
    assert result.exit_code == 2 and "no private key" in said(result)
    assert not (keys / KEYRING_FILE).exists() and not list(keys.glob("*.key"))


# --- a whole rotation on a real fleet -------------------------------------------------------

def _events(sub: Subscriber, kind: str) -> list[dict[str, Any]]:
    return [e for m in sub.on("/events") if (e := m.json())["kind"] == kind]


def _device(fleet: Fleet, device: str) -> dict[str, Any]:
    found: dict[str, Any] = next(d for d in fleet.client().get("/api/v1/devices")
                                 if d["id"] == device)
    return found


def _rolled_out(fleet: Fleet, model: str, device: str) -> dict[str, Any]:
    rollout = fleet.client().post("/api/v1/rollouts", {
        "model": model, "selectors": [f"device:{device}"], "waves": ["100%"],
        "device_timeout_s": 60, "soak_s": 0.3})
    done: dict[str, Any] = wait_until(
        lambda: (r := fleet.client().get(f"/api/v1/rollouts/{rollout['id']}"))["state"]
        in ("SUCCEEDED", "ABORTED", "ROLLED_BACK") and r, 90, what=f"rollout of {model}")
    return done


def test_a_fleet_rotates_its_signing_key_without_touching_the_device(
        fleet: Fleet, digits_models: TrainedModels, digits_bundles: dict[str, Path],
        signing_keys: Keys, tmp_path: Path) -> None:
    keys = _keys_dir(tmp_path, signing_keys)
    client = fleet.start_controller()
    service = fleet.add_agent("cam-0", digits_bundles["tflite"], traffic=False)
    data = fleet.root / "devices" / "cam-0"
    events = Subscriber(fleet.broker_url, [device_topic(fleet.name, "cam-0", Leaf.EVENTS)])
    publish = ["fleet", "keyring", "publish", str(keys / KEYRING_FILE), "--controller",
               client.url, "--token", TOKEN, "--json"]

    # 1. rotate: the new key is added, signed by the provisioned one
    assert _cli("keys", "rotate", "--keys", str(keys), "--name", "next").exit_code == 0
    new = Keys(keys / "next.key", keys / "next.pub")
    published = _cli(*publish)
    assert published.exit_code == 0, published.output
    assert json.loads(published.output)["published"] is True
    wait_until(lambda: service.keyring is not None and service.keyring.serial == 1, 20,
               what="the agent applies keyring 1")
    assert new.signer.key_id in service.agent.trusted
    assert (data / KEYRING_FILE).read_bytes() == (keys / KEYRING_FILE).read_bytes()
    assert wait_until(lambda: _events(events, "keyring_applied"), 10, what="event")

    # 2. a bundle signed with the new key is pushed and rolled out
    v2 = make_bundle(digits_models.onnx, tmp_path / "v2.efb", new, "2.0.0")
    client.upload("/api/v1/models", v2.read_bytes())

    # retiring the old key now would strand the device (its bundle is signed by it)
    assert _cli("keys", "retire", "signing", "--keys", str(keys)).exit_code == 0
    with pytest.raises(ConflictError, match="cam-0"):
        client.upload("/api/v1/keyring", (keys / KEYRING_FILE).read_bytes())

    assert _rolled_out(fleet, "digits:2.0.0", "cam-0")["state"] == "SUCCEEDED"
    assert wait_until(lambda: (_device(fleet, "cam-0")["active"] or {}).get("version")
                      == "2.0.0", 20, what="cam-0 reports 2.0.0")

    # 3. retire the old key: the device drops it
    published = _cli(*publish)
    assert published.exit_code == 0, published.output
    wait_until(lambda: service.keyring is not None and service.keyring.serial == 2, 20,
               what="the agent applies keyring 2")
    assert service.agent.trusted.key_ids == [new.signer.key_id]

    # 4. a bundle signed with the old key: refused by the controller, nothing stored
    artifacts = sorted((fleet.root / "controller" / "bundles").iterdir())
    v3 = make_bundle(digits_models.tflite, tmp_path / "v3.efb", signing_keys, "3.0.0")
    with pytest.raises(EdgefleetError, match="unknown key"):
        client.upload("/api/v1/models", v3.read_bytes())
    assert sorted((fleet.root / "controller" / "bundles").iterdir()) == artifacts

    # ... and by the agent, even when someone with broker access points it there
    www = FileServer(tmp_path)
    try:
        sha256 = read_bundle(v3, signing_keys.trusted).sha256
        desired = DesiredState(name="digits", version="3.0.0", sha256=sha256,
                               url=www.url("v3.efb"), size=v3.stat().st_size)
        events.publish(device_topic(fleet.name, "cam-0", Leaf.DESIRED), encode(desired),
                       retain=False)
        journal = wait_until(lambda: service.updates and service.updates.journal.state
                             == UpdateState.FAILED and service.updates.journal, 60,
                             what="the agent refuses the old-key bundle")
        assert "unknown key" in journal.detail
        assert service.agent.model is not None and service.agent.model.version == "2.0.0"
    finally:
        www.stop()

    # 5. an old keyring replayed on the topic is refused, with the reason reported
    events.publish(keyring_topic(fleet.name), json.dumps(json.loads(
        _first_keyring(signing_keys, new))).encode(), retain=False)
    rejected = wait_until(lambda: _events(events, "keyring_rejected"), 10,
                          what="keyring_rejected event")
    assert "none of which is trusted here" in rejected[0]["detail"]
    assert service.agent.trusted.key_ids == [new.signer.key_id]

    # 6. after a restart the rotated keyring is still in force
    service.stop()
    del fleet.agents["cam-0"]
    install = _cli("agent", "install", str(v3), "--data-dir", str(data),
                   "--trusted-key", str(signing_keys.public))
    assert install.exit_code == 2 and "unknown key" in said(install)
    models = ModelSet(trust_at_start(signing_keys.trusted, data))
    local.serve_models(models, data)
    agent = models["digits"]
    assert agent.model is not None and agent.model.version == "2.0.0"
    config = ServiceConfig(fleet=fleet.name, device_id="cam-0", data_dir=data,
                           broker_url=fleet.broker_url, telemetry_interval_s=0.3)
    again = AgentService(config, models)
    fleet.agents["cam-0"] = again
    again.start()
    assert again.keyring is not None and again.keyring.serial == 2
    assert again.mqtt is not None and again.mqtt.wait_subscribed(10)
    assert agent.trusted.key_ids == [new.signer.key_id]
    events.close()


def _first_keyring(root: Keys, new: Keys) -> bytes:
    """A keyring of serial 1 signed by the old key: what a replaying attacker would send."""
    return build_keyring([("signing", _pub(root.signer)), ("next", _pub(new.signer))], 1,
                         [root.signer])


def test_the_controller_republishes_its_keyring_and_verifies_pushes_with_it_after_restart(
        fleet: Fleet, digits_models: TrainedModels, signing_keys: Keys,
        tmp_path: Path) -> None:
    keys = _keys_dir(tmp_path, signing_keys)
    client = fleet.start_controller()
    assert _cli("keys", "rotate", "--keys", str(keys), "--name", "next").exit_code == 0
    assert _cli("keys", "retire", "signing", "--keys", str(keys)).exit_code == 0
    client.upload("/api/v1/keyring", (keys / KEYRING_FILE).read_bytes())
    fleet.stop_controller()

    retained = Subscriber(fleet.broker_url, [keyring_topic(fleet.name)])
    wait_until(lambda: retained.messages, 10, what="the retained keyring")
    retained.close()
    # the broker forgets it (a cleared retained message); a restarted controller sends it again
    wipe = Subscriber(fleet.broker_url, [])
    wipe.publish(keyring_topic(fleet.name), b"", retain=True)
    wipe.close()
    client = fleet.start_controller()
    watcher = Subscriber(fleet.broker_url, [keyring_topic(fleet.name)])
    found = wait_until(lambda: [m for m in watcher.messages if m.payload], 10,
                       what="the keyring published again")
    watcher.close()
    assert found[0].payload == (keys / KEYRING_FILE).read_bytes()
    late = Subscriber(fleet.broker_url, [keyring_topic(fleet.name)])  # after it went out
    kept = wait_until(lambda: [m for m in late.messages if m.payload], 10,
                      what="the keyring retained")
    late.close()
    assert kept[0].retain and kept[0].payload == found[0].payload
    old_signed = make_bundle(digits_models.tflite, tmp_path / "old.efb", signing_keys, "9.0.0")
    with pytest.raises(EdgefleetError, match="unknown key"):
        client.upload("/api/v1/models", old_signed.read_bytes())
    shown = _cli("fleet", "keyring", "show", "--controller", client.url, "--token", TOKEN,
                 "--json")
    assert json.loads(shown.output)["serial"] == 2
    history = client.get("/api/v1/history?target=keyring")
    assert [e["outcome"] for e in history] == ["ok"]
    with pytest.raises(UnknownKeyError):
        read_bundle(old_signed, parse_keyring((keys / KEYRING_FILE).read_bytes()).trusted())
