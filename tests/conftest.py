"""Shared fixtures: a real trained model, signing keys and signed bundles (made once a session)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from edgefleet.agent.runtime import load_runtime
from edgefleet.converter.package import PackageSpec, package_model
from edgefleet.fleet.mosquitto import MosquittoBroker
from edgefleet.fleet.store import Store, open_store
from tests.brokers import AmqttBroker
from tests.models import TrainedModels, train_digits_cnn
from tests.postgres import postgres_schema

DIGIT_LABELS = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class Keys:
    secret: Path
    public: Path

    @property
    def signer(self) -> SigningKey:
        return SigningKey.load(self.secret)

    @property
    def trusted(self) -> TrustedKeys:
        return TrustedKeys.from_paths([self.public])


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory: pytest.TempPathFactory) -> TrainedModels:
    return train_digits_cnn(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    secret, public = generate_keypair(tmp_path_factory.mktemp("keys"), "dev")
    return Keys(secret, public)


def make_bundle(model: Path, out: Path, keys: Keys, version: str = "1.0.0",
                rows: int = 8, name: str = "digits", **extra: object) -> Path:
    """Package ``model`` (tflite or onnx) as the digits classifier (named ``name``), health
    vectors from digits."""
    from tests.models import load_digits

    fmt = model.suffix.lstrip(".")
    runtime = load_runtime(model.read_bytes(), fmt)
    x = load_digits().x_test[:rows]
    spec = PackageSpec(name, version, {runtime.inputs[0].name: x},
                       task="classification", labels=DIGIT_LABELS, **extra)  # type: ignore[arg-type]
    return package_model(model, out, spec, keys.signer)


@pytest.fixture(scope="session")
def digits_bundles(digits_models: TrainedModels, signing_keys: Keys,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bundles")
    return {fmt: make_bundle(getattr(digits_models, fmt), out / f"digits-{fmt}.efb", signing_keys)
            for fmt in ("tflite", "onnx")}


@pytest.fixture()
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private Mosquitto on a free port (never the system's), stopped by its PID."""
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture(params=["mosquitto", "amqtt"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MosquittoBroker |
                                                                             AmqttBroker]:
    """The same test against Mosquitto and against the embedded broker."""
    broker: MosquittoBroker | AmqttBroker
    if request.param == "mosquitto":
        broker = MosquittoBroker(workdir=tmp_path / "mosquitto").start()
    else:
        broker = AmqttBroker().start()
    yield broker
    broker.stop()


@pytest.fixture()
def fleet_name(request: pytest.FixtureRequest) -> str:
    """A topic prefix unique to the test."""
    return "t" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]


@pytest.fixture()
def fleet(mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
          signing_keys: Keys) -> Iterator[Any]:
    """A fleet on one machine (``tests.fleet_harness.Fleet``) on a private Mosquitto; the
    controller is not started yet. Stopped, with its agents, at the end."""
    from tests.fleet_harness import Fleet

    harness = Fleet(fleet_name, mosquitto.url, tmp_path, signing_keys)
    yield harness
    harness.stop()


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture()
def browser() -> Iterator[Any]:
    """Headless Chromium from the system packages (Selenium Manager never downloads)."""
    from selenium.webdriver import Chrome
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-dev-shm-usage",
                     "--window-size=1920,1080", "--lang=en-GB"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'fleet.db'}"
    else:
        yield from postgres_schema()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from postgres_schema()


@pytest.fixture
def reopen(store_url: str) -> Iterator[Callable[[], Store]]:
    """Opens the test's store (again); every store it opened is closed at the end."""
    opened: list[Store] = []

    def opener() -> Store:
        opened.append(open_store(store_url))
        return opened[-1]

    yield opener
    for store in opened:
        store.close()


@pytest.fixture(scope="session")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four in-domain photos of people (calibration, evaluation) for the published
    face and body models."""
    from tests import wheel_models

    return wheel_models.domain_images("people", tmp_path_factory.mktemp("people"), count=4)
