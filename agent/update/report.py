"""What the reported state says about an update: its journal as protocol payloads."""

from __future__ import annotations

from edgefleet.agent.protocol.payloads import BundleRef, UpdateReport
from edgefleet.agent.update.states import Journal
from edgefleet.agent.update.target import UpdateTarget

__all__ = ["target_ref", "update_report"]


def target_ref(journal: Journal | None) -> BundleRef | None:
    """The bundle the update is about, or None when the journal names none (or a bad one)."""
    target = journal.target if journal else UpdateTarget()
    try:
        return BundleRef(name=target.name, version=target.version, sha256=target.sha256)
    except ValueError:
        return None


def update_report(journal: Journal | None) -> UpdateReport:
    if journal is None:
        return UpdateReport()
    return UpdateReport(state=journal.state.value, target=target_ref(journal),
                        detail=journal.detail, since=journal.since)
