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
into ``models/<name>/``, ``<name>`` read from the manifest of a bundle in its slots:
:func:`migrate`. Each move is a rename, the slots last (they say the name), so a migration
killed half-way is finished by the next one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from edgefleet.agent.protocol.bundle import read_manifest
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.schema import NAME_PATTERN
from edgefleet.agent.update.disk import guarded

__all__ = ["MODELS", "installed", "migrate", "model_dir"]

MODELS = "models"
# what an agent of one model kept at the data dir's root, moved in this order (slots last)
_LEGACY = ("journal.json", "downloads", "slots.json", "slots")
_NAME = re.compile(NAME_PATTERN)


def model_dir(data_dir: Path, name: str) -> Path:
    """The folder of model ``name`` (a bundle name: never a path of its own)."""
    if not _NAME.fullmatch(name):
        raise EdgefleetError(f"{name[:80]!r} is not a model name",
                             hint="a model is named by its bundle's manifest name")
    return Path(data_dir) / MODELS / name


def installed(data_dir: Path) -> list[str]:
    """The names of the models installed in ``data_dir`` (a pointer or a slot written)."""
    root = Path(data_dir) / MODELS
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and _NAME.fullmatch(p.name) and _has_model(p))


def _has_model(folder: Path) -> bool:
    return (folder / "slots.json").exists() or any((folder / "slots").glob("*/bundle.efb"))


def migrate(data_dir: Path) -> str | None:
    """Move a one-model data dir into ``models/<name>/``; the name moved, or None when
    there was nothing to move (a new data dir, or one migrated already)."""
    root = Path(data_dir)
    name = _legacy_name(root)
    if name is None:
        return None
    target = model_dir(root, name)
    with guarded(target):
        target.mkdir(parents=True, exist_ok=True)
        for item in _LEGACY:
            _move(root / item, target / item)
    return name


def _legacy_name(root: Path) -> str | None:
    """The model name of the bundles in the root's slots (None: no bundle there)."""
    for slot in ("a", "b"):
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
