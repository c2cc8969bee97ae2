"""The data dir of a device that serves several models: one folder a model, by name.

::

    DATA_DIR/
      models/<name>/slots/a|b/bundle.efb    the model's A/B slots
      models/<name>/slots.json              its pointer {"active", "committed", "fallback"}
      models/<name>/journal.json            its update journal
      models/<name>/downloads/              its partial downloads
      keys/, keyring.json, spool/, events.seq   shared by every model

A model's folder is laid out exactly as the whole data dir of an agent that served one
model (:mod:`edgefleet.agent.update.slots`), so every update step works on it unchanged.
A data dir of that earlier layout (``slots.json`` and ``slots/`` at its root) is moved
into ``models/<name>/``, ``<name>`` read from the manifest of the bundle its pointer says
is active (a rollout of another model may have replaced the model of the other slot):
:func:`migrate`. The name is decided once and written first (``models/.migrating``), then
each item moves by a rename, the pointer (``slots.json``) last, and the marker is removed:
a migration killed at any point is finished by the next one into the folder its marker
names (never split between two folders because a pointer moved ahead of its slots). A
model folder whose active bundle names another model (what an earlier migration named
after the wrong slot) is renamed after it when no folder of that name exists.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from edgefleet.agent.protocol.bundle import read_manifest
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.schema import NAME_PATTERN
from edgefleet.agent.update.disk import guarded
from edgefleet.agent.update.slots import BUNDLE
from edgefleet.agent.update.states import TERMINAL, UpdateState

__all__ = ["MARKER", "MODELS", "active_name", "in_flight", "installed", "migrate", "model_dir",
           "pending", "sweep_failed"]

log = logging.getLogger(__name__)

MODELS = "models"
# what an agent of one model kept at the data dir's root, moved in this order (pointer last)
_LEGACY = ("journal.json", "downloads", "slots", "slots.json")
MARKER = ".migrating"  # in models/: the folder a migration on its way moves into
_NAME = re.compile(NAME_PATTERN)


def model_dir(data_dir: Path, name: str) -> Path:
    """The folder of model ``name`` (a bundle name: never a path of its own)."""
    if not _NAME.fullmatch(name):
        raise EdgefleetError(f"{name[:80]!r} is not a model name",
                             hint="a model is named by its bundle's manifest name")
    return Path(data_dir) / MODELS / name


def installed(data_dir: Path) -> list[str]:
    """The names of the models installed in ``data_dir`` (a pointer or a slot written, or
    an update in flight: a first install a crash interrupted is resumed, not forgotten)."""
    return [p.name for p in _folders(data_dir) if _has_model(p) or in_flight(p)]


def _folders(data_dir: Path) -> list[Path]:
    root = Path(data_dir) / MODELS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def _has_model(folder: Path) -> bool:
    return (folder / "slots.json").exists() or any((folder / "slots").glob("*/bundle.efb"))


def in_flight(folder: Path) -> bool:
    """Whether the journal of this model folder is on its way (not terminal)."""
    try:
        state = json.loads((Path(folder) / "journal.json").read_text())["state"]
        return UpdateState(state) not in TERMINAL
    except (OSError, ValueError, KeyError, TypeError):
        return False


def sweep_failed(data_dir: Path, names: list[str] | None = None) -> list[str]:
    """Remove the folders of models that never installed: no bundle in their slots and no
    update in flight (a first install that failed, a fleet entry whose download gave up);
    only those of ``names`` when given; the names removed."""
    gone = []
    for folder in _folders(data_dir):
        if names is not None and folder.name not in names:
            continue
        if not any((folder / "slots").glob("*/bundle.efb")) and not in_flight(folder):
            try:
                with guarded(folder):
                    shutil.rmtree(folder)
            except EdgefleetError as exc:  # swept at the next start then
                log.warning("could not remove %s: %s", folder, exc.message)
                continue
            gone.append(folder.name)
    return gone


def active_name(folder: Path) -> str | None:
    """The manifest name of the bundle this folder's pointer says is active (None: none
    there, or it cannot be read)."""
    active = _active_slot(folder)
    path = Path(folder) / "slots" / active / BUNDLE if active else None
    if path is None or not path.exists():
        return None
    try:
        return read_manifest(path)[0].name
    except EdgefleetError:
        return None


def migrate(data_dir: Path) -> str | None:
    """Move a one-model data dir into ``models/<name>/``; the name moved, or None when
    there was nothing to move (a new data dir, or one migrated already)."""
    root = Path(data_dir)
    marker = root / MODELS / MARKER
    name = _marked(marker)
    if name is None:
        _rename_mismatched(root)
        name = _legacy_name(root)
        if name is None:
            return None
        with guarded(marker):  # the name, decided once, before anything moves
            marker.parent.mkdir(parents=True, exist_ok=True)
            partial = marker.with_name(MARKER + ".tmp")
            partial.write_text(name)
            partial.replace(marker)
    target = model_dir(root, name)
    with guarded(target):
        target.mkdir(parents=True, exist_ok=True)
        for item in _LEGACY:
            _move(root / item, target / item)
        marker.unlink()
    return name


def pending(data_dir: Path) -> str | None:
    """The model name :func:`migrate` would move the data dir's one-model layout into (None:
    nothing to move); reads only."""
    root = Path(data_dir)
    return _marked(root / MODELS / MARKER) or _legacy_name(root)


def _marked(marker: Path) -> str | None:
    """The name a migration on its way wrote (None: none, or not a model name)."""
    try:
        name = marker.read_text().strip()
    except OSError:
        return None
    return name if _NAME.fullmatch(name) else None


def _active_slot(folder: Path) -> str | None:
    """The active slot its pointer names (read without creating any folder)."""
    try:
        active = json.loads((Path(folder) / "slots.json").read_text()).get("active")
    except (OSError, ValueError, AttributeError):
        return None
    return active if active in ("a", "b") else None


def _rename_mismatched(root: Path) -> None:
    """A folder whose active bundle names another model is renamed after it (when no folder
    of that name exists; else it is left, and refused when served)."""
    for folder in _folders(root):
        name = active_name(folder)
        if name is None or name == folder.name:
            continue
        target = model_dir(root, name)
        if target.exists():
            log.warning("model folder %s holds an active bundle of model %s, which has a "
                        "folder of its own: it is not served", folder, name)
            continue
        with guarded(target):
            folder.rename(target)
        log.warning("model folder %s renamed %s, after the name of its active bundle",
                    folder, target.name)


def _legacy_name(root: Path) -> str | None:
    """The model name of the bundle the root's pointer says is active, else of a bundle in
    its slots (None: no bundle there). Slots left at the root without their pointer, which
    a migration of an earlier agent (pointer before slots) moved into a folder with no
    slots, belong to that folder."""
    active = _active_slot(root)
    if active is None and any((root / "slots").glob("*/bundle.efb")):
        orphans = [p.name for p in _folders(root) if (p / "slots.json").exists()
                   and not any((p / "slots").glob("*/bundle.efb"))]
        if len(orphans) == 1:
            return orphans[0]
    for slot in ((active,) if active else ()) + ("a", "b"):
        path = root / "slots" / slot / "bundle.efb"
        if path.exists():
            try:
                return read_manifest(path)[0].name
            except EdgefleetError:
                continue  # a torn slot: the other one may name it
    return None


def _move(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; one left at both places by a killed run is merged."""
    if not source.exists():
        return
    if not target.exists():
        source.rename(target)
    elif source.is_dir():
        for child in source.iterdir():
            _move(child, target / child.name)
        shutil.rmtree(source, ignore_errors=True)
    else:
        source.unlink()  # the copy already moved is the newer one
