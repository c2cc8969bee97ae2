"""The pure rollout executor: table-driven, no broker, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.fleet.errors import ConflictError, InvalidRolloutError
from edgefleet.fleet.rollout.executor import (
    Action,
    Decisions,
    DeviceView,
    Observations,
    Quality,
    Send,
    abort,
    pause,
    resume,
    rollback,
    tick,
)
from edgefleet.fleet.rollout.spec import (
    Gates,
    RolloutSpec,
    Selector,
    Wave,
    parse_waves,
    wave_bounds,
)
from edgefleet.fleet.rollout.state import DeviceState, Rollout, RolloutState

OLD = BundleRef(name="digits", version="1.0.0", sha256="1" * 64)
NEW = BundleRef(name="digits", version="2.0.0", sha256="2" * 64)
MIN = 60_000
NO_DATA = Quality()


def spec(**changes: object) -> RolloutSpec:
    base = RolloutSpec(model=NEW, url="http://c/b.efb", size=100,
                       selectors=(Selector("group", "cams"),))
    return replace(base, **changes)  # type: ignore[arg-type]


def fleet(n: int, **view: object) -> dict[str, DeviceView]:
    return {f"d{i:02d}": DeviceView(online=True, active=OLD, update_state="COMMITTED",
                                    **view)  # type: ignore[arg-type]
            for i in range(n)}


def on(update_state: str, active: BundleRef = OLD, since: int = 0) -> DeviceView:
    return DeviceView(online=True, active=active, update_state=update_state,
                      update_target=NEW.sha256, update_since_ms=since)


def committed_new() -> DeviceView:
    return DeviceView(online=True, active=NEW, update_state="COMMITTED",
                      update_target=NEW.sha256)


def run(rollout: Rollout, devices: dict[str, DeviceView], now: int,
        candidate: Quality = NO_DATA, baseline: Quality = NO_DATA) -> Decisions:
    return tick(rollout, Observations(devices, candidate, baseline), now)


def installs(d: Decisions) -> list[str]:
    return [s.device for s in d.sends if s.action == Action.INSTALL]


def states(r: Rollout) -> dict[str, str]:
    return {k: v.state.value for k, v in sorted(r.devices.items())}


def started(n: int, **changes: object) -> tuple[Rollout, dict[str, DeviceView]]:
    devices = fleet(n)
    first = run(Rollout("r1", spec(**changes)), devices, 0)
    return first.rollout, devices


# --- waves and spec ---------------------------------------------------------------------

@pytest.mark.parametrize(("waves", "total", "bounds"), [
    ("1%,10%,50%,100%", 10, [1, 1, 5, 10]),
    ("1%,10%,50%,100%", 1000, [10, 100, 500, 1000]),
    ("1%,10%,50%,100%", 0, [0, 0, 0, 0]),
    ("2,100%", 10, [2, 10]),
    ("50", 10, [10, 10]),  # a count above the group is everyone; 100% is always added
    ("33%,66%", 3, [1, 2, 3]),
])
def test_wave_bounds_are_cumulative_round_up_and_reach_everyone(
        waves: str, total: int, bounds: list[int]) -> None:
    assert wave_bounds(parse_waves(waves), total) == bounds


@pytest.mark.parametrize(("text", "problem"), [
    ("0%", "out of range"), ("150%", "out of range"), ("x", "not a number"),
    ("1.5", "whole number"), ("", "at least one wave"),
])
def test_bad_waves_are_refused_at_creation(text: str, problem: str) -> None:
    with pytest.raises(InvalidRolloutError, match=problem):
        parse_waves(text)


@pytest.mark.parametrize("changes", [
    {"gates": Gates(max_failures_pct=101)}, {"gates": Gates(min_success_pct=-1)},
    {"gates": Gates(max_p95_ratio=0)}, {"rate_per_min": 0}, {"exponential": 0.5},
    {"device_timeout_s": 0}, {"soak_s": -1}, {"selectors": ()},
])
def test_bad_thresholds_are_refused_when_the_rollout_is_created(changes: dict[str, object]
                                                                 ) -> None:
    with pytest.raises(InvalidRolloutError):
        spec(**changes)


def test_spec_round_trips_through_json() -> None:
    original = spec(waves=(Wave(1, False), Wave(50, True)), rate_per_min=5, exponential=2,
                    gates=Gates(max_p95_ratio=1.5, min_agreement_pct=95))
    assert RolloutSpec.from_dict(original.as_dict()) == original


# --- starting ---------------------------------------------------------------------------

def test_an_empty_selection_succeeds_at_once_with_nothing_sent() -> None:
    d = run(Rollout("r1", spec()), {}, 0)
    assert d.rollout.state == RolloutState.SUCCEEDED
    assert "no device matches" in d.rollout.reason and d.sends == []


def test_the_first_tick_freezes_waves_and_sends_only_the_first_wave() -> None:
    rollout, _ = started(10, waves=parse_waves("10%,50%,100%"))
    assert rollout.state == RolloutState.RUNNING
    assert sorted(d.wave for d in rollout.devices.values()) == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert states(rollout)["d00"] == "TARGETED"
    assert list(states(rollout).values()).count("TARGETED") == 1


def test_canary_then_everyone() -> None:
    rollout, _ = started(5, waves=(Wave(2, False),))
    assert list(states(rollout).values()).count("TARGETED") == 2


def test_offline_devices_are_sent_the_bundle_too_and_get_it_when_they_return() -> None:
    devices = fleet(2)
    devices["d01"] = replace(devices["d01"], online=False)
    d = run(Rollout("r1", spec()), devices, 0)
    assert installs(d) == ["d00", "d01"]  # retained desired state waits for d01 on the broker


def test_devices_already_on_the_target_succeed_without_being_sent_anything() -> None:
    devices = {"d00": committed_new(), **{k: v for k, v in fleet(2).items() if k != "d00"}}
    d = run(Rollout("r1", spec()), devices, 0)
    assert installs(d) == ["d01"]
    assert d.rollout.devices["d00"].state == DeviceState.SUCCEEDED


def test_incompatible_devices_are_never_sent_the_bundle_and_say_why() -> None:
    devices = fleet(3)
    devices["d01"] = replace(devices["d01"], incompatible="litert 2.1 < 2.3 needed")
    d = run(Rollout("r1", spec()), devices, 0)
    assert installs(d) == ["d00", "d02"]
    item = d.rollout.devices["d01"]
    assert item.state == DeviceState.INCOMPATIBLE and "2.3 needed" in item.reason


# --- following devices ------------------------------------------------------------------

def test_a_device_goes_from_targeted_to_succeeded_through_probation_and_commit() -> None:
    rollout, devices = started(1, soak_s=30)
    devices["d00"] = on("DOWNLOADING")
    rollout = run(rollout, devices, 1000).rollout
    assert states(rollout) == {"d00": "UPDATING"}
    devices["d00"] = on("PROBATION", NEW, since=2000)
    d = run(rollout, devices, 2000)
    assert states(d.rollout) == {"d00": "PROBATION"} and d.sends == []
    d = run(d.rollout, devices, 2000 + 29_999)
    assert d.sends == []  # soak not over
    d = run(d.rollout, devices, 2000 + 30_000)
    assert d.sends == [Send("d00", Action.COMMIT)]
    devices["d00"] = committed_new()
    d = run(d.rollout, devices, 40_000)
    assert states(d.rollout) == {"d00": "SUCCEEDED"}
    assert d.rollout.state == RolloutState.SUCCEEDED


def test_reports_never_move_a_device_backwards() -> None:
    rollout, devices = started(1)
    devices["d00"] = on("PROBATION", NEW)
    d = run(rollout, devices, 1000)
    assert states(d.rollout) == {"d00": "COMMITTING"}  # no soak: committed at once
    d = run(d.rollout, devices, 1500)  # the device still says PROBATION
    assert states(d.rollout) == {"d00": "COMMITTING"}


def test_a_commit_sent_before_the_device_reached_probation_is_sent_again() -> None:
    rollout, devices = started(1)
    devices["d00"] = on("PROBATION", NEW, since=1000)
    d = run(rollout, devices, 1000)
    assert d.sends == [Send("d00", Action.COMMIT)]
    d = run(d.rollout, devices, 2000)
    assert d.sends == []  # it has it
    devices["d00"] = on("PROBATION", NEW, since=2500)  # re-entered probation after a restart
    d = run(d.rollout, devices, 3000)
    assert d.sends == [Send("d00", Action.COMMIT)]


# --- timeouts ---------------------------------------------------------------------------

def test_a_device_that_never_answers_times_out_so_the_rollout_ends() -> None:
    rollout, devices = started(2, device_timeout_s=60, gates=Gates(min_success_pct=50))
    devices["d00"] = committed_new()
    devices["d01"] = replace(devices["d01"], online=False)
    d = run(rollout, devices, 60_000)
    assert states(d.rollout) == {"d00": "SUCCEEDED", "d01": "TARGETED"}  # exactly at the limit
    d = run(d.rollout, devices, 60_001)
    assert states(d.rollout)["d01"] == "TIMED_OUT"
    assert "offline" in d.rollout.devices["d01"].reason
    assert d.rollout.state == RolloutState.SUCCEEDED  # 50% succeeded, not below 50%


def test_timeouts_count_against_min_success_not_as_failures() -> None:
    rollout, devices = started(2, device_timeout_s=60)
    devices["d00"] = committed_new()
    d = run(rollout, devices, 61_000)
    assert d.rollout.state == RolloutState.ABORTED
    assert "below --min-success 100%" in d.rollout.reason


def test_a_timed_out_device_that_answers_late_is_followed_again() -> None:
    rollout, devices = started(2, device_timeout_s=60, waves=parse_waves("50%"),
                               gates=Gates(min_success_pct=0))
    d = run(rollout, devices, 61_000)
    assert states(d.rollout)["d00"] == "TIMED_OUT"
    devices["d00"] = on("PROBATION", NEW, since=70_000)
    d = run(d.rollout, devices, 70_000)
    assert d.rollout.devices["d00"].state == DeviceState.COMMITTING
    assert "(late)" in d.rollout.devices["d00"].reason or d.sends


# --- gates ------------------------------------------------------------------------------

@pytest.mark.parametrize(("failed", "of", "max_pct", "aborts"), [
    (1, 4, 25.0, False),  # exactly at the threshold: does not fire
    (2, 4, 25.0, True),
    (1, 4, 0.0, True),
    (0, 4, 0.0, False),
])
def test_max_failures_fires_strictly_above(failed: int, of: int, max_pct: float,
                                          aborts: bool) -> None:
    rollout, devices = started(of + 1, waves=(Wave(of, False),),
                               gates=Gates(max_failures_pct=max_pct, min_success_pct=0))
    for i in range(failed):
        devices[f"d{i:02d}"] = on("FAILED")
    d = run(rollout, devices, 1000)
    assert (d.rollout.state == RolloutState.ABORTED) is aborts
    if aborts:
        assert "above --max-failures" in d.rollout.reason
        assert states(d.rollout)[f"d{of:02d}"] == "CANCELLED"  # never reached


def rate_limited(n: int, waves: tuple[Wave, ...]) -> tuple[Rollout, dict[str, DeviceView]]:
    """--max-failures 20 alone (min-success follows it) and 30 devices a minute: one
    device is sent the bundle at once, one more every 2 s."""
    return started(n, waves=waves, rate_per_min=30, soak_s=0,
                   gates=Gates(max_failures_pct=20, min_success_pct=80))


def step(d: Decisions, devices: dict[str, DeviceView], failing: set[str]) -> None:
    """Every device sent the bundle answers: the failing ones fail, the others commit."""
    for device, item in d.rollout.devices.items():
        if item.state == DeviceState.TARGETED:
            devices[device] = on("FAILED", since=10**9) if device in failing else (
                committed_new())


def test_one_failure_in_a_rate_limited_wave_of_five_is_20_percent_and_advances() -> None:
    rollout, devices = rate_limited(6, (Wave(5, False), Wave(100, True)))
    d = run(rollout, devices, 0)
    for now in range(2000, 12_000, 2000):
        step(d, devices, {"d00"})
        d = run(d.rollout, devices, now)
        assert d.rollout.state == RolloutState.RUNNING, d.rollout.reason
    assert d.rollout.wave == 1  # the first wave (4 of 5 succeeded) passed
    assert states(d.rollout)["d00"] == "FAILED"
    step(d, devices, {"d00"})
    d = run(d.rollout, devices, 12_000)
    assert (d.rollout.state, d.rollout.reason) == (RolloutState.SUCCEEDED,
                                                   "5 of 6 devices run 2.0.0")


def test_a_second_failure_of_five_aborts_as_soon_as_it_is_seen() -> None:
    rollout, devices = rate_limited(6, (Wave(5, False), Wave(100, True)))
    d = run(rollout, devices, 0)
    step(d, devices, {"d00", "d01"})
    d = run(d.rollout, devices, 2000)  # d00 failed (20%); d01 is sent the bundle
    assert d.rollout.state == RolloutState.RUNNING
    step(d, devices, {"d00", "d01"})
    d = run(d.rollout, devices, 3000)
    assert d.rollout.state == RolloutState.ABORTED
    assert d.rollout.reason.startswith("2 of 5 devices failed (40.0%), above --max-failures")
    assert [states(d.rollout)[f"d{i:02d}"] for i in range(2, 6)] == ["CANCELLED"] * 4


def test_the_failure_of_a_canary_of_one_is_all_of_its_wave_and_aborts() -> None:
    rollout, devices = rate_limited(5, (Wave(1, False), Wave(100, True)))
    devices["d00"] = on("FAILED", since=1)
    d = run(rollout, devices, 1000)
    assert d.rollout.state == RolloutState.ABORTED
    assert d.rollout.reason.startswith("1 of 1 devices failed (100.0%)")


def test_a_failed_device_keeps_its_reason_and_its_desired_state_is_cleared() -> None:
    rollout, devices = started(2, gates=Gates(max_failures_pct=50, min_success_pct=0))
    devices["d00"] = replace(on("FAILED"), update_detail="health check: outputs differ")
    d = run(rollout, devices, 1000)
    assert d.rollout.devices["d00"].reason == "health check: outputs differ"
    assert d.cleared == ["d00"]


QUALITY_CASES = [
    # (gates, candidate, baseline, fires)
    (Gates(max_error_rate_pct=5), Quality(95, 5), Quality(), False),  # exactly 5%
    (Gates(max_error_rate_pct=5), Quality(94, 6), Quality(), True),
    (Gates(max_p95_ratio=1.5), Quality(100, 0, 15.0), Quality(100, 0, 10.0), False),
    (Gates(max_p95_ratio=1.5), Quality(100, 0, 15.1), Quality(100, 0, 10.0), True),
    (Gates(max_p95_ratio=1.5), Quality(100, 0, 99.0), Quality(), False),  # no baseline yet
    (Gates(min_agreement_pct=90), Quality(100, 0, None, 0.90, 30), Quality(), False),
    (Gates(min_agreement_pct=90), Quality(100, 0, None, 0.89, 30), Quality(), True),
    # too few compared requests to judge agreement: one disagreement in 7 is 85.7%
    (Gates(min_agreement_pct=90), Quality(100, 0, None, 6 / 7, 7), Quality(), False),
    (Gates(min_agreement_pct=90), Quality(100, 0, None, 0.5, 29), Quality(), False),
    (Gates(max_error_rate_pct=5), Quality(10, 9), Quality(), False),  # below min_samples
]


@pytest.mark.parametrize(("gates", "candidate", "baseline", "fires"), QUALITY_CASES)
def test_quality_gates_compare_the_new_version_with_its_baseline(
        gates: Gates, candidate: Quality, baseline: Quality, fires: bool) -> None:
    rollout, devices = started(3, waves=(Wave(1, False),), soak_s=600, gates=gates)
    devices["d00"] = on("PROBATION", NEW)
    d = run(rollout, devices, 1000, candidate, baseline)
    assert (d.rollout.state == RolloutState.ABORTED) is fires
    if fires:
        assert d.sends == [Send("d00", Action.ROLLBACK)]
        assert states(d.rollout) == {"d00": "ROLLING_BACK", "d01": "CANCELLED",
                                     "d02": "CANCELLED"}


def test_the_error_condition_is_checked_before_the_success_condition() -> None:
    rollout, devices = started(1, gates=Gates(max_error_rate_pct=1))
    devices["d00"] = on("PROBATION", NEW)
    d = run(rollout, devices, 1000, Quality(50, 50))
    assert d.rollout.state == RolloutState.ABORTED
    assert d.sends == [Send("d00", Action.ROLLBACK)]  # never committed


def test_an_aborted_rollouts_devices_report_rolled_back_and_are_marked_so() -> None:
    rollout, devices = started(1, gates=Gates(max_error_rate_pct=1), soak_s=60)
    devices["d00"] = on("PROBATION", NEW)
    d = run(rollout, devices, 1000, Quality(50, 50))
    devices["d00"] = DeviceView(online=True, active=OLD, update_state="ROLLED_BACK",
                                update_target=NEW.sha256)
    d = run(d.rollout, devices, 2000)
    assert states(d.rollout) == {"d00": "ROLLED_BACK"}
    assert "digits 1.0.0" in d.rollout.devices["d00"].reason


# --- waves, rate, newcomers -------------------------------------------------------------

def test_the_next_wave_starts_only_when_the_current_one_is_done() -> None:
    rollout, devices = started(4, waves=parse_waves("25%,100%"))
    assert list(states(rollout).values()).count("TARGETED") == 1
    devices["d00"] = committed_new()
    d = run(rollout, devices, 1000)
    assert d.rollout.wave == 1 and installs(d) == ["d01", "d02", "d03"]
    assert any("wave 2 started" in n for n in d.notes)


def test_the_rate_limits_how_many_devices_start_per_minute_and_grows_exponentially() -> None:
    rollout, devices = started(20, rate_per_min=2, exponential=3,
                               waves=parse_waves("5,100%"))
    assert list(states(rollout).values()).count("TARGETED") == 1
    assert installs(run(rollout, devices, MIN // 2 - 1)) == []
    d = run(rollout, devices, MIN // 2)
    assert len(installs(d)) == 1
    d = run(d.rollout, devices, MIN * 2)
    assert len(installs(d)) == 3  # 1 + 2*2 = 5 in the first wave, which has 5
    for i in range(5):
        devices[f"d{i:02d}"] = committed_new()
    d = run(d.rollout, devices, MIN * 3)  # wave 2 at 6/min: 1 at once
    assert d.rollout.wave == 1
    d = run(d.rollout, devices, MIN * 4)
    assert d.rollout.started_in_wave == 7


def test_devices_that_join_while_running_go_in_the_last_wave() -> None:
    rollout, devices = started(2, waves=parse_waves("50%,100%"))
    devices["d99"] = fleet(1)["d00"]
    d = run(rollout, devices, 1000)
    assert d.rollout.devices["d99"].wave == 1 and installs(d) == []
    devices["d00"] = committed_new()
    d = run(d.rollout, devices, 2000)
    assert installs(d) == ["d01", "d99"]


def test_devices_that_join_after_the_end_are_left_alone() -> None:
    rollout, devices = started(1)
    devices["d00"] = committed_new()
    d = run(rollout, devices, 1000)
    assert d.rollout.state == RolloutState.SUCCEEDED
    devices["d99"] = fleet(1)["d00"]
    d = run(d.rollout, devices, 2000)
    assert "d99" not in d.rollout.devices and d.sends == []


# --- operators --------------------------------------------------------------------------

def test_a_paused_rollout_sends_nothing_new_until_resumed() -> None:
    rollout, devices = started(2, waves=parse_waves("50%,100%"))
    paused = pause(rollout, 10).rollout
    devices["d00"] = committed_new()
    d = run(paused, devices, 1000)
    assert d.rollout.state == RolloutState.PAUSED and d.sends == []
    d = run(resume(d.rollout, 2000).rollout, devices, 3000)
    assert installs(d) == ["d01"]


def test_pause_resume_and_abort_refuse_states_they_do_not_apply_to() -> None:
    rollout, _ = started(1)
    with pytest.raises(ConflictError, match="RUNNING"):
        resume(rollout, 0)
    ended = abort(rollout, 0).rollout
    assert ended.state == RolloutState.ABORTED
    with pytest.raises(ConflictError, match="ABORTED"):
        pause(ended, 0)


def test_rollback_returns_every_touched_device_and_cancels_the_rest() -> None:
    rollout, devices = started(3, waves=parse_waves("33%,100%"))
    devices["d00"] = committed_new()
    rollout = run(rollout, devices, 1000).rollout  # d00 done, wave 2 sent to d01, d02
    devices["d01"] = on("DOWNLOADING")
    rollout = run(rollout, devices, 2000).rollout
    d = rollback(rollout, 3000)
    assert d.rollout.state == RolloutState.ROLLED_BACK
    assert sorted(s.device for s in d.sends if s.action == Action.ROLLBACK) == ["d00", "d01",
                                                                                "d02"]
    devices["d00"] = DeviceView(online=True, active=OLD, update_state="ROLLED_BACK",
                                update_target=NEW.sha256)
    devices["d01"] = on("PROBATION", NEW, since=5000)  # it was still on its way
    d = run(d.rollout, devices, 5000)
    assert states(d.rollout)["d00"] == "ROLLED_BACK"
    assert d.sends == [Send("d01", Action.ROLLBACK)]  # told again once it can act on it


def test_rolling_back_some_devices_keeps_the_rollout_state() -> None:
    rollout, devices = started(2)
    devices["d00"] = committed_new()
    devices["d01"] = committed_new()
    rollout = run(rollout, devices, 1000).rollout
    d = rollback(rollout, 2000, only=frozenset({"d00"}))
    assert d.rollout.state == RolloutState.SUCCEEDED
    assert states(d.rollout) == {"d00": "ROLLING_BACK", "d01": "SUCCEEDED"}


def _with_one_added() -> tuple[Rollout, dict[str, DeviceView]]:
    """d00 ran digits 1.0.0 before; d01 ran no digits at all (the rollout added it). Both
    committed 2.0.0."""
    devices = {"d00": fleet(1)["d00"], "d01": DeviceView(online=True, active=None)}
    rollout = run(Rollout("r1", spec()), devices, 500).rollout
    devices = {"d00": committed_new(), "d01": committed_new()}
    rollout = run(rollout, devices, 1000).rollout
    assert rollout.state == RolloutState.SUCCEEDED and rollout.devices["d01"].previous is None
    return rollout, devices


def test_a_rollback_keeps_a_model_the_rollout_added_and_says_so() -> None:
    rollout, devices = _with_one_added()
    d = rollback(rollout, 2000)
    assert d.sends == [Send("d00", Action.ROLLBACK)]  # d01 has nothing to go back to
    assert states(d.rollout) == {"d00": "ROLLING_BACK", "d01": "SUCCEEDED"}
    assert d.rollout.devices["d01"].reason.startswith("kept digits 2.0.0: nothing to roll back")
    assert d.rollout.state == RolloutState.ROLLED_BACK
    assert "1 of 2 devices keep digits 2.0.0" in d.rollout.reason
    devices["d00"] = DeviceView(online=True, active=OLD, update_state="ROLLED_BACK",
                                update_target=NEW.sha256)
    d = run(d.rollout, devices, 3000)  # nothing is left waiting on d01
    assert states(d.rollout) == {"d00": "ROLLED_BACK", "d01": "SUCCEEDED"} and d.sends == []


def test_rolling_back_device_by_device_ends_with_the_kept_one() -> None:
    rollout, _ = _with_one_added()
    rollout = rollback(rollout, 2000, only=frozenset({"d00"})).rollout
    assert rollout.state == RolloutState.SUCCEEDED  # d01 was not asked yet
    d = rollback(rollout, 3000, only=frozenset({"d01"}))
    assert d.sends == [] and d.rollout.state == RolloutState.ROLLED_BACK
    assert "1 of 2 devices keep" in d.rollout.reason


def test_a_device_that_keeps_an_added_model_after_a_rollback_is_not_followed_for_ever() -> None:
    devices = {"d00": DeviceView(online=True, active=None)}
    rollout = run(Rollout("r1", spec(device_timeout_s=60)), devices, 500).rollout
    rollout = run(rollout, devices, 61_000).rollout  # it timed out: the rollout aborts
    assert states(rollout) == {"d00": "ROLLING_BACK"} and rollout.state == RolloutState.ABORTED
    devices["d00"] = committed_new()  # it committed, and refuses the rollback
    d = run(rollout, devices, 70_000)
    assert states(d.rollout) == {"d00": "FAILED"} and d.cleared == ["d00"]
    assert "nothing to roll back to" in d.rollout.devices["d00"].reason


def test_a_device_that_cannot_take_the_model_any_more_times_out_with_the_reason() -> None:
    """Sent the bundle, then full (another model installed meanwhile): the timeout says why."""
    rollout, devices = started(1, device_timeout_s=60, gates=Gates(min_success_pct=0))
    devices["d00"] = replace(devices["d00"], incompatible="the device serves 16 models already")
    d = run(rollout, devices, 61_000)
    assert d.rollout.devices["d00"].reason == (
        "no answer within 60s (the device serves 16 models already)")


def test_a_rollout_round_trips_through_json() -> None:
    rollout, _ = started(3)
    assert Rollout.from_dict(rollout.as_dict()) == rollout


def test_a_device_that_re_installs_its_previous_bundle_is_told_to_commit_it() -> None:
    rollout, devices = started(1)
    devices["d00"] = committed_new()
    rollout = run(rollout, devices, 1000).rollout
    rollout = rollback(rollout, 2000).rollout
    devices["d00"] = DeviceView(online=True, active=OLD, update_state="PROBATION",
                                update_target=OLD.sha256, update_since_ms=3000)
    d = run(rollout, devices, 3000)
    assert d.sends == [Send("d00", Action.COMMIT, OLD)]
    assert states(d.rollout) == {"d00": "ROLLING_BACK"}
    devices["d00"] = DeviceView(online=True, active=OLD, update_state="COMMITTED",
                                update_target=OLD.sha256)
    d = run(d.rollout, devices, 4000)
    assert states(d.rollout) == {"d00": "ROLLED_BACK"} and d.sends == []


def test_a_failed_re_install_of_the_previous_bundle_is_reported() -> None:
    rollout, devices = started(1)
    devices["d00"] = committed_new()
    rollout = rollback(run(rollout, devices, 1000).rollout, 2000).rollout
    devices["d00"] = DeviceView(online=True, active=NEW, update_state="FAILED",
                                update_target=OLD.sha256, update_detail="disk full")
    d = run(rollout, devices, 3000)
    assert d.rollout.devices["d00"].state == DeviceState.FAILED
    assert "rollback failed: disk full" in d.rollout.devices["d00"].reason


def test_a_spec_without_waves_is_one_wave_to_everyone() -> None:
    data = spec().as_dict()
    del data["waves"]
    assert RolloutSpec.from_dict(data).waves == (Wave(100.0, True),)


def test_a_tick_that_changes_nothing_keeps_the_rollouts_last_update_time() -> None:
    rollout, devices = started(2, waves=parse_waves("50%,100%"))
    quiet = run(rollout, devices, 5000)
    assert quiet.sends == [] and not quiet.changed
    assert quiet.rollout.updated_ms == rollout.updated_ms == 0


# --- late answers: a fresh timeout, online only, rolled back after an abort --------------

def timed_out() -> tuple[Rollout, dict[str, DeviceView]]:
    """d00 timed out at 61 s (sent at 0, --device-timeout 60); d01 keeps the wave open in
    probation (a 600 s soak)."""
    rollout, devices = started(2, device_timeout_s=60, soak_s=600,
                               gates=Gates(max_failures_pct=50))
    devices["d01"] = on("PROBATION", NEW, since=1000)
    rollout = run(rollout, devices, 1000).rollout
    rollout = run(rollout, devices, 61_000).rollout
    assert states(rollout) == {"d00": "TIMED_OUT", "d01": "PROBATION"}
    return rollout, devices


LATE_ANSWERS = [
    # (what d00 reports at 70 s, its state then, desired states cleared, targeted_ms, reason)
    (on("DOWNLOADING", since=65_000), "UPDATING", [], 70_000,
     "device reported DOWNLOADING (late)"),  # on its way again: a fresh --device-timeout
    (on("DOWNLOADING", since=60_000), "TIMED_OUT", [], 0,
     "no answer within 60s (still COMMITTED)"),  # the report it timed out with: no answer
    (on("PROBATION", NEW, since=60_000), "PROBATION", [], 0,
     "device reported PROBATION (late)"),  # probation is an answer, however old
    (committed_new(), "SUCCEEDED", [], 0, "device reported COMMITTED (late)"),
    (replace(on("FAILED"), update_detail="download failed"), "FAILED", ["d00"], 0,
     "download failed"),
    # offline: what the registry shows is what it said before it went away
    (replace(on("PROBATION", NEW, since=65_000), online=False), "TIMED_OUT", [], 0,
     "no answer within 60s (still COMMITTED)"),
    (replace(on("FAILED"), online=False), "TIMED_OUT", [], 0,
     "no answer within 60s (still COMMITTED)"),
    (replace(committed_new(), online=False), "TIMED_OUT", [], 0,
     "no answer within 60s (still COMMITTED)"),
]


@pytest.mark.parametrize(("report", "state", "cleared", "targeted", "reason"), LATE_ANSWERS)
def test_a_timed_out_device_is_followed_again_only_on_a_new_answer_while_online(
        report: DeviceView, state: str, cleared: list[str], targeted: int, reason: str
        ) -> None:
    rollout, devices = timed_out()
    devices["d00"] = report
    d = run(rollout, devices, 70_000)
    item = d.rollout.devices["d00"]
    assert (item.state.value, d.cleared, item.targeted_ms, item.reason) == (
        state, cleared, targeted, reason)
    assert d.sends == [] and d.rollout.state == RolloutState.RUNNING


LATE_STEPS = [
    # (now, what d00 reports from then on (None: as before), its state, its targeted_ms)
    (70_000, on("DOWNLOADING", since=65_000), "UPDATING", 70_000),
    (71_000, None, "UPDATING", 70_000),  # not timed out again at the next tick
    (130_000, None, "UPDATING", 70_000),  # exactly --device-timeout after the late answer
    (130_001, None, "TIMED_OUT", 70_000),
    (190_000, None, "TIMED_OUT", 70_000),  # the same report is no new answer
    (200_000, on("VERIFYING", since=195_000), "UPDATING", 200_000),  # it moved: followed
    (201_000, on("PROBATION", NEW, since=201_000), "PROBATION", 200_000),
]


def test_a_late_answer_gets_one_fresh_timeout_per_move_instead_of_flip_flopping() -> None:
    rollout, devices = timed_out()
    seen = []
    for now, report, state, targeted in LATE_STEPS:
        if report is not None:
            devices["d00"] = report
        d = run(rollout, devices, now)
        rollout, item = d.rollout, d.rollout.devices["d00"]
        assert (now, item.state.value, item.targeted_ms) == (now, state, targeted)
        seen.append(item.state.value)
    assert seen.count("TIMED_OUT") == 2  # once at 130_001, and it stayed so


@pytest.mark.parametrize(("min_success", "end", "sends"), [
    (0, RolloutState.SUCCEEDED, []),
    (100, RolloutState.ABORTED, [Send("d00", Action.ROLLBACK), Send("d01", Action.ROLLBACK)]),
])
def test_devices_stuck_on_their_way_out_of_step_still_let_the_rollout_end(
        min_success: float, end: RolloutState, sends: list[Send]) -> None:
    """Two online devices stuck downloading, sent the bundle a minute apart: the same
    stale report is no late answer, so they time out once each and the wave ends."""
    rollout, devices = started(2, device_timeout_s=60, rate_per_min=1,
                               gates=Gates(min_success_pct=min_success))
    devices["d00"] = on("DOWNLOADING", since=500)
    d = run(rollout, devices, 60_000)
    assert installs(d) == ["d01"]
    devices["d01"] = on("DOWNLOADING", since=60_500)
    for now in range(61_000, 3_600_000, 1000):
        d = run(d.rollout, devices, now)
        if d.rollout.finished:
            break
    assert (now, d.rollout.state, d.sends) == (121_000, end, sends)
    assert d.rollout.reason.startswith("0 of 2 devices" if end == RolloutState.SUCCEEDED
                                       else "wave 1 of 1: 0 of 2 devices succeeded")


def aborting() -> tuple[Rollout, dict[str, DeviceView]]:
    """d00 timed out, d01 in probation, d02 committed in wave 1; d03 waits for wave 2."""
    rollout, devices = started(4, waves=(Wave(3, False),), device_timeout_s=60, soak_s=600,
                               gates=Gates(max_error_rate_pct=1))
    devices["d01"] = on("PROBATION", NEW, since=1000)
    devices["d02"] = committed_new()
    rollout = run(rollout, devices, 1000).rollout
    rollout = run(rollout, devices, 61_000).rollout
    assert states(rollout) == {"d00": "TIMED_OUT", "d01": "PROBATION", "d02": "SUCCEEDED",
                               "d03": "PENDING"}
    return rollout, devices


def _operator_abort(rollout: Rollout, devices: dict[str, DeviceView]) -> Decisions:
    return abort(rollout, 62_000)


def _error_rate(rollout: Rollout, devices: dict[str, DeviceView]) -> Decisions:
    return run(rollout, devices, 62_000, Quality(50, 50))


def _failure(rollout: Rollout, devices: dict[str, DeviceView]) -> Decisions:
    devices["d01"] = on("FAILED")  # its own gate rolled it back
    return run(rollout, devices, 62_000)


def _min_success(rollout: Rollout, devices: dict[str, DeviceView]) -> Decisions:
    devices["d01"] = committed_new()  # the wave is done: 2 of 3 is below --min-success 100
    return run(rollout, devices, 62_000)


@pytest.mark.parametrize(("how", "reason", "expected", "rolled_back"), [
    (_operator_abort, "aborted by an operator",
     {"d01": "ROLLING_BACK", "d02": "SUCCEEDED"}, ["d00", "d01"]),
    (_error_rate, "error rate 50.00%", {"d01": "ROLLING_BACK", "d02": "SUCCEEDED"},
     ["d00", "d01"]),
    (_failure, "1 of 3 devices failed", {"d01": "FAILED", "d02": "SUCCEEDED"}, ["d00"]),
    (_min_success, "wave 1 of 2: 2 of 3 devices succeeded",
     {"d01": "SUCCEEDED", "d02": "SUCCEEDED"}, ["d00"]),
])
def test_an_abort_tells_timed_out_devices_to_roll_back_too(
        how: object, reason: str, expected: dict[str, str], rolled_back: list[str]) -> None:
    rollout, devices = aborting()
    d = how(rollout, devices)  # type: ignore[operator]
    assert d.rollout.state == RolloutState.ABORTED and d.rollout.reason.startswith(reason)
    assert states(d.rollout) == {"d00": "ROLLING_BACK", **expected, "d03": "CANCELLED"}
    assert d.rollout.devices["d00"].reason == "rollout aborted"
    assert d.sends == [Send(device, Action.ROLLBACK) for device in rolled_back]


RETURNS = [
    # (what d00, told to roll back while timed out, says at 70 s, its state, sends, cleared)
    (replace(on("PROBATION", NEW, since=50_000), online=False), "ROLLING_BACK", [], []),
    (replace(fleet(1)["d00"], online=False), "ROLLING_BACK", [], []),  # it may have started
    (on("DOWNLOADING", since=65_000), "ROLLING_BACK", [], []),  # rolled back in probation
    (on("PROBATION", NEW, since=50_000), "ROLLING_BACK", [Send("d00", Action.ROLLBACK)], []),
    (committed_new(), "ROLLING_BACK", [], []),  # the retained rollback reaches it
    (DeviceView(online=True, active=OLD, update_state="ROLLED_BACK",
                update_target=NEW.sha256), "ROLLED_BACK", [], ["d00"]),
    (on("FAILED"), "ROLLED_BACK", [], ["d00"]),  # its download had given up
    (fleet(1)["d00"], "ROLLED_BACK", [], ["d00"]),  # it never started
]


@pytest.mark.parametrize(("report", "state", "sends", "cleared"), RETURNS)
def test_a_timed_out_device_told_to_roll_back_does_so_when_it_returns(
        report: DeviceView, state: str, sends: list[Send], cleared: list[str]) -> None:
    rollout, devices = aborting()
    rollout = abort(rollout, 62_000).rollout
    devices["d00"] = report
    devices["d01"] = DeviceView(online=True, active=OLD, update_state="ROLLED_BACK",
                                update_target=NEW.sha256)
    d = run(rollout, devices, 70_000)
    assert d.rollout.state == RolloutState.ABORTED
    assert states(d.rollout)["d00"] == state
    assert [s for s in d.sends if s.device == "d00"] == sends
    assert [c for c in d.cleared if c == "d00"] == cleared


# --- a failed device that retries -------------------------------------------------------

OTHER = BundleRef(name="digits", version="3.0.0", sha256="3" * 64)


def failed(end: str) -> tuple[Rollout, dict[str, DeviceView]]:
    """d00's download gave up at 1 s (FAILED, its desired state cleared); the rollout is
    then ``end``: RUNNING (d01 still on its way), PAUSED, SUCCEEDED (d01 committed, 1 of 2
    is not below --min-success 50), ABORTED or ROLLED_BACK by an operator."""
    rollout, devices = started(2, device_timeout_s=60, soak_s=30,
                               gates=Gates(max_failures_pct=50, min_success_pct=50))
    devices["d00"] = replace(on("FAILED", since=900), update_detail="download failed")
    d = run(rollout, devices, 1000)
    assert states(d.rollout) == {"d00": "FAILED", "d01": "TARGETED"} and d.cleared == ["d00"]
    rollout = d.rollout
    if end == "PAUSED":
        rollout = pause(rollout, 2000).rollout
    elif end == "SUCCEEDED":
        devices["d01"] = committed_new()
        rollout = run(rollout, devices, 2000).rollout
    elif end == "ABORTED":
        rollout = abort(rollout, 2000).rollout
    elif end == "ROLLED_BACK":
        rollout = rollback(rollout, 2000).rollout
    assert rollout.state.value == end
    return rollout, devices


RETRIES = [
    # (the rollout then, what d00 reports at 10 s, its state, what it is sent)
    ("RUNNING", on("DOWNLOADING", since=9000), "UPDATING", []),
    ("RUNNING", on("PROBATION", NEW, since=9000), "PROBATION", []),
    ("PAUSED", on("PROBATION", NEW, since=9000), "PROBATION", []),
    ("SUCCEEDED", on("DOWNLOADING", since=9000), "UPDATING", []),
    ("SUCCEEDED", on("PROBATION", NEW, since=9000), "PROBATION", []),
    ("ABORTED", on("DOWNLOADING", since=9000), "ROLLING_BACK", [Action.ROLLBACK]),
    ("ABORTED", on("PROBATION", NEW, since=9000), "ROLLING_BACK", [Action.ROLLBACK]),
    ("ROLLED_BACK", on("PROBATION", NEW, since=9000), "ROLLING_BACK", [Action.ROLLBACK]),
    # left alone: not online, not working on this rollout's bundle, or settled
    ("SUCCEEDED", replace(on("PROBATION", NEW, since=9000), online=False), "FAILED", []),
    ("RUNNING", replace(on("DOWNLOADING", since=9000), online=False), "FAILED", []),
    ("SUCCEEDED", on("FAILED", since=9000), "FAILED", []),
    ("SUCCEEDED", DeviceView(online=True, active=OLD, update_state="ROLLED_BACK",
                             update_target=NEW.sha256), "FAILED", []),
    ("SUCCEEDED", DeviceView(online=True, active=OLD, update_state="DOWNLOADING",
                             update_target=OTHER.sha256, update_since_ms=9000), "FAILED", []),
    ("SUCCEEDED", committed_new(), "FAILED", []),  # settled: maybe by another rollout
    ("ABORTED", committed_new(), "FAILED", []),  # never rolled back from here
]


@pytest.mark.parametrize(("end", "report", "state", "actions"), RETRIES)
def test_a_failed_device_working_on_the_bundle_again_is_followed_as_the_rollout_says(
        end: str, report: DeviceView, state: str, actions: list[Action]) -> None:
    rollout, devices = failed(end)
    devices["d00"] = report
    d = run(rollout, devices, 10_000)
    item = d.rollout.devices["d00"]
    assert item.state.value == state
    assert [s for s in d.sends if s.device == "d00"] == [Send("d00", a) for a in actions]
    assert d.rollout.state.value == end  # a retry never changes how the rollout ended
    assert "d00" not in d.cleared
    if state in ("UPDATING", "PROBATION"):
        assert (item.reason, item.since_ms, item.targeted_ms) == (
            f"device retried after failing: reported {report.update_state}", 10_000, 10_000)
    elif state == "ROLLING_BACK":
        assert item.reason == (f"device retried after failing: reported {report.update_state}"
                               f"; the rollout was {end.lower().replace('_', ' ')}")
    else:
        assert (item.reason, item.since_ms) == ("download failed", 1000)


def steps(rollout: Rollout, devices: dict[str, DeviceView],
          table: list[tuple[int, DeviceView | None, str, list[Send]]]) -> Rollout:
    """Tick through ``table``: (now, what d00 reports from then on, its state, sends)."""
    for now, report, state, sends in table:
        if report is not None:
            devices["d00"] = report
        d = run(rollout, devices, now)
        rollout = d.rollout
        assert (now, states(rollout)["d00"], d.sends) == (now, state, sends)
    return rollout


def test_a_device_that_fails_late_then_retries_after_the_rollout_succeeded_is_committed() -> None:
    """The network cut: d00 timed out, gave its download up while cut off, reported FAILED
    when it came back (its desired state is cleared) but had re-received the retained
    install by then, and retries: it is committed, not left in probation."""
    rollout, devices = started(2, device_timeout_s=60, soak_s=30,
                               gates=Gates(min_success_pct=50))
    devices["d00"] = on("DOWNLOADING", since=500)
    devices["d01"] = committed_new()
    rollout = run(rollout, devices, 1000).rollout
    devices["d00"] = replace(devices["d00"], online=False)  # the cut
    rollout = run(rollout, devices, 61_000).rollout
    assert rollout.state == RolloutState.SUCCEEDED
    assert states(rollout) == {"d00": "TIMED_OUT", "d01": "SUCCEEDED"}
    d = run(rollout, devices | {"d00": replace(on("FAILED", since=90_000),
                                               update_detail="download failed")}, 100_000)
    assert states(d.rollout)["d00"] == "FAILED" and d.cleared == ["d00"]
    rollout = steps(d.rollout, devices, [
        (101_000, on("DOWNLOADING", since=100_500), "UPDATING", []),
        (161_000, on("PROBATION", NEW, since=130_000), "PROBATION", []),
        (190_999, None, "PROBATION", []),  # soak: 30 s from when it was seen in probation
        (191_000, None, "COMMITTING", [Send("d00", Action.COMMIT)]),
        (192_000, committed_new(), "SUCCEEDED", []),
    ])
    assert rollout.state == RolloutState.SUCCEEDED


def test_a_failed_device_that_retries_while_the_rollout_runs_counts_as_it_ends() -> None:
    rollout, devices = failed("RUNNING")
    rollout = replace(rollout, spec=replace(rollout.spec, gates=Gates(max_failures_pct=50)))
    rollout = steps(rollout, devices, [  # --min-success 100: without d00 the rollout aborts
        (10_000, on("PROBATION", NEW, since=9000), "PROBATION", []),
        (40_000, None, "COMMITTING", [Send("d00", Action.COMMIT)]),
        (41_000, committed_new(), "SUCCEEDED", []),
    ])
    assert rollout.state == RolloutState.RUNNING  # d01 still on its way
    devices["d01"] = committed_new()
    d = run(rollout, devices, 42_000)
    assert d.rollout.state == RolloutState.SUCCEEDED
    assert d.rollout.reason == "2 of 2 devices run 2.0.0"


def test_a_failed_device_that_retries_then_stops_answering_times_out_so_the_rollout_ends(
        ) -> None:
    rollout, devices = failed("RUNNING")
    devices["d01"] = committed_new()
    rollout = steps(rollout, devices, [
        (10_000, on("DOWNLOADING", since=9000), "UPDATING", []),  # d01 done: d00 holds the wave
        (70_000, None, "UPDATING", []),  # exactly --device-timeout after it retried
        (70_001, None, "TIMED_OUT", []),
    ])
    assert rollout.state == RolloutState.SUCCEEDED
    assert rollout.reason == "1 of 2 devices run 2.0.0"


def test_a_failed_device_that_retries_after_an_abort_is_rolled_back_once_in_probation() -> None:
    rollout, devices = failed("ABORTED")
    rollout = steps(rollout, devices, [
        (10_000, on("DOWNLOADING", since=9000), "ROLLING_BACK", [Send("d00", Action.ROLLBACK)]),
        (12_000, None, "ROLLING_BACK", []),  # downloading: the rollback waits for probation
        (20_000, on("PROBATION", NEW, since=20_000), "ROLLING_BACK",
         [Send("d00", Action.ROLLBACK)]),  # told again once it can act on it
        (21_000, None, "ROLLING_BACK", []),
        (22_000, DeviceView(online=True, active=OLD, update_state="ROLLED_BACK",
                            update_target=NEW.sha256), "ROLLED_BACK", []),
    ])
    assert rollout.state == RolloutState.ABORTED
    assert rollout.devices["d00"].reason == "running digits 1.0.0"
