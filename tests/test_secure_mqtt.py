"""Secure mode end to end: a real Mosquitto with TLS, client certificates (or passwords) and
the ACL of ``edgefleet fleet acl``; certificates from ``fleet.certs``. What a device's
credential may do is proved against the broker: forbidden publishes are dropped silently
(MQTT 3.1.1), so each test sends a permitted message after them and checks that only it
arrives."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner

from edgefleet.agent.core import Agent
from edgefleet.agent.ha_discovery import publish_discovery
from edgefleet.agent.mqtt import MqttClient, MqttSecurity, Refusal, refusal_of
from edgefleet.agent.protocol.homeassistant import node_id
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.agent.update import download, local
from edgefleet.cli import app
from edgefleet.fleet import certs
from edgefleet.fleet.acl import acl_rules, render_acl
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.errors import ApiError
from edgefleet.fleet.mosquitto import BrokerSecurity, MosquittoBroker, add_passwords, free_port
from edgefleet.fleet.simulate import SimOptions, SimulatedFleet
from edgefleet.fleet.simulate.options import SimulationError
from edgefleet.fleet.store import Store, open_store
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import TOKEN, wait_until
from tests.models import TrainedModels

FLEET = "sec"
BASE = f"edgefleet/v1/{FLEET}"
CONTROLLER = certs.CONTROLLER_CN


@dataclass(frozen=True)
class Pki:
    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    def client(self, name: str, **options: object) -> MqttSecurity:
        return MqttSecurity(ca_file=self.ca, cert_file=self.root / f"{name}.crt",
                            key_file=self.root / f"{name}.key", **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca()
    certs.save(ca, root, "ca")
    certs.save(certs.issue_server(ca, ["127.0.0.1", "localhost"]), root, "server")
    certs.save(certs.issue_client(ca, CONTROLLER), root, CONTROLLER)
    for device in ("d1", "d2", "cam-1", "homeassistant"):
        certs.save(certs.issue_device(ca, device), root, device)
    rogue = certs.make_ca("another CA")  # a certificate for "d1" that this fleet never issued
    certs.save(certs.issue_device(rogue, "d1"), root, "rogue-d1")
    (root / "acl").write_text(render_acl(FLEET, CONTROLLER, ha_devices=["d1"],
                                         ha_user="homeassistant"))
    return Pki(root)


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """TLS, require_certificate, use_identity_as_username, the generated ACL."""
    security = BrokerSecurity(pki.ca, pki.root / "server.crt", pki.root / "server.key",
                              acl_file=pki.root / "acl")
    server = MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto"),
                             security=security).start()
    yield server
    server.stop()


class Inbox:
    """Records what a client receives."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()

    @property
    def topics(self) -> set[str]:
        with self._cond:
            return {topic for topic, _ in self.messages}

    def wait_for(self, topic: str, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: topic in {t for t, _ in self.messages}, timeout)


@pytest.fixture()
def clients() -> Iterator[list[MqttClient]]:
    made: list[MqttClient] = []
    yield made
    for client in made:
        client.stop()


def _connect(clients: list[MqttClient], url: str, security: MqttSecurity | None,
             client_id: str, subscribe: Sequence[str] = (), inbox: Inbox | None = None,
             expect: bool = True) -> MqttClient:
    client = MqttClient.from_url(client_id, url, security=security)
    for topic_filter in subscribe:
        client.subscribe(topic_filter, inbox or Inbox())
    clients.append(client)
    client.start()
    if expect:
        assert client.wait_connected(10), client.connect_error
        assert client.wait_subscribed(10)
    return client


def _log_lines(broker: MosquittoBroker, text: str) -> int:
    assert broker.workdir is not None
    return (broker.workdir / "mosquitto.log").read_text().count(text)


# --- certificates and the ACL, pure -------------------------------------------------------

def test_certificates_say_what_they_are_for(tmp_path: Path) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    ca = certs.make_ca("fleet CA", now=now)
    server = certs.issue_server(ca, ["broker.lan", "192.0.2.10"], days=30, now=now)
    device = certs.issue_device(ca, "cam-7", now=now)
    ext = ca.cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ext.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert ext.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    sans = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert device.common_name == "cam-7"
    usage = device.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert device.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign \
        is False
    assert device.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca \
        is False
    device.cert.verify_directly_issued_by(ca.cert)
    assert server.cert.not_valid_after_utc - now == dt.timedelta(days=30)
    assert device.cert.not_valid_before_utc < now  # a clock a little behind still accepts it
    info = certs.describe(device.cert, now=now)
    assert (info["purpose"], info["days_left"], info["issuer"]) == ("client", certs.CLIENT_DAYS,
                                                                    "fleet CA")


@pytest.mark.parametrize("bad", ["a/b", "d+", "#", "", "_fleet", "-x", "x" * 65, CONTROLLER])
def test_a_device_id_that_topics_refuse_gets_no_certificate(bad: str) -> None:
    with pytest.raises(certs.CertError):
        certs.issue_device(certs.make_ca(), bad)


def test_keys_are_private_and_never_silently_replaced(tmp_path: Path) -> None:
    ca = certs.make_ca()
    key_path, cert_path = certs.save(ca, tmp_path, "ca")
    assert key_path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(certs.CertError, match="already exists"):
        certs.save(certs.make_ca(), tmp_path, "ca")
    assert certs.load(key_path, cert_path).cert == ca.cert
    certs.save(certs.issue_device(ca, "d9"), tmp_path, "d9")
    with pytest.raises(certs.CertError, match="not the key of"):
        certs.load(tmp_path / "d9.key", cert_path)
    with pytest.raises(certs.CertError, match="not a CA"):
        certs.issue_device(certs.load(tmp_path / "d9.key", tmp_path / "d9.crt"), "d10")


def test_the_certs_commands_write_a_working_set(tmp_path: Path) -> None:
    runner, folder = CliRunner(), str(tmp_path / "certs")
    for args in (["ca"], ["server", "--host", "broker.lan", "--host", "10.0.0.2"],
                 ["controller"], ["device", "cam-1", "cam-2"]):
        result = runner.invoke(app, ["certs", *args, "--dir", folder, "--json"])
        assert result.exit_code == 0, result.output
    shown = json.loads(runner.invoke(app, ["certs", "show", f"{folder}/server.crt",
                                           f"{folder}/devices/cam-2.crt", "--json"]).stdout)
    assert [(s["common_name"], s["purpose"], s["sans"]) for s in shown] == [
        ("broker.lan", "server", ["broker.lan", "10.0.0.2"]), ("cam-2", "client", [])]
    assert (tmp_path / "certs" / "devices" / "cam-1.key").stat().st_mode & 0o777 == 0o600
    refused = runner.invoke(app, ["certs", "device", "cam/3", "--dir", folder])
    assert refused.exit_code == 2 and "cam/3" in refused.output
    again = runner.invoke(app, ["certs", "ca", "--dir", folder])
    assert again.exit_code == 2 and "--force" in again.output
    acl = runner.invoke(app, ["fleet", "acl", "--fleet", "f", "--out", str(tmp_path / "acl"),
                              "--device", "edgefleet-controller", "--passwd-file",
                              str(tmp_path / "passwd")])
    assert acl.exit_code == 2 and not (tmp_path / "passwd").exists()


def test_the_acl_gives_devices_their_own_topics_and_the_controller_desired_state() -> None:
    text = render_acl("plant-1", "ctl", ha_devices=["cam.1"], ha_user="ha")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    node = node_id("plant-1", "cam.1")
    assert lines == [
        "pattern write edgefleet/v1/plant-1/%u/telemetry",
        "pattern write edgefleet/v1/plant-1/%u/status",
        "pattern write edgefleet/v1/plant-1/%u/state/reported",
        "pattern write edgefleet/v1/plant-1/%u/events",
        "pattern read edgefleet/v1/plant-1/%u/state/desired",
        "pattern read edgefleet/v1/plant-1/_fleet/#",
        "user cam.1",
        f"topic write homeassistant/sensor/{node}/+/config",
        f"topic write homeassistant/binary_sensor/{node}/+/config",
        "user ha",
        "topic read edgefleet/v1/plant-1/+/telemetry",
        "topic read edgefleet/v1/plant-1/+/status",
        "topic read homeassistant/#",
        "topic write homeassistant/status",
        "user ctl",
        "topic read edgefleet/v1/plant-1/#",
        "topic write edgefleet/v1/plant-1/+/state/desired",
        "topic write edgefleet/v1/plant-1/_fleet/#",
        "topic write edgefleet/v1/plant-1/+/status",
        "topic write edgefleet/v1/plant-1/+/state/reported",
        "topic write edgefleet/v1/plant-1/_clear/#",
    ]
    writers = {r.topic for r in acl_rules("plant-1", "ctl") if r.access == "write"
               and "desired" in r.topic}
    assert writers == {"edgefleet/v1/plant-1/+/state/desired"}
    for bad in (("plant/1", "ctl", ()), ("p", "c+", ()), ("p", "ctl", ["ctl"])):
        with pytest.raises(ValueError):
            render_acl(*bad)


# --- client certificates on a real broker --------------------------------------------------

def test_a_client_without_a_valid_certificate_cannot_connect_and_says_why_once(
        broker: MosquittoBroker, pki: Pki, clients: list[MqttClient],
        caplog: pytest.LogCaptureFixture) -> None:
    before = _log_lines(broker, "peer did not return a certificate")
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.mqtt"):
        no_cert = _connect(clients, broker.url, MqttSecurity(ca_file=pki.ca), "no-cert",
                           expect=False)
        wait_until(lambda: _log_lines(broker, "peer did not return a certificate")
                   >= before + 3, 20, what="three refused attempts")
    assert not no_cert.connected and no_cert.connect_error is not None
    assert "certificate required" in no_cert.connect_error.message
    assert "--cert" in no_cert.connect_error.hint
    warnings = [r.getMessage() for r in caplog.records if r.name == "edgefleet.agent.mqtt"]
    # once per distinct reason (in practice one), not at every one of the 3+ attempts
    assert 1 <= len(warnings) < 3 and len(set(warnings)) == len(warnings), warnings

    plain = _connect(clients, f"mqtt://{broker.host}:{broker.port}", None, "anonymous",
                     expect=False)
    rogue = _connect(clients, broker.url, MqttSecurity(
        ca_file=pki.ca, cert_file=pki.root / "rogue-d1.crt", key_file=pki.root / "rogue-d1.key"),
        "rogue", expect=False)
    wait_until(lambda: plain.connect_error and rogue.connect_error, 15, what="refusals")
    assert not plain.connected and "mqtts://" in plain.connect_error.hint  # type: ignore[union-attr]
    assert not rogue.connected and "unknown ca" in rogue.connect_error.message  # type: ignore[union-attr]


def test_a_client_that_does_not_trust_the_broker_does_not_connect(
        broker: MosquittoBroker, pki: Pki, clients: list[MqttClient], tmp_path: Path) -> None:
    other = certs.make_ca("not the broker's CA")
    certs.save(other, tmp_path, "other")
    security = MqttSecurity(ca_file=tmp_path / "other.crt", cert_file=pki.root / "d1.crt",
                            key_file=pki.root / "d1.key")
    client = _connect(clients, broker.url, security, "d1", expect=False)
    wait_until(lambda: client.connect_error, 15, what="the verification failure")
    assert not client.connected
    assert "CERTIFICATE_VERIFY_FAILED" in client.connect_error.message  # type: ignore[union-attr]
    assert "--ca" in client.connect_error.hint  # type: ignore[union-attr]


def test_a_device_publishes_only_its_own_topics(
        broker: MosquittoBroker, pki: Pki, clients: list[MqttClient]) -> None:
    seen = Inbox()
    _connect(clients, broker.url, pki.client(CONTROLLER), "controller", [f"{BASE}/#"], seen)
    d1 = _connect(clients, broker.url, pki.client("d1"), "edgefleet-sec-d1")
    allowed = [f"{BASE}/d1/{leaf}" for leaf in ("telemetry", "status", "state/reported")]
    forbidden = [f"{BASE}/d2/{leaf}" for leaf in ("telemetry", "status", "state/reported",
                                                  "events", "state/desired")]
    forbidden += [f"{BASE}/d1/state/desired", f"{BASE}/_fleet/keyring"]
    for topic in allowed + forbidden:
        d1.publish_wait(topic, b"{}", qos=1)
    d1.publish_wait(f"{BASE}/d1/events", b"control", qos=1)  # after every forbidden one
    assert seen.wait_for(f"{BASE}/d1/events")
    assert set(allowed) <= seen.topics
    assert not seen.topics & set(forbidden), seen.topics & set(forbidden)


def test_a_device_reads_only_its_own_desired_state_and_the_fleet_topics(
        broker: MosquittoBroker, pki: Pki, clients: list[MqttClient]) -> None:
    got = Inbox()
    _connect(clients, broker.url, pki.client("d1"), "d1",
             [f"{BASE}/+/state/desired", f"{BASE}/d2/#", f"{BASE}/_fleet/#"], got)
    controller = _connect(clients, broker.url, pki.client(CONTROLLER), "controller")
    d2 = _connect(clients, broker.url, pki.client("d2"), "d2")
    d2.publish_wait(f"{BASE}/d2/telemetry", b"{}", qos=1)
    controller.publish_wait(f"{BASE}/d2/state/desired", b"for d2", qos=1)
    controller.publish_wait(f"{BASE}/d1/state/desired", b"for d1", qos=1)
    controller.publish_wait(f"{BASE}/_fleet/keyring", b"keys", qos=1)
    assert got.wait_for(f"{BASE}/_fleet/keyring") and got.wait_for(f"{BASE}/d1/state/desired")
    assert got.topics == {f"{BASE}/d1/state/desired", f"{BASE}/_fleet/keyring"}


def test_a_device_credential_cannot_take_over_another_devices_session(
        broker: MosquittoBroker, pki: Pki, clients: list[MqttClient]) -> None:
    got, connections = Inbox(), []
    d2 = _connect(clients, broker.url, pki.client("d2"), "edgefleet-sec-d2",
                  [f"{BASE}/d2/state/desired"], got)
    d2.on_connect(lambda: connections.append(1))  # counts reconnections from here on
    # d2's client id with d1's certificate: the broker names that session "d1" instead of
    # closing d2's (a takeover would show as a reconnection or a lost message)
    _connect(clients, broker.url, pki.client("d1"), "edgefleet-sec-d2")
    controller = _connect(clients, broker.url, pki.client(CONTROLLER), "controller")
    controller.publish_wait(f"{BASE}/d2/state/desired", b"still yours", qos=1)
    assert got.wait_for(f"{BASE}/d2/state/desired")
    assert d2.connected and connections == []


def test_home_assistant_discovery_is_allowed_only_for_listed_devices_and_their_own_node(
        broker: MosquittoBroker, pki: Pki, clients: list[MqttClient]) -> None:
    seen, controller_view = Inbox(), Inbox()
    ha = _connect(clients, broker.url, pki.client("homeassistant"), "ha",
                  ["homeassistant/#", f"{BASE}/+/telemetry"], seen)
    _connect(clients, broker.url, pki.client(CONTROLLER), "controller", [f"{BASE}/#"],
             controller_view)
    d1 = _connect(clients, broker.url, pki.client("d1"), "d1")
    d2 = _connect(clients, broker.url, pki.client("d2"), "d2")
    assert publish_discovery(d2, FLEET, "d2") == 7  # queued, but d2 is not listed: dropped
    d1.publish_wait(f"homeassistant/sensor/{node_id(FLEET, 'd2')}/x/config", b"{}", qos=1)
    ha.publish_wait(f"{BASE}/d1/state/desired", b"{}", qos=1)  # HA reads, never steers
    assert publish_discovery(d1, FLEET, "d1") == 7
    d1.publish_wait(f"{BASE}/d1/telemetry", b"control", qos=1)
    assert seen.wait_for(f"{BASE}/d1/telemetry")
    discovery = {t for t in seen.topics if t.startswith("homeassistant/")}
    assert len(discovery) == 7 and all(node_id(FLEET, "d1") in t for t in discovery)
    assert controller_view.wait_for(f"{BASE}/d1/telemetry")
    assert f"{BASE}/d1/state/desired" not in controller_view.topics


# --- user name and password ---------------------------------------------------------------

def test_password_mode_refuses_a_wrong_password_and_applies_the_same_acl(
        pki: Pki, tmp_path: Path, clients: list[MqttClient]) -> None:
    result = CliRunner().invoke(app, [
        "fleet", "acl", "--fleet", FLEET, "--out", str(tmp_path / "acl"), "--device", "d1",
        "--device", "d2", "--passwd-file", str(tmp_path / "passwd"), "--controller-password",
        "--json"])
    assert result.exit_code == 0, result.output
    passwords = json.loads(result.stdout)["passwords"]
    assert set(passwords) == {"d1", "d2", CONTROLLER}
    stored = (tmp_path / "passwd").read_text()
    assert passwords["d1"] not in stored and stored.startswith("d1:$7$")
    assert (tmp_path / "passwd").stat().st_mode & 0o777 == 0o600
    security = BrokerSecurity(pki.ca, pki.root / "server.crt", pki.root / "server.key",
                              client_certificates=False, password_file=tmp_path / "passwd",
                              acl_file=tmp_path / "acl")
    with MosquittoBroker(workdir=tmp_path / "mosquitto", security=security) as broker:
        wrong = _connect(clients, broker.url, MqttSecurity(ca_file=pki.ca, username="d1",
                                                           password="guess"), "d1-wrong",
                         expect=False)
        anonymous = _connect(clients, broker.url, MqttSecurity(ca_file=pki.ca), "anon",
                             expect=False)
        wait_until(lambda: wrong.connect_error and anonymous.connect_error, 15,
                   what="refusals")
        assert "refused the connection" in wrong.connect_error.message  # type: ignore[union-attr]
        assert "credentials" in wrong.connect_error.hint  # type: ignore[union-attr]
        assert not wrong.connected and not anonymous.connected
        seen = Inbox()
        _connect(clients, broker.url, MqttSecurity(
            ca_file=pki.ca, username=CONTROLLER, password=passwords[CONTROLLER]),
            "controller", [f"{BASE}/#"], seen)
        d1 = _connect(clients, broker.url, MqttSecurity(
            ca_file=pki.ca, username="d1", password=passwords["d1"]), "d1")
        for topic in (f"{BASE}/d2/telemetry", f"{BASE}/d1/state/desired"):
            d1.publish_wait(topic, b"{}", qos=1)
        d1.publish_wait(f"{BASE}/d1/telemetry", b"control", qos=1)
        assert seen.wait_for(f"{BASE}/d1/telemetry")
        assert seen.topics == {f"{BASE}/d1/telemetry"}

        rotated = add_passwords(tmp_path / "passwd", ["d1"])["d1"]  # rotation: a new one
        broker.reload()
        old = _connect(clients, broker.url, MqttSecurity(
            ca_file=pki.ca, username="d1", password=passwords["d1"]), "d1-old", expect=False)
        wait_until(lambda: old.connect_error, 15, what="the old password refused")
        _connect(clients, broker.url, MqttSecurity(ca_file=pki.ca, username="d1",
                                                   password=rotated), "d1-new")
        assert not old.connected


def test_agent_run_wants_a_user_name_with_a_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    result = CliRunner().invoke(app, ["agent", "run", "--broker", "mqtts://127.0.0.1:1",
                                      "--password-file", str(secret),
                                      "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "without a user name" in result.output and "--username" in result.output
    assert "s3cret" not in result.output


# --- a rollout over TLS with client certificates, bundles over HTTPS ----------------------

def test_a_rollout_reaches_a_device_over_tls_with_client_certificates_and_https(
        broker: MosquittoBroker, pki: Pki, digits_models: TrainedModels, signing_keys: Keys,
        tmp_path: Path) -> None:
    v1 = make_bundle(digits_models.tflite, tmp_path / "v1.efb", signing_keys, "1.0.0")
    v2 = make_bundle(digits_models.onnx, tmp_path / "v2.efb", signing_keys, "2.0.0")
    controller, api, store = _https_controller(broker, pki, signing_keys, tmp_path)
    download.trust_ca(pki.ca)  # what 'agent run --ca' does for bundle downloads
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path / "cam-1", v1)
    service = AgentService(ServiceConfig(
        fleet=FLEET, device_id="cam-1", data_dir=tmp_path / "cam-1", broker_url=broker.url,
        telemetry_interval_s=0.3, probation_s=600, mqtt_security=pki.client("cam-1")), agent)
    try:
        controller.start()
        api.start()
        service.start()
        client = FleetClient(api.url, TOKEN, ca_file=pki.ca)
        with pytest.raises(ApiError, match="CERTIFICATE_VERIFY_FAILED"):
            FleetClient(api.url, TOKEN).get("/api/v1/devices")  # the system CAs do not know it
        with pytest.raises(ApiError):
            FleetClient(api.url.replace("https:", "http:"), TOKEN).get("/api/v1/devices")
        wait_until(lambda: _device(client, "cam-1", "1.0.0"), 30, what="cam-1 registered")
        client.upload("/api/v1/models", v2.read_bytes())
        rollout = client.post("/api/v1/rollouts", {
            "model": "digits:2.0.0", "selectors": ["device:cam-1"], "waves": ["100%"],
            "device_timeout_s": 60, "soak_s": 0.5})
        done = wait_until(lambda: (r := client.get(f"/api/v1/rollouts/{rollout['id']}"))
                          ["state"] in ("SUCCEEDED", "ABORTED") and r, 90, what="rollout end")
        assert done["state"] == "SUCCEEDED", done["reason"]
        wait_until(lambda: _device(client, "cam-1", "2.0.0"), 30, what="v2 committed")
        assert agent.model is not None and agent.model.version == "2.0.0"
        assert client.get("/api/v1/models")  # the API answered over HTTPS throughout
    finally:
        service.stop()
        api.stop()
        controller.stop()
        store.close()


def _https_controller(broker: MosquittoBroker, pki: Pki, keys: Keys, root: Path
                      ) -> tuple[FleetController, ApiServer, Store]:
    """A controller on the secure broker with its own certificate, its API over HTTPS
    (not started)."""
    store = open_store(f"sqlite:///{root / 'fleet.db'}")
    port = free_port()
    controller = FleetController(ControllerConfig(
        fleet=FLEET, broker_url=broker.url, data_dir=root / "controller",
        public_url=f"https://127.0.0.1:{port}", trusted=keys.trusted, tick_s=0.2,
        mqtt_security=pki.client(CONTROLLER)), store)
    tls = certs.server_context(pki.root / "server.crt", pki.root / "server.key")
    return controller, ApiServer(controller, {TOKEN: "alice"}, port=port, tls=tls), store


def _device(client: FleetClient, device: str, version: str) -> bool:
    found = [d for d in client.get("/api/v1/devices") if d["id"] == device]
    return bool(found and found[0]["active"] and found[0]["active"]["version"] == version
                and found[0]["update_state"] in ("COMMITTED", "IDLE"))


def test_a_revoked_device_certificate_is_refused_and_the_others_still_connect(
        pki: Pki, tmp_path: Path, clients: list[MqttClient]) -> None:
    folder = tmp_path / "ca"
    folder.mkdir()
    for name in ("ca.key", "ca.crt"):
        (folder / name).write_bytes((pki.root / name).read_bytes())
    runner = CliRunner()
    nothing = runner.invoke(app, ["certs", "revoke", "--dir", str(folder)])
    assert nothing.exit_code == 2 and "--renew" in nothing.output
    foreign = runner.invoke(app, ["certs", "revoke", str(pki.root / "rogue-d1.crt"),
                                  "--dir", str(folder)])
    assert foreign.exit_code == 2 and "not issued by this CA" in foreign.output
    assert not (folder / "ca.crl").exists()  # nothing written on a refusal

    result = runner.invoke(app, ["certs", "revoke", str(pki.root / "d2.crt"), "--dir",
                                 str(folder), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["revoked"] == 1 and doc["certificates"][0]["common_name"] == "d2"
    security = BrokerSecurity(pki.ca, pki.root / "server.crt", pki.root / "server.key",
                              acl_file=pki.root / "acl", crlfile=folder / "ca.crl")
    with MosquittoBroker(workdir=tmp_path / "mosquitto", security=security) as broker:
        refused = _connect(clients, broker.url, pki.client("d2"), "d2", expect=False)
        wait_until(lambda: refused.connect_error, 15, what="the revoked certificate refused")
        assert not refused.connected
        assert "revoked" in refused.connect_error.message  # type: ignore[union-attr]
        _connect(clients, broker.url, pki.client("d1"), "d1")  # not revoked: connects
        _connect(clients, broker.url, pki.client("cam-1"), "cam-1")

        again = json.loads(runner.invoke(app, ["certs", "revoke", str(pki.root / "cam-1.crt"),
                                               "--dir", str(folder), "--json"]).stdout)
        assert again["revoked"] == 2  # the list keeps what it revoked before
        broker.reload()  # SIGHUP: the broker reads the list again
        late = _connect(clients, broker.url, pki.client("cam-1"), "cam-1-again", expect=False)
        wait_until(lambda: late.connect_error, 15, what="the certificate revoked later")
        assert "revoked" in late.connect_error.message  # type: ignore[union-attr]

    renewed = json.loads(runner.invoke(app, ["certs", "revoke", "--renew", "--days", "30",
                                             "--dir", str(folder), "--json"]).stdout)
    assert renewed["revoked"] == 2 and renewed["next_update"] < again["next_update"]


def _retained(broker: MosquittoBroker, pki: Pki, clients: list[MqttClient],
              device: str) -> set[str]:
    """The topics of ``device`` the broker keeps that Home Assistant may read (status,
    telemetry): retained messages reach a new subscriber before a probe it publishes after
    subscribing. (Not with the controller's certificate: the broker takes the user name
    as the client id, so a second controller client would take the controller's session.)"""
    inbox, probe = Inbox(), "homeassistant/status"
    reader = _connect(clients, broker.url, pki.client("homeassistant"), "homeassistant",
                      [f"{BASE}/{device}/#", probe], inbox)
    try:
        reader.publish_wait(probe, b"online", qos=1)
        assert inbox.wait_for(probe)
        return {topic for topic in inbox.topics if topic != probe}
    finally:
        reader.stop()
        clients.remove(reader)


def test_decommissioning_in_secure_mode_clears_the_topics_and_prints_the_revocation(
        broker: MosquittoBroker, pki: Pki, signing_keys: Keys, tmp_path: Path,
        clients: list[MqttClient], monkeypatch: pytest.MonkeyPatch) -> None:
    controller, api, store = _https_controller(broker, pki, signing_keys, tmp_path)
    try:
        controller.start()
        api.start()
        device = _connect(clients, broker.url, pki.client("d2"), "d2")
        device.publish_wait(f"{BASE}/d2/status", b"offline", qos=1, retain=True)
        wait_until(lambda: controller.registry.get("d2"), 15, what="d2 registered")
        assert _retained(broker, pki, clients, "d2") == {f"{BASE}/d2/status"}
        monkeypatch.setenv("EDGEFLEET_CA", str(pki.ca))
        result = CliRunner().invoke(app, ["fleet", "devices", "remove", "d2", "--controller",
                                          api.url, "--token", TOKEN])
        assert result.exit_code == 0, result.output
        assert f"edgefleet certs revoke --dir {pki.root} {pki.root}/devices/d2.crt" in (
            result.stdout)
        assert "systemctl reload mosquitto" in result.stdout
        # the ACL lets the controller clear what only the device writes otherwise
        assert _retained(broker, pki, clients, "d2") == set()
        assert controller.registry.get("d2") is None and store.device("d2") is None
    finally:
        api.stop()
        controller.stop()
        store.close()


# --- a simulated fleet on the secure broker -----------------------------------------------

def test_a_simulated_fleet_connects_with_a_certificate_per_device_and_rolls_out_over_https(
        broker: MosquittoBroker, pki: Pki, digits_models: TrainedModels, signing_keys: Keys,
        tmp_path: Path) -> None:
    """``fleet simulate --ca --certs``: each simulated device is its own MQTT user under the
    generated ACL, checks the broker with the fleet CA and fetches the bundle over HTTPS."""
    v1 = make_bundle(digits_models.tflite, tmp_path / "v1.efb", signing_keys, "1.0.0")
    v2 = make_bundle(digits_models.onnx, tmp_path / "v2.efb", signing_keys, "2.0.0")
    ids = ["sim-00001", "sim-00002", "sim-00003"]
    made = CliRunner().invoke(app, ["certs", "device", *ids, "--dir", str(pki.root),
                                    "--out", str(tmp_path / "devices")])
    assert made.exit_code == 0, made.output
    options = SimOptions(ca_file=pki.ca, certs_dir=tmp_path / "devices",
                         telemetry_interval_s=0.3, connect_rate=100)
    with pytest.raises(SimulationError, match=r"1 of 4 .*no certificate.*sim-00004") as info:
        SimulatedFleet(broker.url, FLEET, 4, signing_keys.trusted, options, v1)
    assert "edgefleet certs device sim-00004" in info.value.hint
    with pytest.raises(SimulationError, match="needs TLS settings"):
        SimulatedFleet(broker.url.replace("mqtt:", "mqtts:"), FLEET, 1, signing_keys.trusted)

    controller, api, store = _https_controller(broker, pki, signing_keys, tmp_path)
    try:
        controller.start()
        api.start()
        client = FleetClient(api.url, TOKEN, ca_file=pki.ca)
        with SimulatedFleet(broker.url, FLEET, 3, signing_keys.trusted, options, v1):
            wait_until(lambda: all(_device(client, d, "1.0.0") for d in ids), 30,
                       what="the simulated devices registered over TLS")
            client.upload("/api/v1/models", v2.read_bytes())
            rollout = client.post("/api/v1/rollouts", {
                "model": "digits:2.0.0", "selectors": [f"device:{d}" for d in ids],
                "waves": ["100%"], "device_timeout_s": 60, "soak_s": 0.5})
            done = wait_until(lambda: (r := client.get(f"/api/v1/rollouts/{rollout['id']}"))
                              ["state"] in ("SUCCEEDED", "ABORTED") and r, 90,
                              what="the rollout to end")
            assert done["state"] == "SUCCEEDED", done["reason"]
            wait_until(lambda: all(_device(client, d, "2.0.0") for d in ids), 30,
                       what="v2 committed on every simulated device")
    finally:
        api.stop()
        controller.stop()
        store.close()


@pytest.mark.parametrize(("name", "refusal"), [
    ("Bad user name or password", Refusal.CREDENTIALS), ("Not authorized", Refusal.CREDENTIALS),
    ("Client identifier not valid", Refusal.CLIENT_ID), ("Server unavailable", Refusal.OTHER),
    ("Bad authentication method", Refusal.OTHER)])
def test_a_refusal_is_told_by_its_reason_code(name: str, refusal: Refusal) -> None:
    assert refusal_of(ReasonCode(PacketTypes.CONNACK, name)) is refusal
