"""``GET /metrics`` of a controller with real agents on a real Mosquitto: its families, their
names checked by ``promtool check metrics``, and a real Prometheus's helpers (the Grafana
dashboard's tests, tests/test_grafana_dashboard.py, reuse them)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.metrics import FleetMetrics, _drift_families
from edgefleet.fleet.mosquitto import free_port, stop_process
from edgefleet.fleet.store import open_store
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, wait_until
from tests.models import TrainedModels

Scrape = dict[str, list[Sample]]  # sample name -> samples
DRIFT_FAMILIES = {"edgefleet_drift_alerts", "edgefleet_drift_psi_max", "edgefleet_drift_psi_mean"}


# --- fixtures and helpers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # both LiteRT: the probation shadow re-runs the new version's inputs, by input name, on
    # the previous model, so the agreement the dashboard charts needs matching input names
    root = tmp_path_factory.mktemp("metrics-bundles")
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            "v2": make_bundle(digits_models.tflite, root / "v2.efb", signing_keys, "2.0.0",
                              rows=4)}


def _start(fleet: Fleet, versions: dict[str, Path], ids: list[str]) -> None:
    """A controller, ``ids`` serving v1 in group "cams", and v2 pushed."""
    client = fleet.start_controller()
    for device in ids:
        fleet.add_agent(device, versions["v1"])
    wait_until(lambda: _total(_scrape(fleet), "edgefleet_devices_by_version",
                              version="1.0.0") == len(ids), 30, what="devices on v1")
    client.post("/api/v1/devices/group", {"devices": ids, "group": "cams"})
    client.upload("/api/v1/models", versions["v2"].read_bytes())


def _rollout(fleet: Fleet, **options: Any) -> str:
    body = {"model": "digits:2.0.0", "selectors": ["group:cams"], "waves": ["1", "100%"],
            "device_timeout_s": 60, **options}
    return str(fleet.client().post("/api/v1/rollouts", body)["id"])


def metrics_text(fleet: Fleet) -> str:
    """The controller's ``/metrics``, as Prometheus reads it."""
    assert fleet.api is not None
    with urllib.request.urlopen(f"{fleet.api.url}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def _scrape(fleet: Fleet, kept: list[str] | None = None) -> Scrape:
    """``/metrics`` parsed; its text into ``kept`` (the last one only) if given."""
    text = metrics_text(fleet)
    if kept is not None:
        kept[:] = [text]
    return _parse(text)


def promtool_problems(text: str) -> str:
    """What ``promtool check metrics`` (the Debian package's) says of ``text``; "" if nothing."""
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: run scripts/system-deps.sh"
    done = subprocess.run([binary, "check", "metrics"], input=text.encode(), capture_output=True,
                          timeout=60, check=False)
    return (done.stdout + done.stderr).decode().strip() + ("" if done.returncode == 0 else
                                                          f" (exit {done.returncode})")


def empty_families(text: str) -> set[str]:
    """The families of ``text`` that have no sample."""
    return {f.name for f in text_string_to_metric_families(text) if not f.samples}


def reject_a_message(fleet: Fleet, device: str) -> None:
    """Publish a telemetry message that is not JSON on ``device``'s topic (reason "json")."""
    publisher = Subscriber(fleet.broker_url, [])
    try:
        publisher.publish(f"edgefleet/v1/{fleet.name}/{device}/telemetry", b"{not json")
    finally:
        publisher.close()


def _parse(text: str) -> Scrape:
    scrape: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            scrape.setdefault(sample.name, []).append(sample)
    return scrape


def _samples(scrape: Scrape, name: str, **labels: str) -> list[float]:
    return [s.value for s in scrape.get(name, [])
            if all(s.labels.get(k) == v for k, v in labels.items())]


def _total(scrape: Scrape, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples carrying ``labels`` (0 when there is none)."""
    return sum(_samples(scrape, name, **labels))


def _controller(tmp_path: Path, keys: Keys) -> FleetController:
    """A controller that is not started: its registry and telemetry are fed by hand."""
    config = ControllerConfig(fleet="f", broker_url="mqtt://127.0.0.1:1",
                              data_dir=tmp_path / "controller", public_url="http://127.0.0.1:1",
                              trusted=keys.trusted)
    return FleetController(config, open_store(f"sqlite:///{tmp_path / 'fleet.db'}"))


def _point(version: str, total: int, p50: float = 1.0) -> dict[str, Any]:
    window = {"inferences": 10, "errors": 0, "latency_p50_ms": p50,
              "latency_p95_ms": 2 * p50, "throughput_rps": 5.0}
    return {"model": "digits", "model_version": version, "inferences_total": total,
            "errors_total": 0, "versions": {version: window}, **window}


class Prometheus:
    """A real Prometheus (the Debian package) on loopback scraping ``target`` every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: run scripts/system-deps.sh"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          "scrape_configs:\n  - job_name: edgefleet\n    scrape_timeout: 1s\n"
                          f"    static_configs:\n      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; its result vector (raises on a PromQL error)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr}: {exc.read().decode()}") from None
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def stop(self) -> None:
        stop_process(self.process)  # by its PID


# --- /metrics ---------------------------------------------------------------------------

def test_metrics_show_devices_by_version_and_a_rollouts_progress(
        fleet: Fleet, versions: dict[str, Path]) -> None:
    _start(fleet, versions, ["cam-0", "cam-1"])
    reject_a_message(fleet, "cam-0")
    before = wait_until(lambda: (s := _scrape(fleet)) and _total(
        s, "edgefleet_latency_p50_seconds_gcount", version="1.0.0") == 2 and s, 30,
        what="both devices' telemetry")
    assert _total(before, "edgefleet_devices", online="true") == 2
    assert _total(before, "edgefleet_device_online", device="cam-1") == 1
    assert _total(before, "edgefleet_latency_p50_seconds_bucket", version="1.0.0", le="+Inf") == 2
    assert _total(before, "edgefleet_inferences_total", version="1.0.0") > 0
    assert _total(before, "edgefleet_throughput_requests_per_second", version="1.0.0") > 0

    rollout = _rollout(fleet, soak_s=3)
    probation_text: list[str] = []
    probation = wait_until(lambda: (s := _scrape(fleet, probation_text)) and _total(
        s, "edgefleet_rollout_devices", rollout=rollout, state="PROBATION") == 1 and _samples(
        s, "edgefleet_agreement_top1_ratio", version="2.0.0") and s, 60,
        what="the canary in probation, its agreement measured")
    assert _total(probation, "edgefleet_rollout_state", rollout=rollout, state="RUNNING") == 1
    assert _total(probation, "edgefleet_rollout_wave", rollout=rollout) == 1
    assert _total(probation, "edgefleet_rollout_waves", rollout=rollout) == 2
    assert _total(probation, "edgefleet_agreement_top1_ratio", version="2.0.0") >= 0.9
    served_v1 = _total(probation, "edgefleet_inferences_total", version="1.0.0")
    assert _total(probation, "edgefleet_messages_rejected_total", reason="json") == 1
    assert promtool_problems(probation_text[0]) == ""
    # every family has samples but drift's (no drift reference in these bundles) and the
    # API refusals' (a sample per token and route refused: none was)
    assert empty_families(probation_text[0]) <= DRIFT_FAMILIES | {"edgefleet_api_refusals"}

    done_text: list[str] = []
    done = wait_until(lambda: (s := _scrape(fleet, done_text)) and _total(
        s, "edgefleet_devices_by_version", version="2.0.0") == 2 and _total(
        s, "edgefleet_rollout_state", rollout=rollout, state="SUCCEEDED") == 1 and s, 90,
        what="the rollout succeeded, both devices on v2")
    assert _total(done, "edgefleet_rollout_devices", rollout=rollout, state="SUCCEEDED") == 2
    assert _total(done, "edgefleet_rollout_devices", rollout=rollout) == 2
    assert _total(done, "edgefleet_rollout_wave", rollout=rollout) == 2
    assert not _total(done, "edgefleet_devices_by_version", version="1.0.0")
    # v1's counter keeps what v1 served after every device moved on
    assert _total(done, "edgefleet_inferences_total", version="1.0.0") >= served_v1
    assert promtool_problems(done_text[0]) == ""


def test_inference_counters_never_go_down_when_an_agent_restarts_or_switches_version(
        tmp_path: Path, signing_keys: Keys) -> None:
    controller = _controller(tmp_path, signing_keys)
    metrics = FleetMetrics(controller)

    def served(point: dict[str, Any], ts: int) -> tuple[float, float]:
        controller.telemetry.add("cam-0", ts, point)
        scrape = _parse(metrics.render()[1].decode())
        return (_total(scrape, "edgefleet_inferences_total", version="1.0.0"),
                _total(scrape, "edgefleet_inferences_total", version="2.0.0"))

    assert served(_point("1.0.0", 100), 1) == (100, 0)
    assert served(_point("1.0.0", 5), 2) == (105, 0)  # the agent restarted
    assert served(_point("2.0.0", 7), 3) == (105, 7)  # and then switched version


class _Drift(Collector):
    """The drift families of one row shaped as ``DriftMonitor.summary()``'s."""

    def collect(self) -> Iterator[Metric]:
        row = {"model": "digits:1.0.0", "feature": "input:0", "devices": 2, "firing": 1,
               "psi_max": 0.4, "psi_mean": 0.25}
        yield from _drift_families([row], 7)


def test_drift_families_with_samples_pass_promtool() -> None:
    # the live fleets above have no drift reference; promtool lints only families with samples
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Drift())
    text = generate_latest(registry).decode()
    assert not empty_families(text)
    assert 'edgefleet_drift_psi_max{feature="input:0",model="digits",version="1.0.0"} 0.4' in text
    assert promtool_problems(text) == ""


def test_latency_histograms_count_online_devices_by_their_latest_window(
        tmp_path: Path, signing_keys: Keys) -> None:
    controller = _controller(tmp_path, signing_keys)
    for device, p50, status in [("a", 0.3, "online"), ("b", 4.0, "online"),
                                ("c", 0.3, "offline")]:
        controller.registry.status(device, status, 1)
        controller.telemetry.add(device, 1, _point("1.0.0", 10, p50))
    scrape = _parse(FleetMetrics(controller).render()[1].decode())

    def devices_at_most(le: str) -> float:
        return _total(scrape, "edgefleet_latency_p50_seconds_bucket", version="1.0.0", le=le)

    # devices send milliseconds; buckets and sum are in seconds
    assert (devices_at_most("0.00025"), devices_at_most("0.0005"), devices_at_most("0.005"),
            devices_at_most("+Inf")) == (0, 1, 2, 2)
    assert _total(scrape, "edgefleet_latency_p50_seconds_gsum",
                  version="1.0.0") == pytest.approx(0.0043)
    assert _total(scrape, "edgefleet_latency_p95_seconds_bucket", version="1.0.0",
                  le="0.001") == 1
    assert _total(scrape, "edgefleet_inferences_total", version="1.0.0") == 30  # all devices
