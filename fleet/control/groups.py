"""Dynamic groups: selectors saved under a name (``fleet groups create NAME --where SEL``).

A rollout to ``group:NAME`` where NAME is a saved selector takes that selector **when
the rollout is created** (as hawkBit turns a target filter into a rollout's groups):
the spec stores the selector itself, so the rollout keeps what its operator approved
when the group is edited or deleted later, and its history shows what it meant. Its
devices are frozen when it starts, as for any selector; devices that come to match
while it runs join its last wave. A ``group:NAME`` that is no saved selector is the
static group operators put devices in (``fleet group NAME ID...``).

The saved text is read from the store at each use, so every controller of a scaled-out
fleet sees the same groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgefleet.fleet.control.audit import AuditTrail
from edgefleet.fleet.errors import ConflictError, NotFoundError
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.rollout.selector import Target, expand, parse_selector
from edgefleet.fleet.store import Store

__all__ = ["GroupBook"]


class GroupBook:
    """Saves, lists, deletes and expands dynamic groups."""

    def __init__(self, store: Store, registry: DeviceRegistry, audit: AuditTrail,
                 clock: Callable[[], int]) -> None:
        self.store, self.registry, self.audit, self.clock = store, registry, audit, clock

    def saved(self) -> dict[str, Target]:
        """Every saved selector by name, parsed."""
        return {s.name: parse_selector(s.selector) for s in self.store.saved_selectors()}

    def expand(self, selectors: tuple[Target, ...]) -> tuple[Target, ...]:
        """``selectors`` with every ``group:NAME`` of a saved selector replaced by it."""
        saved = self.saved()
        return tuple(expand(s, saved) for s in selectors) if saved else selectors

    def groups(self) -> list[dict[str, Any]]:
        """Every dynamic group with its selector and the devices it matches now."""
        saved = {s.name: s for s in self.store.saved_selectors()}
        parsed = {name: parse_selector(s.selector) for name, s in saved.items()}
        devices = self.registry.all()
        result = []
        for name, entry in saved.items():
            target = expand(parsed[name], parsed, frozenset({name}))
            members = [d.id for d in devices if target.matches(d)]
            result.append({"name": name, "where": entry.selector, "devices": len(members),
                           "members": members[:100], "created_ms": entry.created_ms,
                           "created_by": entry.created_by})
        return result

    def create(self, name: str, where: str, actor: str) -> dict[str, Any]:
        target = parse_selector(where)  # refused here, never when a rollout uses it
        static = next((d.id for d in self.registry.all() if d.group == name), None)
        if static is not None:
            raise ConflictError(f"{name!r} is a group devices are put in (e.g. {static})",
                                hint="pick another name for the saved selector")
        self.store.save_selector(name, str(target), actor, self.clock())
        self.audit.record(actor, "group.create", f"group:{name}", str(target))
        return next(g for g in self.groups() if g["name"] == name)

    def delete(self, name: str, actor: str) -> None:
        if not self.store.delete_selector(name):
            raise NotFoundError(f"no saved group {name!r}",
                                hint="see edgefleet fleet groups")
        self.audit.record(actor, "group.delete", f"group:{name}")
