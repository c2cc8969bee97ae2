"""Several models on one device, under faults: a data dir migrated after a rollout replaced
its model by another, a --bundle gone or given twice, more models than a device serves, a
crash while a model is added, a model removed under a running agent, failed first installs,
a model that cannot load, and a data dir changed under a running agent."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.lock import hold
from edgefleet.agent.models import ModelSet
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.payloads import (
    MAX_MODELS,
    DesiredModels,
    DesiredState,
    ReportedState,
    decode,
    encode,
)
from edgefleet.agent.protocol.signing import TrustedKeys, generate_keypair
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.agent.protocol.update_state import UpdateState
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.agent.serving.http import InferenceServer
from edgefleet.agent.update import layout, local
from edgefleet.cli.agent import _load_or_refuse
from edgefleet.fleet.mosquitto import MosquittoBroker
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.http_files import FileServer
from tests.models import TrainedModels


@pytest.fixture(scope="module")
def bundles(digits_models: TrainedModels, signing_keys: Keys,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``digits`` (LiteRT) and ``keyword`` (ONNX Runtime), each in two versions; ``vad``."""
    out = tmp_path_factory.mktemp("www")
    made = {}
    for name, model in (("digits", digits_models.tflite), ("keyword", digits_models.onnx)):
        for version in ("1.0.0", "2.0.0"):
            made[f"{name}-{version}"] = make_bundle(model, out / f"{name}-{version}.efb",
                                                    signing_keys, version, name=name)
    made["vad-1.0.0"] = make_bundle(digits_models.tflite, out / "vad-1.0.0.efb", signing_keys,
                                    name="vad")
    return made


@pytest.fixture(scope="module")
def www(bundles: dict[str, Path]) -> Iterator[FileServer]:
    server = FileServer(next(iter(bundles.values())).parent)
    yield server
    server.stop()


def _served(models: ModelSet) -> dict[str, str | None]:
    return {name: agent.model.version if agent.model else None for name, agent in models.items()}


def _service(data: Path, models: ModelSet, broker: MosquittoBroker | None = None,
             fleet: str = "f") -> AgentService:
    return AgentService(ServiceConfig(fleet=fleet, device_id="d-1", data_dir=data,
                                      broker_url=broker.url if broker else None,
                                      telemetry_interval_s=0.5, probation_s=0.3), models)


# 1: migration names the folder after the ACTIVE bundle


def test_a_data_dir_whose_model_a_rollout_replaced_migrates_under_the_active_name(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    agent = Agent(signing_keys.trusted)  # an agent of one model: digits, then keyword over it
    local.install(agent, tmp_path, bundles["digits-1.0.0"])
    local.install(agent, tmp_path, bundles["keyword-1.0.0"])
    models = ModelSet(signing_keys.trusted)
    assert local.serve_models(models, tmp_path) == []
    assert layout.installed(tmp_path) == ["keyword"], "named after slot b, the active one"
    assert _served(models) == {"keyword": "1.0.0"}
    report = _service(tmp_path, models).reported_state()
    assert report.models is not None and report.models["keyword"].serving
    assert report.models["keyword"].previous is None, "digits is no earlier keyword"


def test_a_folder_named_after_the_wrong_bundle_is_renamed_or_refused_never_misreported(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    local.install_model(ModelSet(signing_keys.trusted), tmp_path, bundles["keyword-1.0.0"])
    folder = layout.model_dir(tmp_path, "keyword")
    folder.rename(layout.model_dir(tmp_path, "digits"))  # what the earlier migration did
    assert layout.installed(tmp_path) == ["digits"]
    layout.migrate(tmp_path)
    assert layout.installed(tmp_path) == ["keyword"], "renamed after its active bundle"
    # both names taken: the folder holding another model's bundle is refused, clearly
    shutil.copytree(folder, layout.model_dir(tmp_path, "digits"))
    models = ModelSet(signing_keys.trusted)
    problems = local.serve_models(models, tmp_path)
    assert problems == ["digits: the folder of model digits holds an active bundle of model "
                        "keyword"]
    assert _served(models) == {"keyword": "1.0.0"}
    # an agent serving a bundle of another name is reported not serving, never refused
    models.agent("digits").activate(models["keyword"].model)  # type: ignore[arg-type]
    report = _service(tmp_path, models).reported_state()
    assert report.models is not None and not report.models["digits"].serving
    assert report.models["digits"].active is None


class _Killed(Exception):
    """The migration's process ends here."""


@pytest.mark.parametrize("moves", range(len(layout._LEGACY)))
def test_a_migration_killed_after_any_move_is_finished_into_one_folder(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path], moves: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    agent = Agent(signing_keys.trusted)  # slot a: digits; slot b, active: keyword over it
    local.install(agent, tmp_path, bundles["digits-1.0.0"])
    local.install(agent, tmp_path, bundles["keyword-1.0.0"])
    agent.close()
    move, done = layout._move, list[str]()

    def killed_after(source: Path, target: Path) -> None:
        if len(done) == moves:
            raise _Killed(source.name)
        move(source, target)
        done.append(source.name)

    monkeypatch.setattr(layout, "_move", killed_after)
    with pytest.raises(_Killed):
        layout.migrate(tmp_path)
    monkeypatch.setattr(layout, "_move", move)
    assert layout.migrate(tmp_path) == "keyword", f"killed after {done}"
    assert layout.installed(tmp_path) == ["keyword"], "one folder, named after the active"
    assert not (tmp_path / "models" / layout.MARKER).exists()
    assert not any((tmp_path / item).exists() for item in layout._LEGACY)
    models = ModelSet(signing_keys.trusted)
    assert local.serve_models(models, tmp_path) == []
    assert _served(models) == {"keyword": "1.0.0"}
    models.close()


def test_a_migrated_model_never_rolls_back_onto_the_bundle_of_another_model(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    agent = Agent(signing_keys.trusted)  # slot a (fallback): digits; b: keyword over it
    local.install(agent, tmp_path, bundles["digits-1.0.0"])
    local.install(agent, tmp_path, bundles["keyword-1.0.0"])
    agent.close()
    models = ModelSet(signing_keys.trusted)
    assert local.serve_models(models, tmp_path) == []
    before = _files(tmp_path / "models")
    try:
        with pytest.raises(EdgefleetError, match="its previous slot holds model digits"):
            local.rollback_model(models, tmp_path, "keyword")
        assert _files(tmp_path / "models") == before, "nothing changed"
        assert _served(models) == {"keyword": "1.0.0"}
    finally:
        models.close()


def test_a_pointer_an_earlier_migration_moved_ahead_of_its_slots_is_joined_by_them(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, bundles["digits-1.0.0"])
    local.install(agent, tmp_path, bundles["keyword-1.0.0"])
    agent.close()
    folder = layout.model_dir(tmp_path, "keyword")
    folder.mkdir(parents=True)
    for item in ("journal.json", "slots.json"):  # the earlier order, killed before slots/
        (tmp_path / item).rename(folder / item)
    assert layout.migrate(tmp_path) == "keyword", "not digits, the model of slot a"
    assert layout.installed(tmp_path) == ["keyword"]
    models = ModelSet(signing_keys.trusted)
    assert local.serve_models(models, tmp_path) == []
    assert _served(models) == {"keyword": "1.0.0"}
    models.close()


# 2: a --bundle gone, or two of one model


def test_a_missing_bundle_option_still_serves_what_is_installed(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    copy = tmp_path / "initial.efb"
    shutil.copy(bundles["digits-1.0.0"], copy)
    data = tmp_path / "data"
    local.install_model(ModelSet(signing_keys.trusted), data, copy)
    copy.unlink()
    models = ModelSet(signing_keys.trusted)
    _load_or_refuse(models, data, [copy, bundles["keyword-1.0.0"]], resume=True)
    assert _served(models) == {"digits": "1.0.0", "keyword": "1.0.0"}


def test_two_bundle_options_of_one_model_are_refused(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    with pytest.raises(EdgefleetError, match="are both of model digits"):
        _load_or_refuse(ModelSet(signing_keys.trusted), tmp_path,
                        [bundles["digits-1.0.0"], bundles["digits-2.0.0"]], resume=True)
    assert layout.installed(tmp_path) == [], "refused before anything was installed"


# 3: at most MAX_MODELS models


def test_the_model_past_the_most_a_device_serves_is_refused_at_install(
        tmp_path: Path, signing_keys: Keys, digits_models: TrainedModels) -> None:
    made = [make_bundle(digits_models.tflite, tmp_path / f"m{i:02d}.efb", signing_keys,
                        name=f"m{i:02d}", rows=1) for i in range(MAX_MODELS + 1)]
    data = tmp_path / "data"
    models = ModelSet(signing_keys.trusted)
    for bundle in made[:MAX_MODELS]:
        assert local.install_model(models, data, bundle).state is UpdateState.COMMITTED
    with pytest.raises(local.TooManyModelsError, match=f"most a device serves \\({MAX_MODELS}"
                       ) as refused:
        local.install_model(models, data, made[-1])
    assert "agent remove" in (refused.value.hint or "")
    assert len(layout.installed(data)) == MAX_MODELS
    again = local.install_model(models, data, made[0])  # a model installed may be replaced
    assert again.state is UpdateState.COMMITTED
    ReportedState.model_validate(_service(data, models).reported_state().model_dump())


# 4: a crash while a model is added


_CRASH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from edgefleet.agent.models import ModelSet
    from edgefleet.agent.protocol.signing import TrustedKeys
    from edgefleet.agent.update import device, local
    setattr(device.DeviceEffects, sys.argv[4], lambda self, journal: os._exit(137))
    local.install_model(ModelSet(TrustedKeys.from_paths([Path(sys.argv[1])])),
                        Path(sys.argv[2]), Path(sys.argv[3]))
""")


def _crash_adding(data: Path, keys: Keys, bundle: Path, step: str = "health_check") -> None:
    """``agent install`` of ``bundle`` killed when it enters ``step`` (like a power cut)."""
    done = subprocess.run([sys.executable, "-c", _CRASH, str(keys.public), str(data),
                           str(bundle), step], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 137, done.stderr


def test_a_model_whose_first_install_was_cut_is_shown_and_resumed_without_a_broker(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    local.install_model(ModelSet(signing_keys.trusted), tmp_path, bundles["digits-1.0.0"])
    _crash_adding(tmp_path, signing_keys, bundles["keyword-1.0.0"], "stage")  # no slot yet
    shown = {m["model"]: m["update"]["state"] for m in local.models_status(tmp_path)["models"]}
    assert shown == {"digits": "COMMITTED", "keyword": "STAGED"}
    models = ModelSet(signing_keys.trusted)
    _load_or_refuse(models, tmp_path, [bundles["keyword-1.0.0"]], resume=True)
    assert _served(models) == {"digits": "1.0.0", "keyword": "1.0.0"}


def test_a_model_whose_first_install_was_cut_is_resumed_by_its_runner(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path],
        mosquitto: MosquittoBroker) -> None:
    _crash_adding(tmp_path, signing_keys, bundles["keyword-1.0.0"])  # the only model
    models = ModelSet(signing_keys.trusted)
    local.serve_models(models, tmp_path, resume=False)  # what 'agent run --broker' does
    assert _served(models) == {"keyword": None}, "kept, for its runner to resume"
    sub = Subscriber(mosquitto.url, [device_topic("f", "d-1", Leaf.REPORTED)])
    service = _service(tmp_path, models, mosquitto)
    service.start()
    try:
        def committed(_: object) -> bool:
            found = sub.on("/state/reported")
            report = decode(ReportedState, found[-1].payload) if found else None
            entry = (report.models or {}).get("keyword") if report else None
            return bool(entry and entry.serving and entry.update.state == "COMMITTED")

        assert sub.wait_for(committed, 30), sub.on("/state/reported")[-1:]
    finally:
        service.stop()
        sub.close()
        models.close()


# 7: a model removed under a running agent, installed again by the fleet


def _desired(bundle: Path, www: FileServer, keys: Keys, **extra: Any) -> DesiredState:
    read = read_bundle(bundle, keys.trusted)
    return DesiredState(name=read.manifest.name, version=read.manifest.version,
                        sha256=read.sha256, url=www.url(bundle.name),
                        size=bundle.stat().st_size, **extra)


def test_the_fleet_installs_a_removed_model_again_and_its_commit_is_kept(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path],
        mosquitto: MosquittoBroker, www: FileServer) -> None:
    models = ModelSet(signing_keys.trusted)
    for ref in ("digits-1.0.0", "keyword-1.0.0"):
        local.install_model(models, tmp_path, bundles[ref])
    service = _service(tmp_path, models, mosquitto)
    service.start()
    sub = Subscriber(mosquitto.url, [device_topic("f", "d-1", Leaf.REPORTED)])
    try:
        assert service.mqtt is not None and service.mqtt.wait_subscribed(10)
        shutil.rmtree(layout.model_dir(tmp_path, "keyword"))  # 'agent remove' under it
        desired = DesiredModels(models={"keyword": _desired(
            bundles["keyword-2.0.0"], www, signing_keys, action="commit", rollout="r2")})
        sub.publish(device_topic("f", "d-1", Leaf.DESIRED), encode(desired), retain=True)

        def committed(_: object) -> bool:
            found = sub.on("/state/reported")
            report = decode(ReportedState, found[-1].payload) if found else None
            entry = (report.models or {}).get("keyword") if report else None
            return bool(entry and entry.update.state == "COMMITTED" and entry.active
                        and entry.active.version == "2.0.0")

        assert sub.wait_for(committed, 30), sub.on("/state/reported")[-1:]
        assert layout.installed(tmp_path) == ["digits", "keyword"]
    finally:
        service.stop()
        sub.close()
        models.close()


# 8: failed first installs neither count nor stay


def test_a_failed_first_install_leaves_no_folder_and_no_count(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path],
        mosquitto: MosquittoBroker, www: FileServer) -> None:
    models = ModelSet(signing_keys.trusted)
    for ref in ("digits-1.0.0", "keyword-1.0.0"):
        local.install_model(models, tmp_path, bundles[ref])
    service = _service(tmp_path, models, mosquitto)
    service.start()
    sub = Subscriber(mosquitto.url, [device_topic("f", "d-1", Leaf.REPORTED)])
    topic = device_topic("f", "d-1", Leaf.DESIRED)
    good = _desired(bundles["digits-2.0.0"], www, signing_keys)
    bogus = {f"bogus{i:02d}": good.model_copy(update={"name": f"bogus{i:02d}",
                                                        "url": www.url("nope.efb")})
             for i in range(MAX_MODELS - 2)}

    def state_of(name: str, state: str) -> bool:
        found = sub.on("/state/reported")
        report = decode(ReportedState, found[-1].payload) if found else None
        entry = (report.models or {}).get(name) if report else None
        return bool(entry and entry.update.state == state)

    try:
        assert service.mqtt is not None and service.mqtt.wait_subscribed(10)
        sub.publish(topic, encode(DesiredModels(models=bogus)), retain=True)
        assert sub.wait_for(lambda _: all(state_of(n, "FAILED") for n in bogus), 60)
        vad = _desired(bundles["vad-1.0.0"], www, signing_keys, auto_commit=True)
        sub.publish(topic, encode(DesiredModels(models={**bogus, "vad": vad})), retain=True)
        assert sub.wait_for(lambda _: state_of("vad", "COMMITTED"), 60), \
            "the models that never installed made no room"
    finally:
        service.stop()
        sub.close()
        models.close()
    again = ModelSet(signing_keys.trusted)
    local.serve_models(again, tmp_path)
    assert layout.installed(tmp_path) == ["digits", "keyword", "vad"], "no folder left"
    again.close()


# 10: a model that cannot load is not dropped quietly


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_model_that_cannot_load_makes_the_device_not_ready_and_is_reported(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path],
        mosquitto: MosquittoBroker) -> None:
    for ref in ("digits-1.0.0", "keyword-1.0.0"):
        local.install_model(ModelSet(signing_keys.trusted), tmp_path, bundles[ref])
    slot = layout.model_dir(tmp_path, "keyword") / "slots" / "a" / "bundle.efb"
    slot.write_bytes(slot.read_bytes()[:1000])  # torn on the disk
    shown = _cli("status", "--data-dir", str(tmp_path))
    assert "keyword: not served: cannot read the manifest" in " ".join(shown.stdout.split())
    models = ModelSet(signing_keys.trusted)
    problems = local.serve_models(models, tmp_path, resume=False)
    assert [p.split(":")[0] for p in problems] == ["keyword"]
    assert not models.ready and list(models.broken()) == ["keyword"]
    sub = Subscriber(mosquitto.url, [device_topic("f", "d-1", Leaf.EVENTS)])
    service = _service(tmp_path, models, mosquitto)
    server = InferenceServer(models).start()
    service.start()
    try:
        assert _get(server.port, "/v2/health/ready")[0] == 503
        status, answer = _get(server.port, "/v2/models/keyword/ready")
        assert status == 503 and "installed but cannot be served" in answer["error"]
        assert _get(server.port, "/v2/models/digits/ready")[0] == 200
        report = service.reported_state()
        assert report.models is not None and not report.serving
        assert (report.models["keyword"].serving, report.models["digits"].serving) == (
            False, True)
        assert sub.wait_for(lambda messages: any(
            b"model_failed" in m.payload and b"keyword" in m.payload for m in messages), 10)
        failed = next(json.loads(m.payload) for m in sub.on("/events")
                      if b"model_failed" in m.payload)
        assert failed["bundle"] is None, "not told as an event of the model that serves"
    finally:
        service.stop()
        server.stop()
        sub.close()
        models.close()


def test_a_model_that_cannot_load_reports_what_it_holds_and_why_it_is_not_served(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path],
        digits_models: TrainedModels) -> None:
    other = Keys(*generate_keypair(tmp_path / "keys", "other"))
    keyword = make_bundle(digits_models.onnx, tmp_path / "keyword.efb", other, name="keyword")
    both = ModelSet(TrustedKeys.from_paths([signing_keys.public, other.public]))
    for bundle in (bundles["digits-1.0.0"], keyword):
        local.install_model(both, tmp_path, bundle)
    both.close()
    models = ModelSet(signing_keys.trusted)  # the key keyword was signed with is gone
    problems = local.serve_models(models, tmp_path, resume=False)
    assert [p.split(":")[0] for p in problems] == ["keyword"]
    try:
        report = _service(tmp_path, models).reported_state().models
        assert report is not None
        entry = report["keyword"]
        assert not entry.serving and entry.slot == "a"
        assert entry.active is not None and (entry.active.name, entry.active.version) == (
            "keyword", "1.0.0"), "the bundle installed, though it does not serve"
        assert entry.update.state == "IDLE"
        assert entry.update.detail == f"not served: {models.broken()['keyword']}"
        assert report["digits"].serving and report["digits"].update.detail == ""
    finally:
        models.close()


# 11: a data dir a running agent holds is not changed under it


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", "agent", *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "COLUMNS": "200"})


def test_install_remove_and_rollback_refuse_while_an_agent_holds_the_data_dir(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    local.install_model(ModelSet(signing_keys.trusted), tmp_path, bundles["digits-1.0.0"])
    common = ["--data-dir", str(tmp_path), "--trusted-key", str(signing_keys.public)]
    lock = hold(tmp_path)  # what 'agent run' holds while it runs
    try:
        with pytest.raises(EdgefleetError, match="cannot run another agent"):
            hold(tmp_path)
        for args in (["install", str(bundles["keyword-1.0.0"]), *common],
                     ["remove", "digits", "--data-dir", str(tmp_path)],
                     ["rollback", *common]):
            refused = _cli(*args)
            assert refused.returncode == 2, refused.stdout
            assert f"an agent runs on {tmp_path} (process {os.getpid()})" in refused.stderr
        assert layout.installed(tmp_path) == ["digits"], "nothing changed"
    finally:
        lock.close()
    done = _cli("install", str(bundles["keyword-1.0.0"]), *common)
    assert done.returncode == 0, done.stderr


_PAUSED_INSTALL = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgefleet.agent.update import device
    release = Path(sys.argv[1])
    step = device.DeviceEffects.health_check
    def paused(self, journal):
        print("PAUSED", flush=True)
        while not release.exists():
            time.sleep(0.02)
        return step(self, journal)
    device.DeviceEffects.health_check = paused
    from edgefleet.cli import main
    sys.argv = ["edgefleet", "agent", *sys.argv[2:]]
    main()
""")


def test_an_install_holds_the_data_dir_for_its_whole_run(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    data, release = tmp_path / "data", tmp_path / "release"
    common = ["--data-dir", str(data), "--trusted-key", str(signing_keys.public)]
    first = subprocess.Popen([sys.executable, "-c", _PAUSED_INSTALL, str(release), "install",
                              str(bundles["digits-1.0.0"]), *common],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "PAUSED"
        holder = f"'edgefleet agent install' (process {first.pid}) is changing {data}"
        second = _cli("install", str(bundles["keyword-1.0.0"]), *common)
        assert second.returncode == 2, second.stdout
        assert holder in " ".join(second.stderr.split())
        for args in (["remove", "digits", "--data-dir", str(data)], ["rollback", *common],
                     ["run", *common]):
            refused = _cli(*args)
            assert refused.returncode == 2, (args, refused.stdout)
            assert holder in " ".join(refused.stderr.split()), args
        with pytest.raises(EdgefleetError, match="cannot run another agent on it"):
            hold(data)
    finally:
        release.touch()
        _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert layout.installed(data) == ["digits"], "the second install never started"
    done = _cli("install", str(bundles["keyword-1.0.0"]), *common)
    assert done.returncode == 0, done.stderr
    assert layout.installed(data) == ["digits", "keyword"]


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_left_alone(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (data / "agent.lock").symlink_to(precious)
    with pytest.raises(EdgefleetError, match="agent.lock is a symlink"):
        hold(data)
    refused = _cli("install", str(bundles["digits-1.0.0"]), "--data-dir", str(data),
                   "--trusted-key", str(signing_keys.public))
    assert refused.returncode == 2 and "is a symlink" in refused.stderr
    assert precious.read_text() == "keep me", "never truncated nor written"
    assert layout.installed(data) == []


def _files(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_status_reads_a_one_model_data_dir_as_it_will_be_migrated_and_writes_nothing(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    agent = Agent(signing_keys.trusted)  # slot a: digits; slot b, active: keyword over it
    local.install(agent, tmp_path, bundles["digits-1.0.0"])
    local.install(agent, tmp_path, bundles["keyword-1.0.0"])
    agent.close()
    for moved in ((), ("journal.json", "downloads", "slots")):  # as it is; killed part-way
        if moved:
            folder = layout.model_dir(tmp_path, "keyword")
            folder.mkdir(parents=True)
            (tmp_path / "models" / layout.MARKER).write_text("keyword")
            for item in moved:
                (tmp_path / item).rename(folder / item)
        before = _files(tmp_path)
        shown = _cli("status", "--data-dir", str(tmp_path), "--json")
        assert shown.returncode == 0, shown.stderr
        assert _files(tmp_path) == before, "status moved or made nothing"
        models = json.loads(shown.stdout)["models"]
        assert [m["model"] for m in models] == ["keyword"], moved
        roles = {s["slot"]: (s["role"], s["name"]) for s in models[0]["slots"]}
        assert roles == {"a": ("fallback", "digits"), "b": ("active, committed", "keyword")}, moved
    assert layout.migrate(tmp_path) == "keyword"


# 13: messages that say what is so


def test_messages_name_what_is_served_and_what_to_wait_for(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    empty = _cli("rollback", "--data-dir", str(tmp_path), "--trusted-key",
                 str(signing_keys.public))
    assert empty.returncode == 2 and "holds no model: there is nothing to roll back" in \
        " ".join(empty.stderr.split())
    models = ModelSet(signing_keys.trusted)
    local.install_model(models, tmp_path, bundles["digits-1.0.0"])
    models.agent("vad")  # a model the fleet adds, its first bundle on its way
    server = InferenceServer(models).start()
    try:
        assert _get(server.port, "/v2/health/ready")[0] == 200
        status, answer = _get(server.port, "/v2/models/vad/ready")
        assert status == 503 and "retry when /v2/models/vad/ready is 200" in answer["error"]
        status, answer = _get(server.port, "/v2/models/radar/ready")
        assert status == 404 and answer["error"] == (
            "unknown model 'radar'; this device serves digits version 1.0.0")
        with caplog.at_level("INFO", logger="edgefleet.agent.service"):
            model = models["digits"].model
            assert model is not None
            _service(tmp_path, models).publish_event("update", state="PROBATION",
                                                     bundle=model.ref)
        assert "update: digits 1.0.0 PROBATION" in caplog.messages, "not 'update: '"
    finally:
        server.stop()
        models.close()
