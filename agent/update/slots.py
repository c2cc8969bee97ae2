"""A/B slots on disk, and the pointer that says which one serves.

::

    DATA_DIR/
      slots/a/bundle.efb, slots/b/bundle.efb   the two slots
      slots.json                               {"active", "committed", "fallback"}
      journal.json                             the update state machine's journal
      downloads/<sha256>.part                  partial downloads (resumed with Range)
      keys/*.pub                               trusted public keys
      keys/*.x25519                            private keys for encrypted models (0600)
      spool/                                   telemetry spooled while offline

Every write goes through a temp file, fsync and rename (``atomic_write``), so a
crash leaves either the old or the new pointer, never a torn one. ``active`` is
what serves; ``committed`` what the device returns to if probation fails;
``fallback`` the committed bundle before that, for a manual rollback.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgefleet.agent.errors import AgentError
from edgefleet.agent.protocol.files import atomic_write

__all__ = ["SLOTS", "SlotError", "SlotPointer", "SlotStore", "read_pointer"]

SLOTS = ("a", "b")
BUNDLE = "bundle.efb"


class SlotError(AgentError):
    """A slot operation that cannot be done (nothing to roll back to, empty slot)."""


@dataclass(frozen=True)
class SlotPointer:
    active: str | None = None
    committed: str | None = None
    fallback: str | None = None


def read_pointer(path: Path) -> SlotPointer:
    """The pointer written at ``path`` (``slots.json``); an empty one when there is none."""
    try:
        data = json.loads(Path(path).read_text())
        return SlotPointer(**{k: data.get(k) for k in ("active", "committed", "fallback")})
    except (OSError, ValueError, TypeError, AttributeError):
        return SlotPointer()


class SlotStore:
    """The slots and the pointer of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        for slot in SLOTS:
            (self.root / "slots" / slot).mkdir(parents=True, exist_ok=True)
        self._pointer_file = self.root / "slots.json"

    def pointer(self) -> SlotPointer:
        return read_pointer(self._pointer_file)

    def bundle(self, slot: str | None) -> Path | None:
        path = self.root / "slots" / slot / BUNDLE if slot else None
        return path if path is not None and path.exists() else None

    def active_bundle(self) -> Path | None:
        return self.bundle(self.pointer().active)

    def inactive(self) -> str:
        """The slot to stage into: never the active or the committed one."""
        pointer = self.pointer()
        free = [s for s in SLOTS if s not in (pointer.active, pointer.committed)]
        return free[0] if free else next(s for s in SLOTS if s != pointer.active)

    def stage(self, data: bytes) -> str:
        """Write ``data`` into the free slot; if that slot held the fallback, the device no
        longer has one (cleared first, so a crash never leaves a pointer to the new bytes)."""
        slot = self.inactive()
        pointer = self.pointer()
        if pointer.fallback == slot:
            self._write(replace(pointer, fallback=None))
        (self.root / "slots" / slot).mkdir(parents=True, exist_ok=True)  # removed under us
        atomic_write(self.root / "slots" / slot / BUNDLE, data)
        return slot

    def switch(self, slot: str) -> SlotPointer:
        if self.bundle(slot) is None:
            raise SlotError(f"slot {slot} holds no bundle", hint="stage a bundle first")
        return self._write(replace(self.pointer(), active=slot))

    def commit(self) -> SlotPointer:
        pointer = self.pointer()
        if pointer.active == pointer.committed:
            return pointer
        return self._write(SlotPointer(pointer.active, pointer.active, pointer.committed))

    def rollback(self) -> SlotPointer:
        """Back to the committed bundle (in probation), else to the one committed before it."""
        return self._write(self.rollback_target())

    def rollback_target(self) -> SlotPointer:
        """The pointer a rollback would write, without writing it; SlotError if there is
        nothing to go back to (asked before a rollback starts, so a refused one changes
        nothing)."""
        pointer = self.pointer()
        if pointer.active != pointer.committed and self.bundle(pointer.committed):
            return replace(pointer, active=pointer.committed)
        if pointer.fallback and self.bundle(pointer.fallback):
            return SlotPointer(pointer.fallback, pointer.fallback, None)
        raise SlotError("there is no earlier committed bundle to roll back to",
                        hint="install a bundle with 'edgefleet agent install'")

    def _write(self, pointer: SlotPointer) -> SlotPointer:
        atomic_write(self._pointer_file, json.dumps(asdict(pointer)).encode())
        return pointer
