"""The device's update effects: downloads, verifies, stages into a slot, health-checks, switches
the serving model, watches probation, commits or rolls back. All file writes are atomic."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.core import Agent
from edgefleet.agent.loader import LoadedModel, load_bundle
from edgefleet.agent.protocol.bundle import read_bundle, read_manifest
from edgefleet.agent.protocol.errors import EdgefleetError, IntegrityError
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.update.delta import DeltaStats, fetch_bundle
from edgefleet.agent.update.disk import DISK_MARGIN, check_free, discard, guarded, sweep
from edgefleet.agent.update.download import DownloadStats
from edgefleet.agent.update.slots import SlotStore
from edgefleet.agent.update.states import TERMINAL, Event, Journal

__all__ = ["DISK_MARGIN", "DeviceEffects", "UpdateSettings", "load_journal"]


@dataclass(frozen=True)
class UpdateSettings:
    probation_s: float = 60.0
    auto_commit: bool = False
    max_error_rate: float = 0.05  # of requests on the new version during probation
    min_requests: int = 20  # before the error-rate gate may fire
    # The health check's per-sample latency budget: a bundle far slower than this on
    # the device is refused before the switch (generous by default; set it per fleet).
    latency_budget_ms: float | None = 1000.0
    poll_s: float = 0.05
    # Fault injection: pause at the start of every step, so tests can kill the agent
    # inside a given state (set by EDGEFLEET_FAULT_STEP_DELAY; 0 in production).
    step_delay_s: float = 0.0
    agreement_sample_every: int = 10  # every Nth live request is re-run on the previous model
    min_agreement: float | None = None  # own gate: roll back below this top-1 agreement
    min_agreement_samples: int = 20


def load_journal(path: Path) -> Journal:
    try:
        return Journal.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return Journal()


class DeviceEffects:
    """Implements :class:`edgefleet.agent.update.flow.UpdateEffects` for one data directory
    and agent."""

    def __init__(self, data_dir: Path, agent: Agent, settings: UpdateSettings = UpdateSettings(),
                 publish: Callable[[Journal], None] = lambda journal: None) -> None:
        self.data_dir, self.agent, self.settings = Path(data_dir), agent, settings
        self.slots = SlotStore(self.data_dir)
        self.journal_path = self.data_dir / "journal.json"
        self.stats = DownloadStats()
        self.deltas = DeltaStats()
        self._publish = publish
        self._candidate: LoadedModel | None = None
        self._decision: tuple[Event, str] | None = None  # (event, bundle sha256)
        self._wake = threading.Event()

    # decisions from the fleet (desired state) arrive on another thread
    def decide(self, event: Event, sha256: str) -> None:
        """The fleet's commit or rollback of the bundle ``sha256``: kept until the
        probation of that bundle takes it, so one that arrives before the wait starts (the
        update still on its way, or the journal saying PROBATION a moment early) is not
        lost."""
        self._decision = (event, sha256)
        self._wake.set()

    def forget_decision(self) -> None:
        """A new attempt starts: a word left from an earlier one is stale."""
        self._decision = None

    def download_path(self, journal: Journal) -> Path:
        return self.data_dir / "downloads" / f"{journal.target.sha256}.efb"

    def sweep(self, journal: Journal) -> list[Path]:
        """At start: remove what killed runs left (temp files, downloads of other bundles,
        and every download and delta leftover when no update is in flight)."""
        in_flight = journal.state not in TERMINAL
        with guarded(self.data_dir):
            return sweep(self.data_dir, (journal.target.sha256 or None) if in_flight else None)

    def download(self, journal: Journal) -> None:
        """Fetch the target; a complete file an earlier attempt left is reused only if it
        verifies against the target now (else it is discarded and fetched again)."""
        self._pause()
        path, size = self.download_path(journal), journal.target.size or 0
        if path.exists():
            if self._verifies(journal, path):
                return
            self._discard(path)  # with its partial file: those bytes came with it
        check_free(self.data_dir, size)
        fetch_bundle(journal.target, path, self.slots.active_bundle(), stats=self.stats,
                     deltas=self.deltas, verify=lambda rebuilt: self._check(journal, rebuilt))

    def verify(self, journal: Journal) -> None:
        """Check the download against the target; one that fails is discarded (with its
        partial file), so the next attempt downloads again instead of failing again."""
        self._pause()
        path = self.download_path(journal)
        try:
            self._check(journal, path)
        except Exception:  # whatever the parser raised, these bytes must not be used again
            self._discard(path)
            raise

    def _verifies(self, journal: Journal, path: Path) -> bool:
        try:
            self._check(journal, path)
        except Exception:  # any failure to verify means: not reusable, fetch it again
            return False
        return True

    def _check(self, journal: Journal, path: Path) -> None:
        with guarded(path):
            raw = path.read_bytes()
        bundle = read_bundle(raw, self.agent.trusted, self.agent.keys)  # decrypts in memory
        if bundle.sha256 != journal.target.sha256:
            raise IntegrityError(f"downloaded bundle is {bundle.manifest.ref} with manifest "
                                 f"sha256 {bundle.sha256[:12]}, the target names "
                                 f"{journal.target.sha256[:12]}",
                                 hint="the server sent another bundle; check the URL")

    @staticmethod
    def _discard(path: Path) -> None:
        with guarded(path):
            discard(path, path.with_suffix(path.suffix + ".part"))

    def stage(self, journal: Journal) -> None:
        self._pause()
        with guarded(self.data_dir / "slots"):
            if self.slot_of(journal) is None:
                self.slots.stage(self.download_path(journal).read_bytes())
            self.download_path(journal).unlink(missing_ok=True)  # the slot holds it now

    def health_check(self, journal: Journal) -> None:
        self._pause()
        path = self._staged(journal)
        self._candidate = load_bundle(path, self.agent.trusted, threads=self.agent.threads,
                                      latency_budget_ms=self.settings.latency_budget_ms,
                                      keys=self.agent.keys)

    def switch(self, journal: Journal) -> None:
        self._pause()
        slot = self.slot_of(journal)
        if slot is None:
            raise EdgefleetError("the staged bundle is gone", hint="the update restarts")
        candidate = self._candidate or load_bundle(self._staged(journal), self.agent.trusted,
                                                   threads=self.agent.threads,
                                                   keys=self.agent.keys)
        previous = self.agent.model
        with guarded(self.data_dir):
            self.slots.switch(slot)
        self.agent.activate(candidate)
        if previous is not None and previous.version != candidate.version:
            self.agent.start_shadow(previous, self.settings.agreement_sample_every)
        self._candidate = None

    def probation(self, journal: Journal) -> Event:
        """Wait for the fleet's word, an own gate failing, or the end of an auto-commit window."""
        deadline = time.monotonic() + self.settings.probation_s
        while True:
            decision = self._decision
            if decision is not None and decision[1] == journal.target.sha256:
                self._decision = None
                return decision[0]
            if self._gate_failed(journal):
                return Event.FAILURE
            auto = journal.target.auto_commits(self.settings.auto_commit)
            if auto and time.monotonic() >= deadline:
                return Event.COMMIT
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    def _gate_failed(self, journal: Journal) -> bool:
        model = self.agent.model
        if model is None or model.version != journal.target.version:
            return False
        agreement = self.agent.agreement
        if (self.settings.min_agreement is not None and agreement and agreement["top1"] is not None
                and agreement["samples"] >= self.settings.min_agreement_samples
                and agreement["top1"] < self.settings.min_agreement):
            return True
        stats = self.agent.stats_of(model.version)
        errors = stats.total_errors + stats.pending_errors
        total = stats.total_inferences + len(stats.samples) + errors
        return total >= self.settings.min_requests and errors / total > self.settings.max_error_rate

    def commit(self, journal: Journal) -> None:
        self.agent.stop_shadow()
        with guarded(self.data_dir):
            self.slots.commit()

    def rollback(self, journal: Journal) -> None:
        self._pause()
        self.agent.stop_shadow()
        with guarded(self.data_dir):
            self.slots.rollback()
        path = self.slots.active_bundle()
        if path is None:
            raise EdgefleetError("no bundle to roll back to", hint="install one")
        self.agent.activate(load_bundle(path, self.agent.trusted, threads=self.agent.threads,
                                        keys=self.agent.keys))

    def _pause(self) -> None:
        if self.settings.step_delay_s:
            time.sleep(self.settings.step_delay_s)

    def save(self, journal: Journal) -> None:
        with guarded(self.journal_path):
            # the folder again when it was removed under a running agent ('agent remove')
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.journal_path, json.dumps(journal.to_dict()).encode())

    def report(self, journal: Journal) -> None:
        self._publish(journal)

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def slot_of(self, journal: Journal) -> str | None:
        for slot in ("a", "b"):
            path = self.slots.bundle(slot)
            if path is not None and _manifest_sha(path) == journal.target.sha256:
                return slot
        return None

    def _staged(self, journal: Journal) -> Path:
        slot = self.slot_of(journal)
        path = self.slots.bundle(slot) if slot else None
        if path is None:
            raise EdgefleetError("no staged bundle for this update", hint="the update restarts")
        return path


def _manifest_sha(path: Path) -> str | None:
    try:
        return read_manifest(path)[1]
    except EdgefleetError:
        return None
