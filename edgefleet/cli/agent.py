"""``edgefleet agent``: run the agent on a device."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.markup import escape

from edgefleet.agent.errors import NothingToServeError
from edgefleet.agent.lock import hold, holding
from edgefleet.agent.models import ModelSet
from edgefleet.agent.ports import check_free
from edgefleet.agent.protocol.encryption import DecryptionKeys
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.keyring import trust_at_start
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.agent.protocol.update_state import UpdateState
from edgefleet.agent.systemd import HOST_NAME, Unit
from edgefleet.agent.update import download
from edgefleet.cli import http_options as web
from edgefleet.cli.extras import needs
from edgefleet.cli.logs import LogFormat, LogFormatOpt, agent_context, fail_in, setup_logging
from edgefleet.cli.mqtt_options import (
    CertOpt,
    KeyOpt,
    PasswordFileOpt,
    UsernameOpt,
    mqtt_security,
)
from edgefleet.cli.output import console, emit, err_console, fail, table
from edgefleet.cli.params import device_id_option, fleet_option, host_port, http_address
from edgefleet.cli.service import ServiceSpec, service_app, subcommand

if TYPE_CHECKING:  # the service needs the [agent] extra: loaded by the command that runs it
    from edgefleet.agent.service import AgentService

app = typer.Typer(help="Run models on this device.", no_args_is_help=True)

DEFAULT_DATA_DIR = Path(os.environ.get("EDGEFLEET_DATA_DIR", "~/.local/share/edgefleet"))


def _trusted(paths: list[Path], data_dir: Path) -> TrustedKeys:
    """The provisioned keys (``--trusted-key``, else DATA_DIR/keys) until the fleet's keyring
    replaces them: once one was accepted (DATA_DIR/keyring.json), exactly its keys."""
    candidates = paths or [data_dir / "keys"]
    provisioned = TrustedKeys.from_paths([p for p in candidates if p.exists()])
    trusted = trust_at_start(provisioned, data_dir)
    if not len(trusted):
        raise NothingToServeError(
            f"no trusted public keys in {', '.join(map(str, candidates))}",
            hint="pass --trusted-key KEY.pub (from 'edgefleet keys generate')")
    return trusted


def _decryption(paths: list[Path], data_dir: Path) -> DecryptionKeys:
    """Keys for encrypted models: ``--decrypt-key`` files or folders, else DATA_DIR/keys/*.x25519
    (none is fine: an encrypted bundle is then refused with the key ids it needs)."""
    candidates = paths or [data_dir / "keys"]
    return DecryptionKeys.from_paths([p for p in candidates if p.exists() or paths])


DataDir = Annotated[Path, typer.Option(help="Each model's slots and journal, spool, keys")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="The model's name (its bundle's name); default: the one installed")]
_SLOT_COLUMNS = ["model", "slot", "role", "name", "version", "sha256"]
TrustedKey = Annotated[list[Path] | None, typer.Option(
    help=".pub file or folder of them; default DATA_DIR/keys")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON")]
DecryptKey = Annotated[list[Path] | None, typer.Option(
    help="X25519 private key (NAME.x25519) or folder of them, for encrypted models; "
         "default DATA_DIR/keys")]


@app.command()
@needs("agent install", "agent")
def install(
    bundle: Annotated[Path, typer.Argument(help="Bundle (.efb) to install")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    trusted_key: TrustedKey = None,
    decrypt_key: DecryptKey = None,
    as_json: JsonOpt = False,
) -> None:
    """Flash a bundle: verify, stage in the free slot of its model, health-check, switch,
    commit. A bundle of a model not installed yet adds that model; the others stay."""
    from edgefleet.agent.update import local

    data = data_dir.expanduser()
    try:
        with holding(data, "install", f"install {bundle}"):
            models = ModelSet(_trusted(trusted_key or [], data),
                              keys=_decryption(decrypt_key or [], data))
            journal = local.install_model(models, data, bundle)
    except EdgefleetError as exc:
        fail(exc, as_json)
    _show_result(journal.to_dict(), data, as_json)
    if journal.state is not UpdateState.COMMITTED:
        _failed(journal.detail, as_json)


@app.command()
def status(data_dir: DataDir = DEFAULT_DATA_DIR, as_json: JsonOpt = False) -> None:
    """Every model: its slots, the active and previous bundle, and its update state."""
    try:
        data = _models_status(data_dir.expanduser())
    except EdgefleetError as exc:
        fail(exc, as_json)
    emit(data, as_json, table(f"slots in {data_dir}", data["slots"], _SLOT_COLUMNS))
    if not as_json:
        for model in data["models"]:
            update = model["update"]
            console.print(escape(f"{model['model']}: update {update['state']} "
                                 f"{update['target'].get('version') or ''} {update['detail']}"))
            for slot in model["slots"]:
                if "active" in slot["role"] and slot.get("error"):
                    console.print(escape(f"{model['model']}: not served: {slot['error']}"),
                                  soft_wrap=True)


def _models_status(data: Path) -> dict[str, Any]:
    """Every model with its slots, and the slots of all of them in one list."""
    from edgefleet.agent.update import local

    shown = local.models_status(data)
    slots = [{"model": model["model"], **slot} for model in shown["models"]
             for slot in model["slots"]]
    return {"models": shown["models"], "slots": slots}


@app.command()
def remove(name: Annotated[str, typer.Argument(help="The model to remove (see 'agent status')")],
           data_dir: DataDir = DEFAULT_DATA_DIR, as_json: JsonOpt = False) -> None:
    """Delete a model from this device: its slots, journal and downloads (the others stay).
    For a stopped agent: refused while an agent runs on the data dir."""
    from edgefleet.agent.update import local

    data = data_dir.expanduser()
    try:
        with _changing(data, "remove", f"remove model {name}"):
            left = local.remove_model(data, name)
    except EdgefleetError as exc:
        fail(exc, as_json)
    emit({"removed": name, "models": left}, as_json,
         f"removed {name}; installed: {', '.join(left) or 'none'}")


@app.command()
@needs("agent rollback", "agent")
def rollback(data_dir: DataDir = DEFAULT_DATA_DIR, model: ModelOpt = None,
             trusted_key: TrustedKey = None, decrypt_key: DecryptKey = None,
             as_json: JsonOpt = False) -> None:
    """Return a model to its previous committed bundle (the others stay)."""
    from edgefleet.agent.update import local

    data = data_dir.expanduser()
    try:
        with _changing(data, "rollback", "roll back"):
            name = model or _only_model(local.existing(data))  # before the keys are looked for
            models = ModelSet(_trusted(trusted_key or [], data),
                              keys=_decryption(decrypt_key or [], data))
            journal = local.rollback_model(models, data, name)
    except EdgefleetError as exc:
        fail(exc, as_json)
    _show_result(journal.to_dict(), data, as_json)
    if journal.state is not UpdateState.ROLLED_BACK:
        _failed(journal.detail, as_json)


def _changing(data: Path, command: str, doing: str) -> AbstractContextManager[None]:
    """The data dir's lock while ``command`` changes it (a data dir that does not exist is
    not made: the command refuses it)."""
    return holding(data, command, doing) if data.is_dir() else nullcontext()


def _only_model(data: Path) -> str:
    """The one model installed in ``data``; refused, naming them, when there are several."""
    from edgefleet.agent.update import layout

    layout.migrate(data)
    names = layout.installed(data)
    if not names:
        raise EdgefleetError(f"{data} holds no model: there is nothing to roll back",
                             hint="install one with 'edgefleet agent install BUNDLE'")
    if len(names) != 1:
        raise EdgefleetError(f"{data} holds {len(names)} models: {', '.join(names)}",
                             hint="name one with --model NAME")
    return names[0]


def _show_result(journal: dict[str, object], data: Path, as_json: bool) -> None:
    result = {"update": journal, **_models_status(data)}
    emit(result, as_json, table(f"{journal['state']}: {journal['detail'] or 'done'}",
                                result["slots"], _SLOT_COLUMNS))


def _failed(detail: str, as_json: bool) -> NoReturn:
    """The update ran and did not end where asked: exit 1 (2 is for a refusal before any
    step), with its reason on one line of stderr; the model served is the one shown."""
    if not as_json:
        err_console.print(escape(f"error: {detail}"), soft_wrap=True)
    raise typer.Exit(1)


@app.command()
@needs("agent run", "agent")
def run(
    bundle: Annotated[list[Path] | None, typer.Option(
        help="Bundle to install when DATA_DIR has no model of its name yet (repeat it for "
             "several models; later updates come from the fleet)")] = None,
    fleet: Annotated[str, typer.Option(help="Fleet name (MQTT topic level)",
                                       callback=fleet_option)] = "default",
    device_id: Annotated[str, typer.Option(help="This device's id",
                                           callback=device_id_option)] = "device-1",
    broker: Annotated[str | None, typer.Option(
        help="mqtt://HOST:PORT or mqtts://HOST:8883; none = no MQTT")] = None,
    ca: Annotated[Path | None, typer.Option(
        "--ca", help="The fleet CA's certificate: checks the broker (turns TLS on) and an "
                     "https:// controller's bundle downloads", exists=True, dir_okay=False,
        readable=True, resolve_path=True)] = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    http: Annotated[str | None, typer.Option(
        help="HOST:PORT (IPv4 or a host name; port 0: any free one) for the KServe v2 "
             "server",
        callback=http_address)] = None,
    http_max_body: web.MaxBodyOpt = web.MAX_BODY,
    http_max_json: web.MaxJsonOpt = web.MAX_JSON,
    http_timeout: web.TimeoutOpt = web.TIMEOUT_S,
    http_min_body_rate: web.MinBodyRateOpt = web.MIN_BODY_RATE,
    http_max_connections: web.MaxConnectionsOpt = web.MAX_CONNECTIONS,
    http_tls_cert: web.TlsCertOpt = None,
    http_tls_key: web.TlsKeyOpt = None,
    http_token_file: web.TokenFileOpt = None,
    http_client_ca: web.ClientCaOpt = None,
    trusted_key: Annotated[list[Path] | None, typer.Option(
        help=".pub file or folder of them; default DATA_DIR/keys")] = None,
    decrypt_key: DecryptKey = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    threads: Annotated[int, typer.Option(min=1, help="Inference threads")] = 1,
    telemetry_interval: Annotated[float, typer.Option(min=0.05, help="Seconds")] = 10.0,
    spool_max_bytes: Annotated[int, typer.Option(min=4096, help="Disk bound while offline")] =
    8 * 1024 * 1024,
    profile: Annotated[str | None, typer.Option(help="Device profile name")] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label", help="KEY=VALUE (repeatable): reported to the fleet, which selects "
                        "devices by it (--to label:KEY=VALUE)")] = None,
    probation: Annotated[float, typer.Option(help="Probation window after a switch, seconds")
                         ] = 60.0,
    max_error_rate: Annotated[float, typer.Option(
        help="Roll back by itself above this error rate in probation")] = 0.05,
    latency_budget_ms: Annotated[float, typer.Option(
        help="Refuse an update whose health check runs slower than this per sample")] = 1000.0,
    ha_discovery: Annotated[bool, typer.Option(
        "--ha-discovery", help="Publish Home Assistant MQTT discovery configs (retained)")
                            ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Serve a bundle, report telemetry over MQTT, answer KServe v2 requests over HTTP."""
    logs = setup_logging(log_format, log_level, "%(asctime)s %(levelname)s %(message)s",
                         lambda: {"fleet": fleet, "device": device_id})
    data = data_dir.expanduser()
    try:
        security = mqtt_security(ca, cert, key, username, password_file)
        if ca is not None:  # the fleet CA also signs the controller's HTTPS certificate
            download.trust_ca(ca)
        if http:  # a taken port is refused before anything is installed
            check_free(*host_port(http, "--http"), "--http HOST:PORT")
        http_security = web.http_security(http_tls_cert, http_tls_key, http_token_file,
                                          http_client_ca, http or "")
        lock = hold(data)  # held while the agent runs: install, remove, rollback wait for it
        models = ModelSet(_trusted(trusted_key or [], data), threads=threads,
                          keys=_decryption(decrypt_key or [], data))
        _load_or_refuse(models, data, bundle or [], resume=broker is None)
    except EdgefleetError as exc:
        fail_in(log_format, exc)
    from edgefleet.agent.service import AgentService, ServiceConfig

    host, port = host_port(http, "--http") if http else ("127.0.0.1", None)
    config = ServiceConfig(fleet=fleet, device_id=device_id, data_dir=data, broker_url=broker,
                           http_host=host, http_port=port,
                           http_limits=web.http_limits(http_max_body, http_max_json, http_timeout,
                                                       http_min_body_rate, http_max_connections),
                           http_security=http_security,
                           telemetry_interval_s=telemetry_interval,
                           spool_max_bytes=spool_max_bytes, profile=profile,
                           labels=_labels(label or [], log_format),
                           probation_s=probation, max_error_rate=max_error_rate,
                           latency_budget_ms=latency_budget_ms,
                           ha_discovery=ha_discovery, mqtt_security=security,
                           step_delay_s=float(os.environ.get("EDGEFLEET_FAULT_STEP_DELAY", 0)))
    service = AgentService(config, models)
    if logs is not None:
        logs.context = agent_context(service)
    _serve_until_signalled(service, log_format)
    lock.close()


def _load_or_refuse(models: ModelSet, data: Path, bundles: list[Path], resume: bool) -> None:
    """Serve every model's active slot; install each of ``bundles`` whose model has none. A
    ``--bundle`` that cannot be read or installed is warned about and the models installed
    are served; two of one model are refused (which one was meant is not for the agent to
    guess)."""
    from edgefleet.agent.update import local

    log = logging.getLogger("edgefleet")
    for bundle, name in _bundle_names(bundles).items():
        try:
            if name.startswith("?"):
                raise EdgefleetError(name[1:])
            _install_when_new(models, data, bundle, name)
        except EdgefleetError as exc:
            log.warning("--bundle %s not installed: %s (serving the models installed)",
                        bundle, exc.message)
    try:
        for problem in local.serve_models(models, data, resume=resume):
            log.warning("not serving %s", problem)
    except EdgefleetError as exc:
        raise NothingToServeError(f"nothing to serve: {data}: {exc.message}",
                                  hint=exc.hint or "pass a bundle that verifies") from exc


def _bundle_names(bundles: list[Path]) -> dict[Path, str]:
    """Each ``--bundle`` with its model name ("?" and the reason: it cannot be read, warned
    about later); two bundles of one model are refused."""
    from edgefleet.agent.protocol.bundle import read_manifest

    named: dict[Path, str] = {}
    seen: dict[str, Path] = {}
    for bundle in bundles:
        try:
            name = read_manifest(bundle)[0].name
        except EdgefleetError as exc:
            name = "?" + exc.message
        except OSError as exc:
            name = f"?cannot read {bundle}: {exc.strerror or exc}"
        if name in seen:
            raise EdgefleetError(f"--bundle {seen[name]} and --bundle {bundle} are both of "
                                 f"model {name}: pass one bundle a model",
                                 hint="drop one of them; a newer version of an installed "
                                      "model comes with 'edgefleet agent install' or a rollout")
        seen[name] = bundle
        named[bundle] = name
    return named


def _install_when_new(models: ModelSet, data: Path, bundle: Path, name: str) -> None:
    """Install ``bundle`` when no model of its name is installed in ``data``."""
    from edgefleet.agent.update import layout, local

    if data.is_dir():
        layout.migrate(data)
        if name in layout.installed(data):
            return
    journal = local.install_model(models, data, bundle)
    if name not in models:
        raise NothingToServeError(f"{bundle} was not installed: {journal.detail}")


def _serve_until_signalled(service: AgentService, log_format: LogFormat) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service.start()
    except EdgefleetError as exc:  # e.g. TLS files that cannot be used, a port in use
        service.stop()
        fail_in(log_format, exc)
    where = f" on {service.http.base_url}" if service.http else ""
    for name, agent in service.models.items():
        model = agent.model
        if model is None:  # a first install a crash cut: its update runner resumes it
            logging.getLogger("edgefleet").info("%s: its update in flight resumes", name)
            continue
        logging.getLogger("edgefleet").info("serving %s %s%s", model.name, model.version, where)
    stop.wait()
    service.stop()
    service.models.close()  # the drift workers finish what they were handed


def _device_id_default(args: Sequence[str]) -> list[str]:
    given = any(a == "--device-id" or a.startswith("--device-id=") for a in args)
    return [] if given else ["--device-id", HOST_NAME]


app.add_typer(service_app(ServiceSpec(
    Unit("edgefleet.agent", "edgefleet-agent.service"), ("agent", "run"),
    lambda: subcommand(app, "run"),
    user="edgefleet", data_dir=Path("/var/lib/edgefleet"), defaults=_device_id_default)),
    name="service")


def _labels(items: list[str], log_format: LogFormat) -> dict[str, str]:
    """``--label KEY=VALUE`` options, checked as the reported state will be."""
    from edgefleet.agent.protocol.payloads import MAX_LABELS, ReportedState

    labels = dict(item.partition("=")[::2] for item in items)
    try:
        if any("=" not in item for item in items) or len(labels) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} of them, each KEY=VALUE")
        ReportedState(fleet="f", device="d", agent_version="0", labels=labels)
    except ValueError as exc:
        fail_in(log_format, EdgefleetError(
            f"--label {' '.join(items)[:80]!r} is not allowed: {str(exc).splitlines()[0]}",
            hint="write --label site=plant-a: a key of letters, digits, '.', '_' or '-', "
                 "a value of 1-64 printable characters"))
    return labels
