"""The rollout executor: a pure ``tick(rollout, observations, now_ms) -> Decisions``.

No I/O and no clock: the controller observes (devices, telemetry), calls ``tick``,
persists the new rollout, and only then publishes what ``Decisions.sends`` asks for.
A tick does, in this order:

1. start a PENDING rollout: freeze the selected devices into waves (an empty selection
   succeeds at once: there is nothing to do);
   then follow the schedule: a RUNNING rollout whose schedule is closed (before its
   start time, outside its windows) is WAITING, a WAITING one whose schedule opened is
   RUNNING again (its rate counts from then); ``Decisions.wait_until_ms`` says when a
   waiting one opens next;
2. take devices that joined and match the selector into the last wave (while it runs);
3. follow every device from what it reports (UPDATING, PROBATION, SUCCEEDED, FAILED,
   late answers after a timeout, a retry after a failure) and time out those that do
   not answer;
4. check the error conditions before the success conditions: failures above
   ``max_failures_pct`` of the waves so far (their whole, not only those sent) or a
   quality gate firing abort the rollout, and devices that have not committed are
   rolled back;
5. commit devices whose soak is over; advance to the next wave when the current one is
   done and at least ``min_success_pct`` of its devices succeeded; succeed after the last;
6. send the bundle to the current wave's pending devices, at most as fast as the rate
   (RUNNING only: a WAITING rollout follows, commits and rolls back, and sends no bundle).

Thresholds fire strictly above their value (minimums strictly below). A device that
never answers times out (``device_timeout_s`` after it was sent the bundle), so no
rollout stays running forever; a timed-out device counts against ``min_success_pct``,
not as a failure, and is followed again if it answers later. A failed device that works
on the bundle again (it re-received the install it had given up on) is followed again
too, during the rollout and after its end, so no device is left in probation without
a decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.agent.protocol.update_state import UpdateState
from edgefleet.fleet.errors import ConflictError
from edgefleet.fleet.rollout.schedule import format_ms
from edgefleet.fleet.rollout.spec import wave_bounds
from edgefleet.fleet.rollout.state import (
    ACTIVE,
    DEVICE_EDGES,
    ROLLOUT_EDGES,
    DeviceState,
    Rollout,
    RolloutDevice,
    RolloutState,
)

__all__ = ["FOLLOWED", "Action", "Decisions", "DeviceView", "Observations", "Quality", "Send",
           "abort", "gate_failure", "pause", "refusal", "resume", "rollback", "tick"]

RESEND_MS = 5_000  # a device still in probation after a commit/rollback this old is told again
# the device's update states (as it reports them) on the way to probation, and settled
_IN_FLIGHT = (UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.STAGED,
              UpdateState.HEALTH_CHECK, UpdateState.SWITCHING)
_SETTLED = (UpdateState.COMMITTED, UpdateState.IDLE)
_ENDED_BADLY = (UpdateState.FAILED, UpdateState.ROLLING_BACK, UpdateState.ROLLED_BACK)

# The devices a tick follows (their reports, timeouts, commits, rollbacks): on their way,
# rolling back, timed out (they may answer late) or failed (they may retry). The others
# are settled, or not sent anything yet.
FOLLOWED = ACTIVE | {DeviceState.ROLLING_BACK, DeviceState.TIMED_OUT, DeviceState.FAILED}
# a rollout that is under way: it follows its devices, takes newcomers, checks its gates
_UNDER_WAY = (RolloutState.RUNNING, RolloutState.WAITING, RolloutState.PAUSED)


class Action(str, Enum):
    INSTALL = "install"
    COMMIT = "commit"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class DeviceView:
    """What the controller knows of one device right now."""

    online: bool
    active: BundleRef | None
    update_state: str = UpdateState.IDLE.value  # an UpdateState, as the device reported it
    update_target: str | None = None  # sha256 the device's update is about
    update_since_ms: int = 0
    update_detail: str = ""
    incompatible: str | None = None  # why it cannot load this rollout's bundle, or None

    @property
    def active_sha(self) -> str | None:
        return self.active.sha256 if self.active else None


@dataclass(frozen=True)
class Quality:
    """Live telemetry of one side (the new version, or its baseline) over a recent window."""

    inferences: int = 0
    errors: int = 0
    p95_ms: float | None = None
    agreement: float | None = None  # top-1 agreement with the previous model, 0-1
    agreement_samples: int = 0

    @property
    def error_rate(self) -> float | None:
        total = self.inferences + self.errors
        return self.errors / total if total else None


@dataclass(frozen=True)
class Observations:
    devices: Mapping[str, DeviceView]  # the rollout's devices and every device matching it
    candidate: Quality = Quality()  # the new version on this rollout's devices
    baseline: Quality = Quality()  # the versions those devices ran before


@dataclass(frozen=True)
class Send:
    """Publish a desired state for ``device``: install, commit or roll back the target.

    ``bundle`` names another bundle than the rollout's: the device's previous one, when a
    rollback re-installs it (its fallback slot no longer held it) and it must be committed.
    """

    device: str
    action: Action
    bundle: BundleRef | None = None


@dataclass(frozen=True)
class Decisions:
    rollout: Rollout
    sends: list[Send] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)  # device rows to persist
    cleared: list[str] = field(default_factory=list)  # devices whose desired state to clear
    wait_until_ms: int | None = None  # WAITING: tick again then (its schedule opens)


class _Step:
    """One step of a rollout in the making: mutable scratch space, whose result
    (:meth:`done`) is immutable again. Every move goes along a declared edge."""

    def __init__(self, rollout: Rollout, observed: Observations, now: int) -> None:
        self.rollout, self.observed, self.now = rollout, observed, now
        self.devices: dict[str, RolloutDevice] = dict(rollout.devices)
        self.decisions = Decisions(rollout)
        # those it follows, in the rollout's order: after one pass, a tick of a finished
        # rollout of 10,000 devices costs in proportion to its few unsettled ones
        self.followed = [d.device for d in rollout.devices.values() if d.state in FOLLOWED]

    def following(self) -> list[RolloutDevice]:
        """The devices followed this tick, as they are now (no other enters a followed
        state during a tick but pending ones being sent the bundle)."""
        return [self.devices[device] for device in self.followed]

    @property
    def target(self) -> str:
        return self.rollout.spec.model.sha256

    def set(self, item: RolloutDevice) -> None:
        self.devices[item.device] = item
        self.decisions.changed.add(item.device)

    def move(self, item: RolloutDevice, state: DeviceState, reason: str = "") -> RolloutDevice:
        DEVICE_EDGES.check(item.state, state)
        moved = item.moved(state, self.now, reason)
        self.set(moved)
        return moved

    def send(self, item: RolloutDevice, action: Action,
             bundle: BundleRef | None = None) -> RolloutDevice:
        sent = replace(item, sent_ms=self.now)
        self.set(sent)
        self.decisions.sends.append(Send(item.device, action, bundle))
        return sent

    def state(self, state: RolloutState, reason: str = "") -> None:
        ROLLOUT_EDGES.check(self.rollout.state, state)
        self.rollout = replace(self.rollout, state=state, reason=reason or self.rollout.reason)
        note = f"rollout {state.value.lower()}" + (f": {reason}" if reason else "")
        self.decisions.notes.append(note)

    def done(self) -> Decisions:
        changed = self.decisions.changed or self.decisions.sends or self.decisions.notes
        waiting = self.rollout.state == RolloutState.WAITING
        until = self.rollout.spec.schedule.next_open(self.now) if waiting else None
        rollout = replace(self.rollout, devices=self.devices, waiting_until_ms=until or 0,
                          updated_ms=self.now if changed else self.rollout.updated_ms)
        return replace(self.decisions, rollout=rollout, wait_until_ms=until)


def tick(rollout: Rollout, observations: Observations, now_ms: int) -> Decisions:
    """One step of ``rollout`` given what the fleet looks like at ``now_ms``."""
    step = _Step(rollout, observations, now_ms)
    if step.rollout.state == RolloutState.PENDING:
        _start(step)
    _follow_schedule(step)
    if step.rollout.state in _UNDER_WAY:
        _join_newcomers(step)
    _follow_devices(step)
    if step.rollout.state in _UNDER_WAY:
        reason = _failure(step) or gate_failure(step.rollout, observations)
        if reason:
            _abort(step, reason)
    if step.rollout.state in (RolloutState.RUNNING, RolloutState.WAITING,
                              RolloutState.SUCCEEDED):
        _commit_soaked(step)
    if step.rollout.state in (RolloutState.RUNNING, RolloutState.WAITING):
        _advance(step)
    if step.rollout.state == RolloutState.RUNNING:
        _send_installs(step)
    _resend(step)
    return step.done()


def _start(step: _Step) -> None:
    selected = sorted(step.observed.devices)
    if not selected:
        step.state(RolloutState.SUCCEEDED, "no device matches the selector: nothing to do")
        return
    bounds = wave_bounds(step.rollout.spec.waves, len(selected))
    wave = 0
    for index, device in enumerate(selected):
        while index >= bounds[wave]:
            wave += 1
        step.set(RolloutDevice(device, wave, since_ms=step.now))
    step.rollout = replace(step.rollout, wave=0, wave_started_ms=step.now, started_in_wave=0)
    frozen = f"{len(selected)} devices in {len(bounds)} waves"
    closed = _closed(step)
    if closed:
        step.state(RolloutState.WAITING, f"{frozen}; {closed}")
    else:
        step.state(RolloutState.RUNNING, frozen)
    step.decisions.notes.append(f"wave 1 of {len(bounds)} started")


def _closed(step: _Step) -> str:
    """Why the rollout's schedule is closed now, with its next opening ("" when open)."""
    schedule = step.rollout.spec.schedule
    opens = step.now if schedule.always else schedule.next_open(step.now)
    if opens == step.now:
        return ""
    return "outside its schedule: " + ("no window opens again" if opens is None else
                                       f"next window opens {format_ms(opens, schedule.zone())}")


def _follow_schedule(step: _Step) -> None:
    """RUNNING while the schedule is open, WAITING while it is closed."""
    if step.rollout.spec.schedule.always or step.rollout.state not in (
            RolloutState.RUNNING, RolloutState.WAITING):
        return
    closed = _closed(step)
    if step.rollout.state == RolloutState.RUNNING and closed:
        step.state(RolloutState.WAITING, closed)
    elif step.rollout.state == RolloutState.WAITING and not closed:
        # the rate counts from the opening, not from a wave that began while closed
        step.rollout = replace(step.rollout, wave_started_ms=step.now, started_in_wave=0)
        step.state(RolloutState.RUNNING, "its schedule is open")

def _join_newcomers(step: _Step) -> None:
    last = len(step.rollout.spec.waves) - 1
    for device in sorted(set(step.observed.devices) - set(step.devices)):
        step.set(RolloutDevice(device, last, since_ms=step.now, reason="joined while running"))
        step.decisions.notes.append(f"{device} joined; it goes in the last wave")


def _follow_devices(step: _Step) -> None:
    for item in step.following():
        view = step.observed.devices.get(item.device)
        if item.state == DeviceState.ROLLING_BACK:
            _follow_rollback(step, item, view)
        elif item.state in ACTIVE or item.state == DeviceState.TIMED_OUT:
            _follow_update(step, item, view)
        elif item.state == DeviceState.FAILED:
            _follow_retry(step, item, view)


def _follow_update(step: _Step, item: RolloutDevice, view: DeviceView | None) -> None:
    reported = _reported(step, view)
    if item.state == DeviceState.TARGETED and _earlier_attempt(item, view):
        reported = None
    if item.state == DeviceState.TIMED_OUT and not _late_answer(item, view, reported):
        reported = None
    if reported is not None and view is not None and _RANK[reported] > _RANK[item.state]:
        late = " (late)" if item.state == DeviceState.TIMED_OUT else ""
        detail = view.update_detail if reported == DeviceState.FAILED else ""
        moved = step.move(item, reported, detail or f"device reported {view.update_state}{late}")
        if late and reported == DeviceState.UPDATING:
            # its clock restarts: a fresh --device-timeout to reach probation, instead of
            # timing out again at the next tick (and again after every report)
            step.set(replace(moved, targeted_ms=step.now))
        if reported == DeviceState.FAILED:
            step.decisions.cleared.append(item.device)
        return
    limit_ms = step.rollout.spec.device_timeout_s * 1000
    if item.state in (DeviceState.TARGETED, DeviceState.UPDATING):
        if step.now - item.targeted_ms > limit_ms:
            where = "offline" if view is None or not view.online else (
                view.incompatible or f"still {view.update_state}")
            step.move(item, DeviceState.TIMED_OUT,
                      f"no answer within {step.rollout.spec.device_timeout_s:g}s ({where})")
    elif item.state == DeviceState.COMMITTING and step.now - item.since_ms > limit_ms:
        step.move(item, DeviceState.TIMED_OUT,
                  f"commit not confirmed within {step.rollout.spec.device_timeout_s:g}s")


def _earlier_attempt(item: RolloutDevice, view: DeviceView | None) -> bool:
    """A failure or rollback the device reported before this rollout sent it the bundle is
    about an earlier attempt (an earlier rollout of the same version): the device starts a
    new one for this rollout (docs/protocol.md, "Desired state"), so it is no answer."""
    return (view is not None and view.update_state in (UpdateState.FAILED, UpdateState.ROLLED_BACK)
            and view.update_since_ms < item.targeted_ms)


def _late_answer(item: RolloutDevice, view: DeviceView | None,
                 reported: DeviceState | None) -> bool:
    """Whether a timed-out device's report is an answer.

    What a device said before it went away is none (it must be online), and an update
    still on its way answers only if it moved since the timeout: the same stale report
    would otherwise restart its clock every ``--device-timeout``, and two devices stuck
    out of step would keep their wave (and the rollout) from ever ending.
    """
    if view is None or not view.online:
        return False
    return reported != DeviceState.UPDATING or view.update_since_ms > item.since_ms


def _follow_retry(step: _Step, item: RolloutDevice, view: DeviceView | None) -> None:
    """A failed device that works on this rollout's bundle again is followed again.

    Its agent retries when it gets the install again (a device that gave up a download
    during a long network cut re-receives the retained install when it reconnects, before
    the cleared desired state reaches it). Online, on its way to (or in) probation on the
    target, it is a late answer: while the rollout runs it goes on (soak, gates, commit,
    with a fresh ``--device-timeout``) and counts as it then ends; after a success it is
    committed; after an abort or a rollback it is rolled back. A device that settled
    (committed, failed, rolled back) is left alone.
    """
    reported = _reported(step, view)
    if view is None or not view.online or reported not in (DeviceState.UPDATING,
                                                            DeviceState.PROBATION):
        return
    retried = f"device retried after failing: reported {view.update_state}"
    if step.rollout.state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK):
        ended = step.rollout.state.value.lower().replace("_", " ")
        moved = step.move(item, DeviceState.ROLLING_BACK, f"{retried}; the rollout was {ended}")
        step.send(moved, Action.ROLLBACK)
        return
    step.set(replace(step.move(item, reported, retried), targeted_ms=step.now))


# A device only moves forward; a failure is always taken; a timed-out device that answers
# late is followed again (a failed one that retries too, see _follow_retry).
_RANK = {DeviceState.TIMED_OUT: -1, DeviceState.TARGETED: 0, DeviceState.UPDATING: 1,
         DeviceState.PROBATION: 2, DeviceState.COMMITTING: 3, DeviceState.SUCCEEDED: 4,
         DeviceState.FAILED: 5}


def _reported(step: _Step, view: DeviceView | None) -> DeviceState | None:
    """What the device's own report says about this rollout's bundle (None: nothing yet)."""
    if view is None:
        return None
    if view.active_sha == step.target and view.update_state in _SETTLED:
        return DeviceState.SUCCEEDED
    if view.update_target != step.target:
        return None
    if view.update_state == UpdateState.PROBATION:
        return DeviceState.PROBATION
    if view.update_state in _IN_FLIGHT:
        return DeviceState.UPDATING
    if view.update_state in _ENDED_BADLY:
        return DeviceState.FAILED
    return None


def _follow_rollback(step: _Step, item: RolloutDevice, view: DeviceView | None) -> None:
    if view is None or not view.online:
        # what it said before it went away is no answer: it may have started the update
        # since (its report did not get out), so it is only marked rolled back once it is
        # back and says so; the retained rollback waits for it on the broker
        return
    previous = item.previous.sha256 if item.previous else None
    if _added(item) and view.active_sha == step.target and view.update_state in _SETTLED:
        # the device committed the model this rollout added, and refuses the rollback:
        # there is nothing to go back to (the protocol cannot remove a model)
        step.move(item, DeviceState.FAILED, f"rollback failed: {_kept_reason(step.rollout)}")
        step.decisions.cleared.append(item.device)
        return
    if previous and view.update_target == previous and view.update_state == UpdateState.PROBATION:
        if view.update_since_ms > item.sent_ms or step.now - item.sent_ms > RESEND_MS:
            step.send(item, Action.COMMIT, item.previous)  # the re-installed previous bundle
        return
    if previous and view.update_target == previous and view.update_state == UpdateState.FAILED:
        step.move(item, DeviceState.FAILED, f"rollback failed: {view.update_detail}")
        return
    settled = view.update_state in (*_SETTLED, UpdateState.ROLLED_BACK, UpdateState.FAILED)
    if view.active_sha != step.target and settled:
        step.move(item, DeviceState.ROLLED_BACK, f"running {_version(view.active)}")
        step.decisions.cleared.append(item.device)


def _failure(step: _Step) -> str:
    """Failures above ``max_failures_pct`` of the devices the waves so far hold.

    The share is judged against the whole of the current and earlier waves (not against
    the devices sent the bundle so far), so a rate or a small first send does not turn
    one failure into 50%; it still fires as soon as the failures alone are too many for
    those waves, before every device was sent the bundle.
    """
    waves = [d for d in step.devices.values() if d.wave <= step.rollout.wave
             and d.state not in (DeviceState.INCOMPATIBLE, DeviceState.CANCELLED)]
    failed, total = sum(1 for d in waves if d.state == DeviceState.FAILED), len(waves)
    if not failed:
        return ""
    pct = 100.0 * failed / total
    if pct > step.rollout.spec.gates.max_failures_pct:
        return (f"{failed} of {total} devices failed ({pct:.1f}%), above --max-failures "
                f"{step.rollout.spec.gates.max_failures_pct:g}%")
    return ""


# the agreement gate judges once this many sampled requests were compared: one
# disagreement in 7 is 85.7%, which says nothing about a 90% gate
MIN_AGREEMENT_SAMPLES = 30


def gate_failure(rollout: Rollout, obs: Observations) -> str:
    """The first quality gate that fires on live telemetry, as a sentence; "" when none does.

    Gates wait for ``min_samples`` inferences on the new version; the error rate is
    checked before latency and agreement.
    """
    gates, new, base = rollout.spec.gates, obs.candidate, obs.baseline
    if new.inferences + new.errors < gates.min_samples:
        return ""
    rate = new.error_rate
    if gates.max_error_rate_pct is not None and rate is not None and (
            100 * rate > gates.max_error_rate_pct):
        return (f"error rate {100 * rate:.2f}% on {rollout.spec.model.version} is above "
                f"--max-error-rate {gates.max_error_rate_pct:g}%")
    if (gates.max_p95_ratio is not None and new.p95_ms is not None and base.p95_ms
            and new.p95_ms / base.p95_ms > gates.max_p95_ratio):
        return (f"p95 latency {new.p95_ms:.3g} ms is {new.p95_ms / base.p95_ms:.2f}x the "
                f"baseline's {base.p95_ms:.3g} ms, above --max-p95-ratio {gates.max_p95_ratio:g}")
    if (gates.min_agreement_pct is not None and new.agreement is not None
            and new.agreement_samples >= MIN_AGREEMENT_SAMPLES
            and 100 * new.agreement < gates.min_agreement_pct):
        return (f"top-1 agreement with the previous model is {100 * new.agreement:.1f}% over "
                f"{new.agreement_samples} compared requests, below --min-agreement "
                f"{gates.min_agreement_pct:g}%")
    return ""


def _abort(step: _Step, reason: str) -> None:
    step.state(RolloutState.ABORTED, reason)
    for item in list(step.devices.values()):
        # a timed-out device never confirmed the version either: it is told to roll back
        # too, and does so when it comes back (instead of carrying out an older word)
        if item.state in ACTIVE or item.state == DeviceState.TIMED_OUT:
            step.send(step.move(item, DeviceState.ROLLING_BACK, "rollout aborted"), Action.ROLLBACK)
        elif item.state == DeviceState.PENDING:
            step.move(item, DeviceState.CANCELLED, "rollout aborted before its turn")


def _commit_soaked(step: _Step) -> None:
    soak_ms = step.rollout.spec.soak_s * 1000
    for item in step.following():
        if item.state == DeviceState.PROBATION and step.now - item.since_ms >= soak_ms:
            step.send(step.move(item, DeviceState.COMMITTING, "soak passed"), Action.COMMIT)


def _advance(step: _Step) -> None:
    while step.rollout.state in (RolloutState.RUNNING, RolloutState.WAITING):
        wave = [d for d in step.devices.values() if d.wave <= step.rollout.wave]
        if any(d.state in ACTIVE or d.state == DeviceState.PENDING for d in wave):
            return
        current = [d for d in wave if d.wave == step.rollout.wave]
        eligible = [d for d in current if d.state not in (DeviceState.INCOMPATIBLE,
                                                          DeviceState.CANCELLED)]
        succeeded = sum(1 for d in eligible if d.state == DeviceState.SUCCEEDED)
        pct = 100.0 * succeeded / len(eligible) if eligible else 100.0
        label = f"wave {step.rollout.wave + 1} of {len(step.rollout.spec.waves)}"
        minimum = step.rollout.spec.gates.min_success_pct
        if pct < minimum:
            _abort(step, f"{label}: {succeeded} of {len(eligible)} devices succeeded "
                         f"({pct:.1f}%), below --min-success {minimum:g}%")
            return
        if step.rollout.wave + 1 >= len(step.rollout.spec.waves):
            total = sum(1 for d in step.devices.values() if d.state == DeviceState.SUCCEEDED)
            step.state(RolloutState.SUCCEEDED, f"{total} of {len(step.devices)} devices run "
                                               f"{step.rollout.spec.model.version}")
            return
        step.rollout = replace(step.rollout, wave=step.rollout.wave + 1,
                               wave_started_ms=step.now, started_in_wave=0)
        step.decisions.notes.append(f"{label} done ({succeeded}/{len(eligible)} succeeded); "
                                    f"wave {step.rollout.wave + 1} started")


def _send_installs(step: _Step) -> None:
    budget = _rate_budget(step)
    pending = sorted((d for d in step.devices.values()
                      if d.state == DeviceState.PENDING and d.wave <= step.rollout.wave),
                     key=lambda d: (d.wave, d.device))
    started = 0
    for item in pending:
        view = step.observed.devices.get(item.device)
        if view is not None and view.incompatible:
            step.move(item, DeviceState.INCOMPATIBLE, view.incompatible)
        elif view is not None and view.active_sha == step.target and (
                view.update_state in _SETTLED):
            step.move(item, DeviceState.SUCCEEDED, "already running it")
        elif budget is None or started < budget:
            sent = replace(step.move(item, DeviceState.TARGETED, "bundle sent"),
                           targeted_ms=step.now, previous=view.active if view else None)
            step.send(sent, Action.INSTALL)
            started += 1
    step.rollout = replace(step.rollout, started_in_wave=step.rollout.started_in_wave + started)
    _advance(step)  # a wave of only incompatible or up-to-date devices is done at once


def _rate_budget(step: _Step) -> int | None:
    """How many more devices may be sent the bundle now (None: no limit).

    A rate of R devices per minute allows 1 at once and R per minute after that.
    """
    rate = step.rollout.spec.rate(step.rollout.wave)
    if rate is None:
        return None
    allowed = 1 + math.floor(rate * (step.now - step.rollout.wave_started_ms) / 60_000)
    return max(0, allowed - step.rollout.started_in_wave)


def _resend(step: _Step) -> None:
    """A device that entered probation after a commit/rollback was sent did not act on it
    (it was still on the way there): tell it again. An offline one is not: it gets the
    retained word when it returns (what the registry shows is what it said before)."""
    for item in step.following():
        view = step.observed.devices.get(item.device)
        if view is None or not view.online or view.update_state != UpdateState.PROBATION or (
                view.update_target != step.target):
            continue
        if item.state not in (DeviceState.COMMITTING, DeviceState.ROLLING_BACK):
            continue
        if view.update_since_ms > item.sent_ms or step.now - item.sent_ms > RESEND_MS:
            action = Action.COMMIT if item.state == DeviceState.COMMITTING else Action.ROLLBACK
            step.send(item, action)


def _version(ref: BundleRef | None) -> str:
    return f"{ref.name} {ref.version}" if ref else "nothing"


# Operator actions: pure too.

def pause(rollout: Rollout, now_ms: int) -> Decisions:
    return _operator(rollout, now_ms, RolloutState.PAUSED,
                     (RolloutState.RUNNING, RolloutState.WAITING), "pause",
                     "paused by an operator")


def resume(rollout: Rollout, now_ms: int) -> Decisions:
    return _operator(rollout, now_ms, RolloutState.RUNNING, (RolloutState.PAUSED,),
                     "resume", "resumed by an operator")


def abort(rollout: Rollout, now_ms: int, reason: str = "aborted by an operator") -> Decisions:
    step = _Step(rollout, Observations({}), now_ms)
    _check_state(rollout, (RolloutState.PENDING, *_UNDER_WAY), "abort")
    _abort(step, reason)
    return step.done()


def rollback(rollout: Rollout, now_ms: int, only: frozenset[str] | None = None) -> Decisions:
    """Return every touched device (or those of ``only``) to what it ran before.

    Devices that committed roll back to their previous committed bundle; devices still
    on the way are rolled back when they reach probation; pending ones are cancelled.
    """
    if only is None:
        _check_state(rollout, tuple(s for s in RolloutState if s != RolloutState.ROLLED_BACK),
                     "rollback")
    step = _Step(rollout, Observations({}), now_ms)
    for item in list(step.devices.values()):
        if only is not None and item.device not in only:
            continue
        if item.state == DeviceState.SUCCEEDED and _added(item):
            step.set(replace(item, reason=_kept_reason(rollout)))  # it stays as it is
        elif item.state in (*ACTIVE, DeviceState.SUCCEEDED, DeviceState.TIMED_OUT):
            step.send(step.move(item, DeviceState.ROLLING_BACK, "rollback asked for"),
                      Action.ROLLBACK)
        elif item.state == DeviceState.PENDING:
            step.move(item, DeviceState.CANCELLED, "rolled back before its turn")
    if only is None or not any(d.state in (*ACTIVE, DeviceState.SUCCEEDED, DeviceState.PENDING)
                               and not _kept(d) for d in step.devices.values()):
        kept = sum(1 for d in step.devices.values() if _kept(d))
        model = rollout.spec.model
        step.state(RolloutState.ROLLED_BACK, "rolled back by an operator" + (
            f"; {kept} of {len(step.devices)} devices keep {model.name} {model.version}: "
            "the rollout added it, and they had no earlier version to go back to"
            if kept else ""))
    return step.done()


def _added(item: RolloutDevice) -> bool:
    """Whether the rollout added its model to the device: it sent the bundle to a device
    that ran no version of that model (nothing a rollback could return it to)."""
    return item.targeted_ms > 0 and item.previous is None


def _kept_reason(rollout: Rollout) -> str:
    model = rollout.spec.model
    return (f"kept {model.name} {model.version}: nothing to roll back to (the rollout added "
            "the model; remove it on the device with `edgefleet agent remove`)")


def _kept(item: RolloutDevice) -> bool:
    """A device a rollback left with the model its rollout added (marked by its reason)."""
    return item.state == DeviceState.SUCCEEDED and item.reason.startswith("kept ") and _added(item)


def _operator(rollout: Rollout, now_ms: int, state: RolloutState,
              allowed: tuple[RolloutState, ...], verb: str, reason: str) -> Decisions:
    _check_state(rollout, allowed, verb)
    step = _Step(rollout, Observations({}), now_ms)
    step.state(state, reason)
    return step.done()


#: How each refusal is worded: the verb, and its hint.
_REFUSAL_HINTS = {
    "pause": "only a rollout that is {allowed} can be paused",
    "resume": "only a paused rollout can be resumed",
    "abort": "it has already ended",
    "rollback": "it has already been rolled back; nothing is left to undo",
}
_VERB_WORDS = {"pause": "pause", "resume": "resume", "abort": "abort", "rollback": "roll back"}


def refusal(rollout_id: str, state: RolloutState, allowed: tuple[RolloutState, ...],
            verb: str) -> tuple[str, str]:
    """The message and hint of an operator action refused in ``state``."""
    names = " or ".join(s.value for s in allowed)
    return (f"cannot {_VERB_WORDS[verb]} rollout {rollout_id}: it is {state.value}",
            _REFUSAL_HINTS[verb].format(allowed=names))


def _check_state(rollout: Rollout, allowed: tuple[RolloutState, ...], verb: str) -> None:
    if rollout.state not in allowed:
        message, hint = refusal(rollout.id, rollout.state, allowed, verb)
        raise ConflictError(message, hint=hint)
