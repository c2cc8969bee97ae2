"""The bundle an update installs, typed: parsed once from a desired state or a journal.

The journal stores it as the JSON object it always was; :meth:`UpdateTarget.to_dict`
writes back exactly the keys it was given, so a journal (and ``edgefleet agent status``)
reads the same as before. A field left empty is one its source did not state: a local
install states no attempt, a simulated device's first bundle no size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.payloads import DeltaRef, DesiredState

__all__ = ["UpdateTarget"]

_TEXT = ("name", "version", "sha256", "url")


@dataclass(frozen=True)
class UpdateTarget:
    """What the update flow downloads, checks and installs, and the attempt it belongs to."""

    name: str = ""
    version: str = ""
    sha256: str = ""  # of the bundle's manifest
    url: str = ""
    size: int | None = None  # bytes of the bundle file (None: not stated)
    rollout: str | None = None  # the attempt (docs/protocol.md, "Desired state")
    auto_commit: bool | None = None  # None: no fleet's word (a local install)
    delta: DeltaRef | None = None  # a delta from the device's bundle, if the fleet offers one

    @classmethod
    def from_desired(cls, desired: DesiredState) -> UpdateTarget:
        """The target of the fleet's ``install``."""
        return cls(name=desired.name, version=desired.version, sha256=desired.sha256,
                   url=desired.url, size=desired.size, rollout=desired.rollout,
                   auto_commit=desired.auto_commit, delta=desired.delta)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> UpdateTarget:
        """A journal's target (a missing key stays unstated)."""
        size, rollout, auto = data.get("size"), data.get("rollout"), data.get("auto_commit")
        name, version, sha256, url = (str(data.get(key) or "") for key in _TEXT)
        return cls(name, version, sha256, url,
                   size=None if size is None else int(str(size)),
                   rollout=None if rollout is None else str(rollout),
                   auto_commit=None if auto is None else bool(auto),
                   delta=_delta(data.get("delta")))

    def to_dict(self) -> dict[str, object]:
        """The journal's JSON object: the stated keys, in the order they were always written."""
        data: dict[str, object] = {key: getattr(self, key) for key in _TEXT if getattr(self, key)}
        if self.size is not None:
            data["size"] = self.size
        if self.rollout is not None or self.auto_commit is not None:
            data["rollout"] = self.rollout
        if self.auto_commit is not None:
            data["auto_commit"] = self.auto_commit
        if self.delta is not None:
            data["delta"] = self.delta.model_dump(mode="json")
        return data

    def auto_commits(self, default: bool) -> bool:
        """Whether the end of probation commits: the fleet's word, else ``default``."""
        return default if self.auto_commit is None else self.auto_commit


def _delta(data: object) -> DeltaRef | None:
    """A journal's delta; one that no longer reads is dropped (the full bundle will do)."""
    if not isinstance(data, Mapping):
        return None
    try:
        return DeltaRef.model_validate(data)
    except (ValueError, EdgefleetError):
        return None
