"""A simulated device's two slots and its pointer, in memory, with the agent's rules.

The same decisions as :class:`edgefleet.agent.update.slots.SlotStore` (stage into a slot
that is neither active nor committed; commit makes the old committed slot the
fallback; rollback goes to the committed slot in probation, else to the
fallback), without a disk: a slot holds the :class:`BundleRef` it was staged with.
"""

from __future__ import annotations

from dataclasses import replace

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.agent.update.slots import SLOTS, SlotError, SlotPointer

__all__ = ["MemorySlots"]


class MemorySlots:
    """Slots ``a`` and ``b`` and the pointer ``active`` / ``committed`` / ``fallback``."""

    __slots__ = ("bundles", "pointer")

    def __init__(self) -> None:
        self.bundles: dict[str, BundleRef] = {}
        self.pointer = SlotPointer()

    @classmethod
    def flashed(cls, ref: BundleRef) -> MemorySlots:
        """Slot ``a`` holds ``ref``, active and committed (what ``agent install`` leaves)."""
        slots = cls()
        slots.bundles["a"] = ref
        slots.pointer = SlotPointer("a", "a", None)
        return slots

    def bundle(self, slot: str | None) -> BundleRef | None:
        return self.bundles.get(slot) if slot else None

    @property
    def active(self) -> BundleRef | None:
        return self.bundle(self.pointer.active)

    @property
    def previous(self) -> BundleRef | None:
        """What the reported state names as previous (as ``AgentService.reported_state``)."""
        p = self.pointer
        return self.bundle(p.committed if p.committed != p.active else p.fallback)

    def slot_of(self, sha256: str) -> str | None:
        return next((s for s in SLOTS if (ref := self.bundles.get(s)) and ref.sha256 == sha256),
                    None)

    def stage(self, ref: BundleRef) -> str:
        p = self.pointer
        free = [s for s in SLOTS if s not in (p.active, p.committed)]
        slot = free[0] if free else next(s for s in SLOTS if s != p.active)
        self.bundles[slot] = ref
        return slot

    def switch(self, slot: str) -> None:
        if slot not in self.bundles:
            raise SlotError(f"slot {slot} holds no bundle", hint="stage a bundle first")
        self.pointer = replace(self.pointer, active=slot)

    def commit(self) -> None:
        p = self.pointer
        if p.active != p.committed:
            self.pointer = SlotPointer(p.active, p.active, p.committed)

    def rollback(self) -> None:
        p = self.pointer
        if p.active != p.committed and p.committed in self.bundles:
            self.pointer = replace(p, active=p.committed)
        elif p.fallback and p.fallback in self.bundles:
            self.pointer = SlotPointer(p.fallback, p.fallback, None)
        else:
            raise SlotError("there is no earlier committed bundle to roll back to",
                            hint="install a bundle first")
