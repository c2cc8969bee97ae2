"""Flashing without a fleet: install a bundle, show the slots, roll back, remove a model.

``install`` goes through the same verify -> stage -> health check -> switch path
as an over-the-air update, with a zero-length probation that commits. ``install``,
``rollback``, ``serve_active`` and ``status`` work on one model's folder (laid out as in
:mod:`edgefleet.agent.update.slots`); ``install_model``, ``rollback_model``,
``remove_model``, ``serve_models`` and ``models_status`` on a device's data dir, one folder
a model name (:mod:`edgefleet.agent.update.layout`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgefleet.agent.core import Agent
from edgefleet.agent.errors import AgentError
from edgefleet.agent.loader import load_bundle
from edgefleet.agent.models import ModelSet, UnknownModelError
from edgefleet.agent.protocol.bundle import read_bundle, read_manifest
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.protocol.payloads import MAX_MODELS
from edgefleet.agent.update.device import DeviceEffects, UpdateSettings, load_journal
from edgefleet.agent.update.disk import StorageError, check_free, discard, guarded
from edgefleet.agent.update.flow import Updater
from edgefleet.agent.update.layout import (
    active_name,
    in_flight,
    installed,
    migrate,
    model_dir,
    pending,
    sweep_failed,
)
from edgefleet.agent.update.slots import BUNDLE, SLOTS, SlotError, SlotStore, read_pointer
from edgefleet.agent.update.states import TERMINAL, Event, Journal, UpdateState
from edgefleet.agent.update.target import UpdateTarget

__all__ = ["TooManyModelsError", "existing", "install", "install_model", "models_status",
           "remove_model", "rollback", "rollback_model", "serve_active", "serve_models", "status"]



class TooManyModelsError(AgentError):
    """A model added to a device that serves the most models it may already."""


FLASH = UpdateSettings(probation_s=0.0, auto_commit=True)


def serve_active(agent: Agent, data_dir: Path, resume: bool = True) -> None:
    """Load the active slot; with ``resume``, finish an update a crash interrupted (without a
    fleet to decide, a probation commits). Raise if there is nothing to serve."""
    effects, journal = _open(agent, data_dir)
    active = effects.slots.active_bundle()
    if active is not None:
        agent.activate(load_bundle(active, agent.trusted, threads=agent.threads,
                                   keys=agent.keys))
    if resume and journal.state not in TERMINAL:
        Updater(effects).resume(journal)
    if agent.model is None:
        raise EdgefleetError(f"no bundle is installed in {data_dir}",
                             hint="run 'edgefleet agent install BUNDLE' first")


def install(agent: Agent, data_dir: Path, bundle: Path) -> Journal:
    """Verify, stage, health-check, switch and commit ``bundle``; the old one stays on error."""
    verified = read_bundle(bundle, agent.trusted, agent.keys)  # refuses without a key
    effects, journal = _open(agent, data_dir)
    active = effects.slots.active_bundle()
    if agent.model is None and active is not None:
        agent.activate(load_bundle(active, agent.trusted, threads=agent.threads,
                                   keys=agent.keys))
    target = UpdateTarget(name=verified.manifest.name, version=verified.manifest.version,
                          sha256=verified.sha256, url=str(bundle.resolve()),
                          size=bundle.stat().st_size,
                          auto_commit=True)  # a runner resuming it after a crash commits too
    with guarded(data_dir):  # refused before the journal moves: nothing is written
        check_free(data_dir, target.size or 0)
    before = _journal_bytes(effects)
    updater = Updater(effects)
    try:
        return updater.run(updater.start(journal, target))
    except StorageError as exc:  # the disk refused a journal write: the attempt is given up
        failed = Journal(target=target).enter(UpdateState.FAILED, effects.now_ms(), exc.message)
        _give_up(effects, failed, before)
        raise


def _journal_bytes(effects: DeviceEffects) -> bytes | None:
    """The journal as it is before an attempt (None: there is none yet)."""
    try:
        return effects.journal_path.read_bytes()
    except FileNotFoundError:
        return None


def _give_up(effects: DeviceEffects, failed: Journal, before: bytes | None) -> None:
    """A disk-full attempt that never switched ends: first its files go (which frees room),
    then the failure is recorded, else the journal of before is put back."""
    slot = effects.slot_of(failed)  # the staged copy, if the attempt got that far
    if slot is not None and slot == effects.slots.pointer().active:
        return  # switched: the journal left in flight resumes at the next start
    try:
        _remove_attempt(effects, failed, slot)
        effects.save(failed)
    except StorageError:
        _restore(effects, before)


def _remove_attempt(effects: DeviceEffects, failed: Journal, slot: str | None) -> None:
    """The download, its partial file and a staged copy in a slot nothing points at."""
    download = effects.download_path(failed)
    with guarded(download):
        discard(download, download.with_suffix(".efb.part"))
    pointer = effects.slots.pointer()
    if slot is not None and slot not in (pointer.committed, pointer.fallback):
        staged = effects.slots.bundle(slot)
        with guarded(effects.data_dir / "slots"):
            discard(*([staged] if staged else []))


def _restore(effects: DeviceEffects, before: bytes | None) -> None:
    """Put the journal of before back; when even that cannot be written, the start-up sweep
    finds a local install in flight and records it failed."""
    try:
        if before is None:
            effects.journal_path.unlink(missing_ok=True)
        else:
            atomic_write(effects.journal_path, before)
    except OSError:  # the disk refuses even this: the start-up sweep ends the attempt
        return


def rollback(agent: Agent, data_dir: Path) -> Journal:
    """Return to the previous committed bundle; SlotError, with nothing changed, when
    there is none (one bundle installed, or a rollback already done)."""
    effects, journal = _open(agent, existing(data_dir))
    effects.slots.rollback_target()  # refuses before the journal moves
    if journal.state != UpdateState.COMMITTED:
        journal = Journal(state=UpdateState.COMMITTED, target=journal.target)
    updater = Updater(effects)
    return updater.run(updater.move(journal, Event.ROLLBACK, "rollback asked for"))


def _open(agent: Agent, data_dir: Path) -> tuple[DeviceEffects, Journal]:
    """The data dir's effects and journal, after sweeping what killed runs left."""
    with guarded(Path(data_dir)):
        effects = DeviceEffects(data_dir, agent, FLASH)
    journal = load_journal(effects.journal_path)
    effects.sweep(journal)
    return effects, journal


def existing(data_dir: Path) -> Path:
    """``data_dir``, refused when it does not exist (a command that only reads creates none)."""
    if not Path(data_dir).is_dir():
        raise EdgefleetError(f"there is no data dir {data_dir}",
                             hint="pass the --data-dir a bundle was installed into "
                                  "('edgefleet agent install BUNDLE --data-dir DIR')")
    return Path(data_dir)


def status(data_dir: Path, *more: Path) -> dict[str, Any]:
    """The slots and update of the model in ``data_dir``; reads only (never makes a folder).
    Each item missing there is looked for in ``more`` (a one-model layout a migration has
    not moved, or moved part of, yet)."""
    folders = (existing(data_dir), *more)
    pointer = read_pointer(_first(folders, "slots.json"))
    slots = []
    for slot in SLOTS:
        path = _first(folders, f"slots/{slot}/{BUNDLE}")
        entry: dict[str, Any] = {"slot": slot, "name": None, "version": None, "sha256": None,
                                 "role": ", ".join(role for role, value in (
                                     ("active", pointer.active), ("committed", pointer.committed),
                                     ("fallback", pointer.fallback)) if value == slot)}
        if path.exists():
            try:
                manifest, sha256 = read_manifest(path)
                entry.update(name=manifest.name, version=manifest.version, sha256=sha256[:16])
            except EdgefleetError as exc:
                entry["error"] = exc.message
        slots.append(entry)
    journal = load_journal(_first(folders, "journal.json"))
    return {"slots": slots, "update": journal.to_dict()}


def _first(folders: tuple[Path, ...], item: str) -> Path:
    """``item`` in the first of ``folders`` that has it (else in the first one)."""
    return next((f / item for f in folders if (f / item).exists()), folders[0] / item)


def install_model(models: ModelSet, data_dir: Path, bundle: Path) -> Journal:
    """Add the bundle's model, or replace the bundle of the model of its name (the others
    are not touched)."""
    name = read_bundle(bundle, models.trusted, models.keys).manifest.name  # refuses early
    with guarded(Path(data_dir)):
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    migrate(data_dir)
    sweep_failed(data_dir)
    names = installed(data_dir)
    if name not in names and len(names) >= MAX_MODELS:
        raise TooManyModelsError(
            f"{data_dir} holds {len(names)} models already, the most a device serves "
            f"({MAX_MODELS}): {bundle} (model {name}) was not installed",
            hint="remove one first: 'edgefleet agent remove NAME' (see 'edgefleet agent status')")
    agent = models.agent(name)
    try:
        return install(agent, model_dir(data_dir, name), bundle)
    finally:
        if agent.model is None:  # nothing of it serves: not a model of this device
            models.remove(name)


def rollback_model(models: ModelSet, data_dir: Path, name: str) -> Journal:
    """Return model ``name`` to its previous committed bundle; the others stay."""
    folder = _installed_dir(data_dir, name)
    _check_rollback_target(folder, name)
    return rollback(models.agent(name), folder)


def _check_rollback_target(folder: Path, name: str) -> None:
    """Refuse a rollback onto a bundle of another model (the slot a one-model data dir kept
    from before a rollout replaced its model by another): it would serve that model under
    this one's name."""
    store = SlotStore(folder)
    path = store.bundle(store.rollback_target().active)  # SlotError: nothing to go back to
    try:
        other = read_manifest(path)[0].name if path is not None else name
    except EdgefleetError:
        return  # a torn slot: the rollback refuses it itself
    if other != name:
        raise SlotError(f"model {name} has no earlier bundle of its own: its previous slot "
                        f"holds model {other}", hint=f"install an earlier bundle of {name} "
                        "with 'edgefleet agent install BUNDLE' instead")


def remove_model(data_dir: Path, name: str) -> list[str]:
    """Delete model ``name``'s folder (its slots, journal, downloads); the names left."""
    folder = _installed_dir(data_dir, name)
    with guarded(folder):
        shutil.rmtree(folder)
    return installed(data_dir)


def _installed_dir(data_dir: Path, name: str) -> Path:
    migrate(existing(data_dir))
    if name not in installed(data_dir):
        raise UnknownModelError(f"no model {name[:100]!r} is installed in {data_dir}; "
                                f"installed: {', '.join(installed(data_dir)) or 'none'}",
                                hint="see 'edgefleet agent status'")
    return model_dir(data_dir, name)


def serve_models(models: ModelSet, data_dir: Path, resume: bool = True) -> list[str]:
    """Load every installed model's active slot (a data dir of one model migrated first,
    the folders of models that never installed swept); raise when there is none. A model
    that cannot be served is left out, marked broken with its reason (the server is then not
    ready, the fleet is told); the reasons are returned. A model whose first install a crash
    interrupted is kept, empty, when ``resume`` is off: its update runner resumes it."""
    migrate(existing(data_dir))
    sweep_failed(data_dir)
    names, problems = installed(data_dir), []
    for name in names[MAX_MODELS:]:
        problems.append(f"{name}: not served, a device serves at most {MAX_MODELS} models "
                        f"(remove one with 'edgefleet agent remove NAME')")
        models.mark_broken(name, problems[-1])
    for name in names[:MAX_MODELS]:
        folder = model_dir(data_dir, name)
        try:
            _check_named(folder, name)
            serve_active(models.agent(name), folder, resume=resume)
        except EdgefleetError as exc:
            agent = models.get(name)
            if not resume and in_flight(folder) and agent is not None and agent.model is None:
                continue  # its runner resumes the update a crash interrupted
            if agent is not None:
                models.remove(name)
            problems.append(f"{name}: {exc.message}")
            models.mark_broken(name, exc.message)
    if not any(agent.model is not None or in_flight(model_dir(data_dir, name))
               for name, agent in models.items()):
        raise EdgefleetError(f"no bundle is installed in {data_dir}"
                             + (f" that can be served ({'; '.join(problems)})" if problems else ""),
                             hint="run 'edgefleet agent install BUNDLE' first")
    return problems


def _check_named(folder: Path, name: str) -> None:
    """Refuse a folder whose active bundle is of another model (it would be served under a
    name that is not its own)."""
    other = active_name(folder)
    if other is not None and other != name:
        raise EdgefleetError(f"the folder of model {name} holds an active bundle of model "
                             f"{other}", hint=f"remove one of them with 'edgefleet agent "
                                              f"remove {name}', then install it again")


def models_status(data_dir: Path) -> dict[str, Any]:
    """Every installed model with its slots and its update; reads only: a one-model layout
    not migrated yet (or part-way) is shown as the model it will be moved into, as it is."""
    root = existing(data_dir)
    shown = {name: status(model_dir(root, name)) for name in installed(root)}
    legacy = pending(root)
    if legacy is not None:
        folder = model_dir(root, legacy)
        shown[legacy] = status(*((folder, root) if folder.is_dir() else (root,)))
    return {"models": [{"model": name, **shown[name]} for name in sorted(shown)]}
