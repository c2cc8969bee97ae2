"""Flashing without a fleet: install, status, rollback, and refusals that keep the old model."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.lock import LOCK_FILE
from edgefleet.agent.protocol.errors import IntegrityError
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.update import local
from edgefleet.agent.update.slots import SlotError, SlotStore
from edgefleet.agent.update.states import Journal, UpdateState
from edgefleet.agent.update.target import UpdateTarget
from tests import tamper
from tests.conftest import Keys, make_bundle
from tests.models import TrainedModels


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("versions")
    return {"1.0.0": make_bundle(digits_models.tflite, out / "v1.efb", signing_keys, "1.0.0"),
            "2.0.0": make_bundle(digits_models.onnx, out / "v2.efb", signing_keys, "2.0.0")}


def _roles(data: Path) -> dict[str, str | None]:
    return {s["role"]: s["version"] for s in local.status(data)["slots"] if s["role"]}


def test_install_install_rollback(versions: dict[str, Path], signing_keys: Keys,
                                  tmp_path: Path) -> None:
    agent = Agent(signing_keys.trusted)
    assert local.install(agent, tmp_path, versions["1.0.0"]).state == UpdateState.COMMITTED
    assert agent.model is not None and agent.model.version == "1.0.0"
    assert _roles(tmp_path) == {"active, committed": "1.0.0"}
    assert local.install(agent, tmp_path, versions["2.0.0"]).state == UpdateState.COMMITTED
    assert agent.model.version == "2.0.0"
    assert _roles(tmp_path) == {"active, committed": "2.0.0", "fallback": "1.0.0"}
    assert not list((tmp_path / "downloads").glob("*")), "staged downloads are removed"
    assert local.rollback(agent, tmp_path).state == UpdateState.ROLLED_BACK
    assert agent.model.version == "1.0.0"
    assert _roles(tmp_path) == {"active, committed": "1.0.0"}


def test_a_fresh_agent_serves_what_was_installed(versions: dict[str, Path], signing_keys: Keys,
                                                 tmp_path: Path) -> None:
    local.install(Agent(signing_keys.trusted), tmp_path, versions["2.0.0"])
    fresh = Agent(signing_keys.trusted)
    local.serve_active(fresh, tmp_path)
    assert fresh.model is not None and fresh.model.version == "2.0.0"


def test_a_corrupt_bundle_is_refused_and_the_old_one_stays(
        versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, versions["1.0.0"])
    files = tamper.members(versions["2.0.0"].read_bytes())
    model = bytearray(files["model.onnx"])
    model[100] ^= 0xFF
    bad = tmp_path / "bad.efb"
    bad.write_bytes(tamper.with_member(versions["2.0.0"], "model.onnx", bytes(model)))
    with pytest.raises(IntegrityError):
        local.install(agent, tmp_path, bad)
    assert agent.model is not None and agent.model.version == "1.0.0"
    assert _roles(tmp_path) == {"active, committed": "1.0.0"}


def test_a_bundle_failing_its_health_check_fails_before_the_switch(
        versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, versions["1.0.0"])
    files = tamper.members(versions["2.0.0"].read_bytes())
    with np.load(io.BytesIO(files["health.npz"])) as health:
        arrays = {k: health[k] for k in health.files}
    for key in arrays:
        if key.startswith("output/"):
            arrays[key] = arrays[key] + 0.5  # expectations the model cannot meet
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    liar = tmp_path / "liar.efb"
    liar.write_bytes(_resigned_with(versions["2.0.0"], signing_keys, "health.npz",
                                    buffer.getvalue()))
    journal = local.install(agent, tmp_path, liar)
    assert journal.state == UpdateState.FAILED and "health check" in journal.detail
    assert agent.model is not None and agent.model.version == "1.0.0"
    assert _roles(tmp_path)["active, committed"] == "1.0.0"


def _resigned_with(bundle: Path, keys: Keys, name: str, data: bytes) -> bytes:
    import hashlib

    def edit(manifest: dict[str, object]) -> None:
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(),  # type: ignore[index]
                                   "size": len(data)}

    files = tamper.members(tamper.resigned(bundle, keys.signer, edit))
    files[name] = data
    return tamper.pack(files)


def test_rollback_with_nothing_before_is_refused(versions: dict[str, Path], signing_keys: Keys,
                                                 tmp_path: Path) -> None:
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, versions["1.0.0"])
    with pytest.raises(SlotError, match="no earlier committed bundle"):
        local.rollback(agent, tmp_path)
    assert local.status(tmp_path)["update"]["state"] == "COMMITTED", "the state stays as it was"
    assert agent.model is not None and agent.model.version == "1.0.0"


def test_an_update_interrupted_after_staging_finishes_at_start(
        versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, versions["1.0.0"])
    # What a crash right after staging v2 leaves behind: the slot and the journal.
    from edgefleet.agent.protocol.bundle import read_bundle
    from edgefleet.agent.update.slots import SlotStore

    SlotStore(tmp_path).stage(versions["2.0.0"].read_bytes())
    sha = read_bundle(versions["2.0.0"], signing_keys.trusted).sha256
    journal = Journal(state=UpdateState.STAGED, target=UpdateTarget(version="2.0.0", sha256=sha,
                                                              url=str(versions["2.0.0"]), size=0))
    atomic_write(tmp_path / "journal.json", json.dumps(journal.to_dict()).encode())
    restarted = Agent(signing_keys.trusted)
    local.serve_active(restarted, tmp_path)
    assert restarted.model is not None and restarted.model.version == "2.0.0"
    assert local.status(tmp_path)["update"]["state"] == "COMMITTED"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", "agent", *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_install_status_rollback(versions: dict[str, Path], signing_keys: Keys,
                                     tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    key = ["--trusted-key", str(signing_keys.public)]
    for version in ("1.0.0", "2.0.0"):
        done = _cli("install", str(versions[version]), *common, *key, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["update"]["state"] == "COMMITTED"
    shown = json.loads(_cli("status", *common, "--json").stdout)
    active = next(s for s in shown["slots"] if "active" in s["role"])
    assert active["version"] == "2.0.0"
    back = _cli("rollback", *common, *key)
    assert back.returncode == 0 and "ROLLED_BACK" in back.stdout
    shown = json.loads(_cli("status", *common, "--json").stdout)
    assert next(s for s in shown["slots"] if "active" in s["role"])["version"] == "1.0.0"


def test_staging_over_the_fallback_slot_forgets_the_fallback(
        versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, versions["1.0.0"])
    local.install(agent, tmp_path, versions["2.0.0"])  # fallback: 1.0.0
    slots = SlotStore(tmp_path)
    slots.stage(versions["1.0.0"].read_bytes())  # a third update overwrites the fallback slot
    assert slots.pointer().fallback is None, "a rollback must not land on the new bytes"
    with pytest.raises(SlotError, match="no earlier committed bundle"):
        slots.rollback()


@pytest.mark.parametrize("damage", ["truncated", "not a bundle"])
def test_a_bundle_that_cannot_be_read_leaves_a_fresh_data_dir_absent(
        damage: str, versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    """A refused install on a device that had no data dir leaves none behind (nothing that
    looks like a set-up device, and no folder the user did not ask for: the parent made on
    the way goes too); the error is the bundle's."""
    whole = versions["1.0.0"].read_bytes()
    bad = tmp_path / "bad.efb"
    bad.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"\x00" * 4096)
    data = tmp_path / "var" / "edgefleet"
    done = _cli("install", str(bad), "--data-dir", str(data),
                "--trusted-key", str(signing_keys.public))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "bad.efb" in done.stderr or "bundle" in done.stderr, done.stderr
    assert not (tmp_path / "var").exists(), list((tmp_path / "var").rglob("*"))


def test_a_bundle_that_cannot_be_read_leaves_an_existing_data_dir_as_it_was(
        versions: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    """Everything stays byte for byte; the lock file an earlier command left stays too (it
    is the data dir's own; it names its last holder, so its bytes are not compared)."""
    data = tmp_path / "device"
    assert _cli("install", str(versions["1.0.0"]), "--data-dir", str(data),
                "--trusted-key", str(signing_keys.public)).returncode == 0
    before = _files(data)
    bad = tmp_path / "bad.efb"
    bad.write_bytes(versions["2.0.0"].read_bytes()[:1000])
    done = _cli("install", str(bad), "--data-dir", str(data),
                "--trusted-key", str(signing_keys.public))
    assert done.returncode == 2, done.stdout + done.stderr
    assert _files(data) == before
    assert (data / LOCK_FILE).is_file()


def _files(data: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in data.rglob("*") if p.is_file() and p.name != LOCK_FILE}
