"""The rollout executor: a pure ``tick(rollout, observations, now_ms) -> Decisions``.

No I/O and no clock: the controller observes (devices, telemetry), calls ``tick``,
persists the new rollout, and only then publishes what ``Decisions.sends`` asks for.
A tick does, in this order:

1. start a PENDING rollout: freeze the selected devices into waves (an empty selection
   succeeds at once: there is nothing to do);
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
6. send the bundle to the current wave's pending devices, at most as fast as the rate.

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
from edgefleet.fleet.errors import ConflictError
from edgefleet.fleet.rollout.spec import wave_bounds
from edgefleet.fleet.rollout.state import (
    ACTIVE,
    DeviceState,
    Rollout,
    RolloutDevice,
    RolloutState,
)

__all__ = ["FOLLOWED", "Action", "Decisions", "DeviceView", "Observations", "Quality", "Send",
           "abort", "gate_failure", "pause", "resume", "rollback", "tick"]

RESEND_MS = 5_000  # a device still in probation after a commit/rollback this old is told again
_IN_FLIGHT = ("DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK", "SWITCHING")
_SETTLED = ("COMMITTED", "IDLE")

# The devices a tick follows (their reports, timeouts, commits, rollbacks): on their way,
# rolling back, timed out (they may answer late) or failed (they may retry). The others
# are settled, or not sent anything yet.
FOLLOWED = ACTIVE | {DeviceState.ROLLING_BACK, DeviceState.TIMED_OUT, DeviceState.FAILED}


class Action(str, Enum):
    INSTALL = "install"
    COMMIT = "commit"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class DeviceView:
    """What the controller knows of one device right now."""

    online: bool
    active: BundleRef | None
    update_state: str = "IDLE"
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


class _Tick:
    """Mutable scratch space for one tick; the result is immutable again."""

    def __init__(self, rollout: Rollout, obs: Observations, now: int) -> None:
        self.r, self.obs, self.now = rollout, obs, now
        self.devices: dict[str, RolloutDevice] = dict(rollout.devices)
        self.out = Decisions(rollout)
        # those it follows, in the rollout's order: after one pass, a tick of a finished
        # rollout of 10,000 devices costs in proportion to its few unsettled ones
        self.followed = [d.device for d in rollout.devices.values() if d.state in FOLLOWED]

    def following(self) -> list[RolloutDevice]:
        """The devices followed this tick, as they are now (no other enters a followed
        state during a tick but pending ones being sent the bundle)."""
        return [self.devices[device] for device in self.followed]

    @property
    def target(self) -> str:
        return self.r.spec.model.sha256

    def set(self, item: RolloutDevice) -> None:
        self.devices[item.device] = item
        self.out.changed.add(item.device)

    def move(self, item: RolloutDevice, state: DeviceState, reason: str = "") -> RolloutDevice:
        moved = item.moved(state, self.now, reason)
        self.set(moved)
        return moved

    def send(self, item: RolloutDevice, action: Action,
             bundle: BundleRef | None = None) -> RolloutDevice:
        sent = replace(item, sent_ms=self.now)
        self.set(sent)
        self.out.sends.append(Send(item.device, action, bundle))
        return sent

    def state(self, state: RolloutState, reason: str = "") -> None:
        self.r = replace(self.r, state=state, reason=reason or self.r.reason)
        self.out.notes.append(f"rollout {state.value.lower()}" + (f": {reason}" if reason else ""))

    def done(self) -> Decisions:
        changed = self.out.changed or self.out.sends or self.out.notes
        rollout = replace(self.r, devices=self.devices,
                          updated_ms=self.now if changed else self.r.updated_ms)
        return replace(self.out, rollout=rollout)


def tick(rollout: Rollout, observations: Observations, now_ms: int) -> Decisions:
    """One step of ``rollout`` given what the fleet looks like at ``now_ms``."""
    t = _Tick(rollout, observations, now_ms)
    if t.r.state == RolloutState.PENDING:
        _start(t)
    if t.r.state in (RolloutState.RUNNING, RolloutState.PAUSED):
        _join_newcomers(t)
    _follow_devices(t)
    if t.r.state in (RolloutState.RUNNING, RolloutState.PAUSED):
        reason = _failure(t) or gate_failure(t.r, observations)
        if reason:
            _abort(t, reason)
    if t.r.state in (RolloutState.RUNNING, RolloutState.SUCCEEDED):
        _commit_soaked(t)
    if t.r.state == RolloutState.RUNNING:
        _advance(t)
    if t.r.state == RolloutState.RUNNING:
        _send_installs(t)
    _resend(t)
    return t.done()


def _start(t: _Tick) -> None:
    selected = sorted(t.obs.devices)
    if not selected:
        t.state(RolloutState.SUCCEEDED, "no device matches the selector: nothing to do")
        return
    bounds = wave_bounds(t.r.spec.waves, len(selected))
    wave = 0
    for index, device in enumerate(selected):
        while index >= bounds[wave]:
            wave += 1
        t.set(RolloutDevice(device, wave, since_ms=t.now))
    t.r = replace(t.r, wave=0, wave_started_ms=t.now, started_in_wave=0)
    t.state(RolloutState.RUNNING, f"{len(selected)} devices in {len(bounds)} waves")
    t.out.notes.append(f"wave 1 of {len(bounds)} started")


def _join_newcomers(t: _Tick) -> None:
    last = len(t.r.spec.waves) - 1
    for device in sorted(set(t.obs.devices) - set(t.devices)):
        t.set(RolloutDevice(device, last, since_ms=t.now, reason="joined while running"))
        t.out.notes.append(f"{device} joined; it goes in the last wave")


def _follow_devices(t: _Tick) -> None:
    for item in t.following():
        view = t.obs.devices.get(item.device)
        if item.state == DeviceState.ROLLING_BACK:
            _follow_rollback(t, item, view)
        elif item.state in ACTIVE or item.state == DeviceState.TIMED_OUT:
            _follow_update(t, item, view)
        elif item.state == DeviceState.FAILED:
            _follow_retry(t, item, view)


def _follow_update(t: _Tick, item: RolloutDevice, view: DeviceView | None) -> None:
    reported = _reported(t, view)
    if item.state == DeviceState.TARGETED and _earlier_attempt(item, view):
        reported = None
    if item.state == DeviceState.TIMED_OUT and not _late_answer(item, view, reported):
        reported = None
    if reported is not None and view is not None and _RANK[reported] > _RANK[item.state]:
        late = " (late)" if item.state == DeviceState.TIMED_OUT else ""
        detail = view.update_detail if reported == DeviceState.FAILED else ""
        moved = t.move(item, reported, detail or f"device reported {view.update_state}{late}")
        if late and reported == DeviceState.UPDATING:
            # its clock restarts: a fresh --device-timeout to reach probation, instead of
            # timing out again at the next tick (and again after every report)
            t.set(replace(moved, targeted_ms=t.now))
        if reported == DeviceState.FAILED:
            t.out.cleared.append(item.device)
        return
    limit_ms = t.r.spec.device_timeout_s * 1000
    if item.state in (DeviceState.TARGETED, DeviceState.UPDATING):
        if t.now - item.targeted_ms > limit_ms:
            where = "offline" if view is None or not view.online else (
                f"still {view.update_state}")
            t.move(item, DeviceState.TIMED_OUT,
                   f"no answer within {t.r.spec.device_timeout_s:g}s ({where})")
    elif item.state == DeviceState.COMMITTING and t.now - item.since_ms > limit_ms:
        t.move(item, DeviceState.TIMED_OUT,
               f"commit not confirmed within {t.r.spec.device_timeout_s:g}s")


def _earlier_attempt(item: RolloutDevice, view: DeviceView | None) -> bool:
    """A failure or rollback the device reported before this rollout sent it the bundle is
    about an earlier attempt (an earlier rollout of the same version): the device starts a
    new one for this rollout (docs/protocol.md, "Desired state"), so it is no answer."""
    return (view is not None and view.update_state in ("FAILED", "ROLLED_BACK")
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


def _follow_retry(t: _Tick, item: RolloutDevice, view: DeviceView | None) -> None:
    """A failed device that works on this rollout's bundle again is followed again.

    Its agent retries when it gets the install again (a device that gave up a download
    during a long network cut re-receives the retained install when it reconnects, before
    the cleared desired state reaches it). Online, on its way to (or in) probation on the
    target, it is a late answer: while the rollout runs it goes on (soak, gates, commit,
    with a fresh ``--device-timeout``) and counts as it then ends; after a success it is
    committed; after an abort or a rollback it is rolled back. A device that settled
    (committed, failed, rolled back) is left alone.
    """
    reported = _reported(t, view)
    if view is None or not view.online or reported not in (DeviceState.UPDATING,
                                                            DeviceState.PROBATION):
        return
    retried = f"device retried after failing: reported {view.update_state}"
    if t.r.state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK):
        ended = t.r.state.value.lower().replace("_", " ")
        t.send(t.move(item, DeviceState.ROLLING_BACK, f"{retried}; the rollout was {ended}"),
               Action.ROLLBACK)
        return
    t.set(replace(t.move(item, reported, retried), targeted_ms=t.now))


# A device only moves forward; a failure is always taken; a timed-out device that answers
# late is followed again (a failed one that retries too, see _follow_retry).
_RANK = {DeviceState.TIMED_OUT: -1, DeviceState.TARGETED: 0, DeviceState.UPDATING: 1,
         DeviceState.PROBATION: 2, DeviceState.COMMITTING: 3, DeviceState.SUCCEEDED: 4,
         DeviceState.FAILED: 5}


def _reported(t: _Tick, view: DeviceView | None) -> DeviceState | None:
    """What the device's own report says about this rollout's bundle (None: nothing yet)."""
    if view is None:
        return None
    if view.active_sha == t.target and view.update_state in _SETTLED:
        return DeviceState.SUCCEEDED
    if view.update_target != t.target:
        return None
    if view.update_state == "PROBATION":
        return DeviceState.PROBATION
    if view.update_state in _IN_FLIGHT:
        return DeviceState.UPDATING
    if view.update_state in ("FAILED", "ROLLING_BACK", "ROLLED_BACK"):
        return DeviceState.FAILED
    return None


def _follow_rollback(t: _Tick, item: RolloutDevice, view: DeviceView | None) -> None:
    if view is None or not view.online:
        # what it said before it went away is no answer: it may have started the update
        # since (its report did not get out), so it is only marked rolled back once it is
        # back and says so; the retained rollback waits for it on the broker
        return
    previous = item.previous.sha256 if item.previous else None
    if previous and view.update_target == previous and view.update_state == "PROBATION":
        if view.update_since_ms > item.sent_ms or t.now - item.sent_ms > RESEND_MS:
            t.send(item, Action.COMMIT, item.previous)  # the re-installed previous bundle
        return
    if previous and view.update_target == previous and view.update_state == "FAILED":
        t.move(item, DeviceState.FAILED, f"rollback failed: {view.update_detail}")
        return
    settled = view.update_state in (*_SETTLED, "ROLLED_BACK", "FAILED")
    if view.active_sha != t.target and settled:
        t.move(item, DeviceState.ROLLED_BACK, f"running {_version(view.active)}")
        t.out.cleared.append(item.device)


def _failure(t: _Tick) -> str:
    """Failures above ``max_failures_pct`` of the devices the waves so far hold.

    The share is judged against the whole of the current and earlier waves (not against
    the devices sent the bundle so far), so a rate or a small first send does not turn
    one failure into 50%; it still fires as soon as the failures alone are too many for
    those waves, before every device was sent the bundle.
    """
    waves = [d for d in t.devices.values() if d.wave <= t.r.wave and d.state not in (
        DeviceState.INCOMPATIBLE, DeviceState.CANCELLED)]
    failed, total = sum(1 for d in waves if d.state == DeviceState.FAILED), len(waves)
    if not failed:
        return ""
    pct = 100.0 * failed / total
    if pct > t.r.spec.gates.max_failures_pct:
        return (f"{failed} of {total} devices failed ({pct:.1f}%), above --max-failures "
                f"{t.r.spec.gates.max_failures_pct:g}%")
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


def _abort(t: _Tick, reason: str) -> None:
    t.state(RolloutState.ABORTED, reason)
    for item in list(t.devices.values()):
        # a timed-out device never confirmed the version either: it is told to roll back
        # too, and does so when it comes back (instead of carrying out an older word)
        if item.state in ACTIVE or item.state == DeviceState.TIMED_OUT:
            t.send(t.move(item, DeviceState.ROLLING_BACK, "rollout aborted"), Action.ROLLBACK)
        elif item.state == DeviceState.PENDING:
            t.move(item, DeviceState.CANCELLED, "rollout aborted before its turn")


def _commit_soaked(t: _Tick) -> None:
    soak_ms = t.r.spec.soak_s * 1000
    for item in t.following():
        if item.state == DeviceState.PROBATION and t.now - item.since_ms >= soak_ms:
            t.send(t.move(item, DeviceState.COMMITTING, "soak passed"), Action.COMMIT)


def _advance(t: _Tick) -> None:
    while t.r.state == RolloutState.RUNNING:
        wave = [d for d in t.devices.values() if d.wave <= t.r.wave]
        if any(d.state in ACTIVE or d.state == DeviceState.PENDING for d in wave):
            return
        current = [d for d in wave if d.wave == t.r.wave]
        eligible = [d for d in current if d.state not in (DeviceState.INCOMPATIBLE,
                                                          DeviceState.CANCELLED)]
        succeeded = sum(1 for d in eligible if d.state == DeviceState.SUCCEEDED)
        pct = 100.0 * succeeded / len(eligible) if eligible else 100.0
        label = f"wave {t.r.wave + 1} of {len(t.r.spec.waves)}"
        if pct < t.r.spec.gates.min_success_pct:
            _abort(t, f"{label}: {succeeded} of {len(eligible)} devices succeeded ({pct:.1f}%), "
                      f"below --min-success {t.r.spec.gates.min_success_pct:g}%")
            return
        if t.r.wave + 1 >= len(t.r.spec.waves):
            total = sum(1 for d in t.devices.values() if d.state == DeviceState.SUCCEEDED)
            t.state(RolloutState.SUCCEEDED, f"{total} of {len(t.devices)} devices run "
                                            f"{t.r.spec.model.version}")
            return
        t.r = replace(t.r, wave=t.r.wave + 1, wave_started_ms=t.now, started_in_wave=0)
        t.out.notes.append(f"{label} done ({succeeded}/{len(eligible)} succeeded); "
                           f"wave {t.r.wave + 1} started")


def _send_installs(t: _Tick) -> None:
    budget = _rate_budget(t)
    pending = sorted((d for d in t.devices.values()
                      if d.state == DeviceState.PENDING and d.wave <= t.r.wave),
                     key=lambda d: (d.wave, d.device))
    started = 0
    for item in pending:
        view = t.obs.devices.get(item.device)
        if view is not None and view.incompatible:
            t.move(item, DeviceState.INCOMPATIBLE, view.incompatible)
        elif view is not None and view.active_sha == t.target and (
                view.update_state in _SETTLED):
            t.move(item, DeviceState.SUCCEEDED, "already running it")
        elif budget is None or started < budget:
            sent = replace(t.move(item, DeviceState.TARGETED, "bundle sent"),
                           targeted_ms=t.now, previous=view.active if view else None)
            t.send(sent, Action.INSTALL)
            started += 1
    t.r = replace(t.r, started_in_wave=t.r.started_in_wave + started)
    _advance(t)  # a wave of only incompatible or up-to-date devices is done at once


def _rate_budget(t: _Tick) -> int | None:
    """How many more devices may be sent the bundle now (None: no limit).

    A rate of R devices per minute allows 1 at once and R per minute after that.
    """
    rate = t.r.spec.rate(t.r.wave)
    if rate is None:
        return None
    allowed = 1 + math.floor(rate * (t.now - t.r.wave_started_ms) / 60_000)
    return max(0, allowed - t.r.started_in_wave)


def _resend(t: _Tick) -> None:
    """A device that entered probation after a commit/rollback was sent did not act on it
    (it was still on the way there): tell it again. An offline one is not: it gets the
    retained word when it returns (what the registry shows is what it said before)."""
    for item in t.following():
        view = t.obs.devices.get(item.device)
        if view is None or not view.online or view.update_state != "PROBATION" or (
                view.update_target != t.target):
            continue
        if item.state not in (DeviceState.COMMITTING, DeviceState.ROLLING_BACK):
            continue
        if view.update_since_ms > item.sent_ms or t.now - item.sent_ms > RESEND_MS:
            action = Action.COMMIT if item.state == DeviceState.COMMITTING else Action.ROLLBACK
            t.send(item, action)


def _version(ref: BundleRef | None) -> str:
    return f"{ref.name} {ref.version}" if ref else "nothing"


# Operator actions: pure too.

def pause(rollout: Rollout, now_ms: int) -> Decisions:
    return _operator(rollout, now_ms, RolloutState.PAUSED, (RolloutState.RUNNING,),
                     "paused by an operator")


def resume(rollout: Rollout, now_ms: int) -> Decisions:
    return _operator(rollout, now_ms, RolloutState.RUNNING, (RolloutState.PAUSED,),
                     "resumed by an operator")


def abort(rollout: Rollout, now_ms: int, reason: str = "aborted by an operator") -> Decisions:
    t = _Tick(rollout, Observations({}), now_ms)
    _check_state(rollout, (RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED),
                 "abort")
    _abort(t, reason)
    return t.done()


def rollback(rollout: Rollout, now_ms: int, only: frozenset[str] | None = None) -> Decisions:
    """Return every touched device (or those of ``only``) to what it ran before.

    Devices that committed roll back to their previous committed bundle; devices still
    on the way are rolled back when they reach probation; pending ones are cancelled.
    """
    t = _Tick(rollout, Observations({}), now_ms)
    for item in list(t.devices.values()):
        if only is not None and item.device not in only:
            continue
        if item.state in (*ACTIVE, DeviceState.SUCCEEDED, DeviceState.TIMED_OUT):
            t.send(t.move(item, DeviceState.ROLLING_BACK, "rollback asked for"),
                   Action.ROLLBACK)
        elif item.state == DeviceState.PENDING:
            t.move(item, DeviceState.CANCELLED, "rolled back before its turn")
    if only is None or not any(d.state in (*ACTIVE, DeviceState.SUCCEEDED, DeviceState.PENDING)
                               for d in t.devices.values()):
        t.state(RolloutState.ROLLED_BACK, "rolled back by an operator")
    return t.done()


def _operator(rollout: Rollout, now_ms: int, state: RolloutState,
              allowed: tuple[RolloutState, ...], reason: str) -> Decisions:
    _check_state(rollout, allowed, state.value.lower())
    t = _Tick(rollout, Observations({}), now_ms)
    t.state(state, reason)
    return t.done()


def _check_state(rollout: Rollout, allowed: tuple[RolloutState, ...], verb: str) -> None:
    if rollout.state not in allowed:
        raise ConflictError(f"cannot {verb} rollout {rollout.id}: it is {rollout.state.value}",
                            hint=f"only a rollout that is {' or '.join(s.value for s in allowed)}"
                                 f" can be {verb}ed" if verb != "abort" else
                                 "it has already ended")
