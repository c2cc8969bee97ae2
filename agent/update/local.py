"""Flashing without a fleet: install a bundle, show the slots, roll back.

``install`` goes through the same verify -> stage -> health check -> switch path
as an over-the-air update, with a zero-length probation that commits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.core import Agent
from agent.loader import load_bundle
from agent.protocol.bundle import read_bundle, read_manifest
from agent.protocol.errors import EdgefleetError
from agent.update.device import DeviceController, UpdateSettings, load_journal
from agent.update.disk import guarded
from agent.update.flow import Updater
from agent.update.slots import SLOTS, SlotStore
from agent.update.states import Event, Journal, State

__all__ = ["install", "rollback", "serve_active", "status"]

FLASH = UpdateSettings(probation_s=0.0, auto_commit=True)


def serve_active(agent: Agent, data_dir: Path, resume: bool = True) -> None:
    """Load the active slot; with ``resume``, finish an update a crash interrupted (without a
    fleet to decide, a probation commits). Raise if there is nothing to serve."""
    controller, journal = _open(agent, data_dir)
    active = controller.slots.active_bundle()
    if active is not None:
        agent.activate(load_bundle(active, agent.trusted, threads=agent.threads,
                                   keys=agent.keys))
    if resume and journal.state not in (State.IDLE, State.COMMITTED, State.ROLLED_BACK,
                                        State.FAILED):
        Updater(controller).resume(journal)
    if agent.model is None:
        raise EdgefleetError(f"no bundle is installed in {data_dir}",
                             hint="run 'edgefleet agent install BUNDLE' first")


def install(agent: Agent, data_dir: Path, bundle: Path) -> Journal:
    """Verify, stage, health-check, switch and commit ``bundle``; the old one stays on error."""
    verified = read_bundle(bundle, agent.trusted, agent.keys)  # refuses without a key
    controller, journal = _open(agent, data_dir)
    active = controller.slots.active_bundle()
    if agent.model is None and active is not None:
        agent.activate(load_bundle(active, agent.trusted, threads=agent.threads,
                                   keys=agent.keys))
    target: dict[str, object] = {"name": verified.manifest.name,
                                 "version": verified.manifest.version,
                                 "sha256": verified.sha256, "url": str(bundle.resolve()),
                                 "size": bundle.stat().st_size}
    updater = Updater(controller)
    return updater.run(updater.start(journal, target))


def rollback(agent: Agent, data_dir: Path) -> Journal:
    """Return to the previous committed bundle; SlotError, with nothing changed, when
    there is none (one bundle installed, or a rollback already done)."""
    controller, journal = _open(agent, data_dir)
    controller.slots.rollback_target()  # refuses before the journal moves
    if journal.state != State.COMMITTED:
        journal = Journal(state=State.COMMITTED, target=journal.target)
    updater = Updater(controller)
    return updater.run(updater.move(journal, Event.ROLLBACK, "rollback asked for"))


def _open(agent: Agent, data_dir: Path) -> tuple[DeviceController, Journal]:
    """The data dir's controller and journal, after sweeping what killed runs left."""
    with guarded(Path(data_dir)):
        controller = DeviceController(data_dir, agent, FLASH)
    journal = load_journal(controller.journal_path)
    controller.sweep(journal)
    return controller, journal


def status(data_dir: Path) -> dict[str, Any]:
    store = SlotStore(data_dir)
    pointer = store.pointer()
    slots = []
    for slot in SLOTS:
        path = store.bundle(slot)
        entry: dict[str, Any] = {"slot": slot, "name": None, "version": None, "sha256": None,
                                 "role": ", ".join(role for role, value in (
                                     ("active", pointer.active), ("committed", pointer.committed),
                                     ("fallback", pointer.fallback)) if value == slot)}
        if path is not None:
            try:
                manifest, sha256 = read_manifest(path)
                entry.update(name=manifest.name, version=manifest.version, sha256=sha256[:16])
            except EdgefleetError as exc:
                entry["error"] = exc.message
        slots.append(entry)
    journal = load_journal(data_dir / "journal.json")
    return {"slots": slots, "update": journal.to_dict()}
