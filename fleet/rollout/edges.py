"""A state machine's edges as data: declared once, enforced on every move, drawn from the table.

A rollout and each of its devices move only along declared edges
(:data:`edgefleet.fleet.rollout.state.ROLLOUT_EDGES`,
:data:`edgefleet.fleet.rollout.state.DEVICE_EDGES`); the executor checks every move, and
a move the table does not declare is a bug in the executor, raised as one (as the
agent's update flow does with its own table). The drawing in ``fleet/rollout/state.py``
is :meth:`Edges.drawing`, and a test holds the two equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

__all__ = ["Edges"]

S = TypeVar("S", bound=Enum)


@dataclass(frozen=True)
class Edges(Generic[S]):
    """Where each state of one machine may move to; a state absent from ``table`` is final."""

    machine: str  # what moves, for the error ("rollout", "device")
    table: Mapping[S, frozenset[S]]

    @classmethod
    def declare(cls, machine: str, table: Mapping[S, Iterable[S]]) -> Edges[S]:
        return cls(machine, {source: frozenset(targets) for source, targets in table.items()})

    def allows(self, source: S, target: S) -> bool:
        return target in self.table.get(source, frozenset())

    def check(self, source: S, target: S) -> None:
        """Refuse a move the table does not declare."""
        if not self.allows(source, target):
            raise RuntimeError(f"no {self.machine} edge {source.value} -> {target.value}: "
                               "a move the executor must not make")

    def pairs(self) -> set[tuple[S, S]]:
        """Every declared edge."""
        return {(source, target) for source, targets in self.table.items()
                for target in targets}

    def drawing(self) -> str:
        """One line a state that moves: its edges, in the order the states are declared."""
        states = [s for s in self._states() if self.table.get(s)]
        width = max(len(s.value) for s in states)
        order = {s: i for i, s in enumerate(self._states())}
        return "\n".join(
            f"{s.value:<{width}} -> "
            + " | ".join(t.value for t in sorted(self.table[s], key=order.__getitem__))
            for s in states)

    def _states(self) -> list[S]:
        first = next(iter(self.table))
        return list(type(first))
