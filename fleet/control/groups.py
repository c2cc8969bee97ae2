"""Dynamic groups: selectors saved under a name (``fleet groups create NAME --where SEL``).

A rollout to ``group:NAME`` where NAME is a saved selector takes that selector **when
the rollout is created** (as hawkBit turns a target filter into a rollout's groups):
the spec stores the selector itself, so the rollout keeps what its operator approved
when the group is edited or deleted later, and its history shows what it meant. Its
devices are frozen when it starts, as for any selector; devices that come to match
while it runs join its last wave. A ``group:NAME`` that is no saved selector is the
static group operators put devices in (``fleet group NAME ID...``).

The saved text is read from the store at each use, so every controller of a scaled-out
fleet sees the same groups. A group is checked whole before it is saved: its name (an
id: letters, digits, ``.``, ``_``, ``-``), its selector, and what every saved group
expands to with it (groups naming groups multiply: at most ``MAX_CLAUSES`` clauses and
``MAX_NESTING`` levels each, see :mod:`edgefleet.fleet.rollout.selector`); a refused
group leaves nothing behind. A saved text that does not read back (a store written by
an earlier edgefleet) is logged and left out of expansions, never failing a listing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.audit import AuditTrail
from edgefleet.fleet.errors import ConflictError, InvalidRolloutError, NotFoundError
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.rollout.selector import (
    SelectorError,
    Target,
    expand,
    names_group,
    parse_selector,
    parse_stored_selector,
    storable,
)
from edgefleet.fleet.store import Store
from edgefleet.fleet.store.labels import SavedSelector

__all__ = ["GROUP_NAME", "GroupBook"]

log = logging.getLogger(CONTROLLER_LOG)
# a dynamic group's name: written bare in selectors (group:NAME) and in /groups/NAME/delete
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)


class GroupBook:
    """Saves, lists, deletes and expands dynamic groups."""

    def __init__(self, store: Store, registry: DeviceRegistry, audit: AuditTrail,
                 clock: Callable[[], int]) -> None:
        self.store, self.registry, self.audit, self.clock = store, registry, audit, clock

    def saved(self) -> dict[str, Target]:
        """Every saved selector by name, parsed (one that does not read back is logged and
        left out: a ``group:`` of its name is then the static group)."""
        return self._parsed(self.store.saved_selectors())

    def expand(self, selectors: tuple[Target, ...]) -> tuple[Target, ...]:
        """``selectors`` with every ``group:NAME`` of a saved selector replaced by it, each
        one a store keeps and reads back (else :class:`InvalidRolloutError`)."""
        saved = self.saved()
        expanded = tuple(expand(s, saved) for s in selectors) if saved else selectors
        return tuple(storable(s, f"selector {str(s)[:80]!r}") for s in expanded)

    def groups(self) -> list[dict[str, Any]]:
        """Every dynamic group with its selector and the devices it matches now."""
        entries = self.store.saved_selectors()
        parsed = self._parsed(entries)
        devices = self.registry.all()
        result = []
        for entry in entries:
            members = []
            if entry.name in parsed:
                try:
                    target = expand(parsed[entry.name], parsed, frozenset({entry.name}))
                except InvalidRolloutError as exc:  # saved before expansions were bounded
                    log.error("saved group %r: %s", entry.name, exc)
                else:
                    members = [d.id for d in devices if target.matches(d)]
            result.append({"name": entry.name, "where": entry.selector,
                           "devices": len(members), "members": members[:100],
                           "created_ms": entry.created_ms, "created_by": entry.created_by})
        return result

    def _parsed(self, entries: list[SavedSelector]) -> dict[str, Target]:
        parsed = {}
        for entry in entries:
            try:
                parsed[entry.name] = parse_stored_selector(entry.selector)
            except SelectorError as exc:
                log.error("saved group %r cannot be read: %s", entry.name, exc)
        return parsed

    def create(self, name: str, where: str, actor: str) -> dict[str, Any]:
        """Save ``where`` as group ``name``, everything checked first: nothing is saved
        unless the group, and every group that names it, expands and reads back."""
        if not GROUP_NAME.fullmatch(name):
            raise InvalidRolloutError(
                f"group name {name[:80]!r} is not allowed: a dynamic group's name is 1-64 "
                "letters, digits, '.', '_' or '-', starting with a letter or digit",
                hint="e.g. fleet groups create plant-a-pis --where 'label:site=plant-a'")
        target = parse_selector(where)  # refused here, never when a rollout uses it
        static = next((d.id for d in self.registry.all() if d.group == name), None)
        if static is not None:
            raise ConflictError(f"{name!r} is a group devices are put in (e.g. {static})",
                                hint="pick another name for the saved selector")
        saved = self.saved()
        if name in saved:
            raise ConflictError(f"group {name!r} already exists",
                                hint=f"delete it first: edgefleet fleet groups delete {name}")
        storable(target, f"group:{name}")
        saved[name] = target
        for other, selector in saved.items():  # with this one, every group still expands
            what = f"group:{other}"
            storable(expand(selector, saved, frozenset({other}), what), what)
        self.store.save_selector(name, str(target), actor, self.clock())
        self.audit.record(actor, "group.create", f"group:{name}", str(target))
        return next(g for g in self.groups() if g["name"] == name)

    def check_static(self, name: str) -> None:
        """A static group may not take a dynamic group's name (nor the reverse, above)."""
        if any(entry.name == name for entry in self.store.saved_selectors()):
            raise ConflictError(f"{name!r} is a dynamic group (a saved selector): devices "
                                "are not put in it",
                                hint="pick another name for the static group, or see "
                                     "edgefleet fleet groups")

    def delete(self, name: str, actor: str) -> None:
        """Delete saved group ``name``; refused while another saved group names it (that
        group would silently come to mean the static group of that name)."""
        users = sorted(other for other, target in self.saved().items()
                       if other != name and names_group(target, name))
        if users:
            raise ConflictError(f"group {name!r} is named by the saved group(s) "
                                f"{', '.join(users[:5])}",
                                hint=f"delete or re-create {users[0]} without group:{name} "
                                     "first")
        if not self.store.delete_selector(name):
            raise NotFoundError(f"no saved group {name!r}",
                                hint="see edgefleet fleet groups")
        self.audit.record(actor, "group.delete", f"group:{name}")
