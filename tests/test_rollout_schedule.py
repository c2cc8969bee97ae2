"""When rollouts run: windows and start times parsed once, and the executor driven by a
clock the test holds (no broker, no real time)."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.fleet.errors import ConflictError
from edgefleet.fleet.rollout import executor
from edgefleet.fleet.rollout.executor import Action, Decisions, DeviceView, Observations
from edgefleet.fleet.rollout.schedule import (
    Schedule,
    ScheduleError,
    Window,
    parse_start_at,
    parse_window,
)
from edgefleet.fleet.rollout.spec import Gates, RolloutSpec, Selector, parse_waves
from edgefleet.fleet.rollout.state import Rollout, RolloutState
from edgefleet.fleet.rollout.validate import RolloutOptionError, check_options
from tests.hostile import HOSTILE, MiB, peak_traced_bytes
from tests.test_rollout_state_machines import STEPS, _act, _assert_declared

OLD = BundleRef(name="digits", version="1.0.0", sha256="1" * 64)
NEW = BundleRef(name="digits", version="2.0.0", sha256="2" * 64)
MIN, HOUR = 60_000, 3_600_000


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=timezone.utc).timestamp() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%a %Y-%m-%d %H:%M")


# --- windows ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "canonical"), [
    ("Mon-Fri 22:00-04:00 Europe/Berlin", "Mon-Fri 22:00-04:00 Europe/Berlin"),
    ("sat,SUN 00:00-24:00", "Sat-Sun 00:00-24:00 UTC"),
    ("Fri-Mon 10:00-11:30 America/New_York", "Mon,Fri-Sun 10:00-11:30 America/New_York"),
    ("daily 23:30-00:30 UTC", "daily 23:30-00:30 UTC"),
    ("Mon,Tue,Wed,Thu,Fri,Sat,Sun 01:00-02:00", "daily 01:00-02:00 UTC")])
def test_a_window_parses_into_days_times_and_a_zone_and_prints_canonically(
        text: str, canonical: str) -> None:
    window = parse_window(text)
    assert str(window) == canonical
    assert parse_window(canonical) == window


@pytest.mark.parametrize(("text", "position", "words"), [
    ("Mon-Fry 22:00-04:00", 5, "'Fry' is not a day"),
    ("Mon 22:00-4:00", 11, "'4:00' is not a time of day"),
    ("Mon 24:00-01:00", 5, "not a time of day"),
    ("Mon 10:00-10:00", 11, "opens and closes at the same time"),
    ("Mon 10:00-11:00 Europe/Nowhere", 17, "not a time zone"),
    ("Mon 10:00-11:00 /etc/passwd", 17, "not a time zone"),
    ("Mon 10:00-11:00 localtime", 17, "'localtime' is a file of the zone database"),
    ("Mon 10:00-11:00 Factory", 17, "'Factory' is a file of the zone database"),
    ("Mon 10:00-11:00 posixrules", 17, "'posixrules' is a file of the zone database"),
    ("Mon 10:00-11:00 posix/Europe/Berlin", 17, "not a time zone"),
    ("Mon 10:00-11:00 right/UTC", 17, "not a time zone"),
    ("22:00-04:00", 1, "DAYS HH:MM-HH:MM [ZONE]")])
def test_a_bad_window_is_refused_naming_the_position_and_the_fix(
        text: str, position: int, words: str) -> None:
    with pytest.raises(ScheduleError) as refused:
        parse_window(text)
    assert refused.value.position + 1 == position
    assert words in str(refused.value) and refused.value.hint


WINDOWS = st.builds(
    lambda days, start, length, zone: Window(frozenset(days), start, (start + length) % 1440
                                             or 1440, zone),
    st.sets(st.integers(0, 6), min_size=1), st.integers(0, 1439), st.integers(1, 1439),
    st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe",
                     "Asia/Kolkata"]))


@HOSTILE
@given(window=WINDOWS)
def test_any_window_prints_to_text_that_parses_back_to_it(window: Window) -> None:
    assert parse_window(str(window)) == window


@settings(HOSTILE, deadline=timedelta(seconds=2))
@given(text=st.one_of(st.text(max_size=500), st.lists(st.sampled_from(
    ["Mon", "-", "Fri", ",", " ", "22:00", "04:00", "24:00", "Europe/Berlin", "daily", ":",
     "x", "\n"]), max_size=12).map("".join)))
def test_any_text_is_a_window_or_refused_with_a_position_within_bounds(text: str) -> None:
    result, peak = peak_traced_bytes(lambda: parse_window(text))
    assert peak < 2 * MiB, peak
    if isinstance(result, BaseException):
        assert isinstance(result, ScheduleError), repr(result)
        assert 0 <= result.position <= len(text)
        return
    assert parse_window(str(result)) == result


BERLIN_NIGHTS = Schedule(windows=(parse_window("Mon-Fri 22:00-04:00 Europe/Berlin"),))


@pytest.mark.parametrize(("now", "opens"), [
    (utc(2026, 12, 7, 12, 0), utc(2026, 12, 7, 21, 0)),  # Monday noon: tonight, 22:00 CET
    (utc(2026, 12, 7, 21, 0), utc(2026, 12, 7, 21, 0)),  # opening minute: open
    (utc(2026, 12, 12, 2, 59), utc(2026, 12, 12, 2, 59)),  # Saturday 03:59: Friday's night
    (utc(2026, 12, 12, 3, 0), utc(2026, 12, 14, 21, 0)),  # Saturday 04:00: closed till Mon
    (utc(2026, 12, 13, 22, 0), utc(2026, 12, 14, 21, 0))])  # Sunday night: not a window day
def test_a_window_crossing_midnight_belongs_to_the_day_it_opens(now: int, opens: int) -> None:
    assert iso(BERLIN_NIGHTS.next_open(now) or 0) == iso(opens)
    assert BERLIN_NIGHTS.open_at(now) is (now == opens)


def test_across_the_autumn_clock_change_a_night_window_keeps_its_local_hours() -> None:
    """Berlin, 25 October 2026: 03:00 CEST becomes 02:00 CET. 22:00-04:00 local is 7 hours
    that night (20:00-03:00 UTC), and 6 the night after (21:00-03:00 UTC)."""
    nightly = Schedule(windows=(parse_window("daily 22:00-04:00 Europe/Berlin"),))
    window = nightly.windows[0]
    assert window.interval(datetime(2026, 10, 24).date()) == (utc(2026, 10, 24, 20),
                                                              utc(2026, 10, 25, 3))
    assert window.interval(datetime(2026, 10, 25).date()) == (utc(2026, 10, 25, 21),
                                                              utc(2026, 10, 26, 3))
    assert nightly.open_at(utc(2026, 10, 25, 2, 30))  # 03:30 CET: still inside
    assert nightly.next_open(utc(2026, 10, 25, 3)) == utc(2026, 10, 25, 21)


def test_across_the_spring_clock_change_a_night_window_is_an_hour_shorter() -> None:
    """Berlin, 29 March 2026: 02:00 CET becomes 03:00 CEST; 22:00-04:00 is 5 hours."""
    window = parse_window("Sat 22:00-04:00 Europe/Berlin")
    assert window.interval(datetime(2026, 3, 28).date()) == (utc(2026, 3, 28, 21),
                                                             utc(2026, 3, 29, 2))


def test_a_window_inside_the_skipped_hour_is_not_lost_it_opens_an_hour_later() -> None:
    """02:15-02:45 on the night 02:00 CET becomes 03:00 CEST: read as if the clock had not
    jumped yet, it is 03:15-03:45 CEST that night (as cron runs a skipped job late)."""
    skipped = Schedule(windows=(parse_window("Sun 02:15-02:45 Europe/Berlin"),))
    assert skipped.next_open(utc(2026, 3, 28, 12)) == utc(2026, 3, 29, 1, 15)
    assert not skipped.open_at(utc(2026, 3, 29, 1, 45))
    assert skipped.next_open(utc(2026, 3, 29, 1, 45)) == utc(2026, 4, 5, 0, 15)  # 02:15 CEST


@pytest.mark.parametrize(("window", "opens", "closes"), [
    ("Sun 02:00-03:00 Europe/Berlin", (1, 0), (2, 0)),  # 03:00-04:00 CEST, not empty
    ("Sun 02:30-03:15 Europe/Berlin", (1, 30), (2, 15)),  # 03:30-04:15 CEST
    ("Sun 02:15-02:45 Europe/Berlin", (1, 15), (1, 45)),
    ("Sun 01:00-02:30 Europe/Berlin", (0, 0), (1, 30)),  # its end skipped: 01:00-03:30
])
def test_a_window_whose_start_the_spring_clocks_skip_is_not_lost(
        window: str, opens: tuple[int, int], closes: tuple[int, int]) -> None:
    """2027-03-28, Europe/Berlin: 02:00 CET becomes 03:00 CEST (01:00 UTC)."""
    schedule = Schedule(windows=(parse_window(window),))
    assert schedule.next_open(utc(2027, 3, 27, 12)) == utc(2027, 3, 28, *opens)
    assert schedule.open_at(utc(2027, 3, 28, *closes) - 1)
    assert not schedule.open_at(utc(2027, 3, 28, *closes))


@settings(HOSTILE, deadline=None)
@given(start=st.integers(0, 1439), length=st.integers(1, 1440),
       zone=st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Sydney",
                             "Asia/Tehran", "UTC"]),
       day=st.dates(date(2026, 1, 1), date(2028, 12, 31)))
def test_no_window_is_lost_on_any_day(start: int, length: int, zone: str, day: date) -> None:
    end = (start + length) % 1440 or 1440
    if end == start:
        return
    opens, closes = Window(frozenset(range(7)), start, end, zone).interval(day)
    assert opens < closes


def test_several_windows_open_at_the_first_of_them_after_the_start_time() -> None:
    schedule = Schedule(start_at_ms=utc(2026, 12, 9, 0, 0), windows=(
        parse_window("Mon 01:00-02:00"), parse_window("Thu 05:00-06:00"),
        parse_window("Wed-Thu 03:00-04:00")))
    assert schedule.next_open(utc(2026, 12, 7, 1, 30)) == utc(2026, 12, 9, 3)  # Wed 03:00
    assert Schedule(start_at_ms=utc(2026, 12, 9)).next_open(utc(2026, 12, 1)) == utc(2026, 12, 9)
    assert Schedule().open_at(0)


@pytest.mark.parametrize(("text", "ms"), [
    ("2026-12-08T22:00:00+01:00", utc(2026, 12, 8, 21)),
    ("2026-12-08T21:00Z", utc(2026, 12, 8, 21)),
    ("2026-12-08 21:00:00+00:00", utc(2026, 12, 8, 21)),
    # the bounds are in UTC: these are 2000-01-01T00:30Z and 9000-12-31T23:30Z
    ("1999-12-31T23:30-01:00", utc(2000, 1, 1, 0, 30)),
    ("9001-01-01T00:30+01:00", utc(9000, 12, 31, 23, 30))])
def test_a_start_time_is_iso_8601_with_its_zone(text: str, ms: int) -> None:
    assert parse_start_at(text) == ms


@pytest.mark.parametrize(("text", "words"), [
    ("2026-12-08T22:00", "has no zone"), ("tomorrow", "not an ISO 8601 time"),
    ("0001-01-01T00:00+01:00", "between the years"),
    # in UTC 1999-12-31T23:30Z and 9001-01-01T00:30Z: outside, whatever their local year
    ("2000-01-01T00:30+01:00", r"2000 and 9000 \(in UTC\)"),
    ("9000-12-31T23:30-01:00", r"2000 and 9000 \(in UTC\)"),
    ("9999-12-31T23:59+00:00", "between the years"), ("0001-01-01T00:00-14:00", "between")])
def test_a_start_time_without_a_zone_or_not_a_time_is_refused(text: str, words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        parse_start_at(text)


@pytest.mark.parametrize("text", ["2026-12-08", "2026-12-08T22:00", "2026-12-08 22:00:05"])
def test_a_start_time_without_a_zone_is_refused_with_a_hint_that_is_accepted(
        text: str) -> None:
    with pytest.raises(ScheduleError) as refused:
        parse_start_at(text)
    suggested = refused.value.hint.split()[2]  # "add one: TIME (UTC) or ..."
    assert parse_start_at(suggested) >= 0, refused.value.hint


def test_rollout_options_name_the_schedule_flag_they_refuse() -> None:
    with pytest.raises(RolloutOptionError) as refused:
        check_options({"selectors": ["group:g"], "windows": ["Mon 1:00-2:00"]})
    assert refused.value.field == "windows" and "--window" in str(refused.value)
    with pytest.raises(RolloutOptionError) as refused:
        check_options({"selectors": ["group:g"], "start_at": "2026-12-08T22:00"})
    assert refused.value.field == "start_at" and "--start-at" in str(refused.value)
    with pytest.raises(RolloutOptionError) as refused:
        check_options({"selectors": ["group:g"], "windows": ["Mon 01:00-02:00"] * 51})
    assert refused.value.field == "windows"


# --- the executor, driven by the test's clock --------------------------------------------

NIGHTS = Schedule(windows=(parse_window("Mon-Fri 22:00-04:00 UTC"),))
MONDAY_NOON, MONDAY_22 = utc(2026, 12, 7, 12), utc(2026, 12, 7, 22)


def spec(schedule: Schedule = NIGHTS, **changes: object) -> RolloutSpec:
    base = RolloutSpec(model=NEW, url="http://c/b.efb", size=100,
                       selectors=(Selector("group", "cams"),), schedule=schedule,
                       device_timeout_s=HOUR / 1000)
    return replace(base, **changes)  # type: ignore[arg-type]


def fleet(n: int) -> dict[str, DeviceView]:
    return {f"d{i}": DeviceView(online=True, active=OLD, update_state="COMMITTED")
            for i in range(n)}


def run(rollout: Rollout, devices: dict[str, DeviceView], now: int) -> Decisions:
    return executor.tick(rollout, Observations(devices), now)


def installs(d: Decisions) -> list[str]:
    return [s.device for s in d.sends if s.action == Action.INSTALL]


def in_probation() -> DeviceView:
    return DeviceView(online=True, active=NEW, update_state="PROBATION",
                      update_target=NEW.sha256)


def test_a_rollout_created_outside_its_window_waits_and_says_until_when() -> None:
    first = run(Rollout("r1", spec()), fleet(3), MONDAY_NOON)
    assert first.rollout.state == RolloutState.WAITING
    assert installs(first) == []
    assert first.wait_until_ms == MONDAY_22 == first.rollout.waiting_until_ms
    assert "next window opens 2026-12-07T22:00+00:00" in first.rollout.reason
    assert len(first.rollout.devices) == 3  # the selection is frozen at creation
    still = run(first.rollout, fleet(3), MONDAY_22 - 1)
    assert still.rollout.state == RolloutState.WAITING and installs(still) == []


def test_the_window_opening_sends_the_bundle_and_its_closing_stops_new_sends() -> None:
    waiting = run(Rollout("r1", spec(waves=parse_waves("1,100%"), soak_s=60.0)), fleet(3),
                  MONDAY_NOON).rollout
    opened = run(waiting, fleet(3), MONDAY_22)
    assert opened.rollout.state == RolloutState.RUNNING and installs(opened) == ["d0"]
    assert opened.wait_until_ms is None and opened.rollout.waiting_until_ms == 0
    devices = {**fleet(3), "d0": in_probation()}
    probation = run(opened.rollout, devices, MONDAY_22 + MIN)
    closed = run(probation.rollout, devices, utc(2026, 12, 8, 4))  # Tuesday 04:00
    assert closed.rollout.state == RolloutState.WAITING
    assert [s.action for s in closed.sends] == [Action.COMMIT]  # the soak ends: committed
    done = {**devices, "d0": DeviceView(online=True, active=NEW, update_state="COMMITTED",
                                        update_target=NEW.sha256)}
    advanced = run(closed.rollout, done, utc(2026, 12, 8, 5))
    assert advanced.rollout.wave == 1 and installs(advanced) == []  # next wave waits
    assert advanced.rollout.state == RolloutState.WAITING
    assert advanced.wait_until_ms == utc(2026, 12, 8, 22)
    tonight = run(advanced.rollout, done, utc(2026, 12, 8, 22))
    assert installs(tonight) == ["d1", "d2"]


def test_a_window_opening_restarts_the_rate_count() -> None:
    waiting = run(Rollout("r1", spec(rate_per_min=1.0)), fleet(3), MONDAY_NOON).rollout
    opened = run(waiting, fleet(3), MONDAY_22)
    assert installs(opened) == ["d0"]  # one at once, then one a minute: no burst of 600
    assert installs(run(opened.rollout, fleet(3), MONDAY_22 + MIN)) == ["d1"]


def test_a_start_time_holds_the_rollout_back_until_then() -> None:
    later = Schedule(start_at_ms=MONDAY_22 + HOUR)
    first = run(Rollout("r1", spec(later)), fleet(2), MONDAY_22)
    assert first.rollout.state == RolloutState.WAITING
    assert first.wait_until_ms == MONDAY_22 + HOUR
    assert installs(run(first.rollout, fleet(2), MONDAY_22 + HOUR)) == ["d0", "d1"]


def test_pausing_resuming_and_aborting_work_while_waiting() -> None:
    waiting = run(Rollout("r1", spec()), fleet(2), MONDAY_NOON).rollout
    paused = executor.pause(waiting, MONDAY_NOON + 1).rollout
    assert paused.state == RolloutState.PAUSED
    assert installs(run(paused, fleet(2), MONDAY_22)) == []  # paused: the window changes nothing
    resumed = executor.resume(paused, MONDAY_NOON + 2).rollout
    again = run(resumed, fleet(2), MONDAY_NOON + 3)  # resumed outside: waits, sends nothing
    assert again.rollout.state == RolloutState.WAITING and installs(again) == []
    aborted = executor.abort(again.rollout, MONDAY_NOON + 4).rollout
    assert aborted.state == RolloutState.ABORTED
    with pytest.raises(ConflictError):
        executor.resume(aborted, MONDAY_NOON + 5)


def test_a_waiting_rollout_still_aborts_when_a_device_fails() -> None:
    waiting = run(Rollout("r1", spec(waves=parse_waves("100%"))), fleet(2),
                  MONDAY_NOON).rollout
    opened = run(waiting, fleet(2), MONDAY_22).rollout
    failed = {**fleet(2), "d0": DeviceView(online=True, active=OLD, update_state="FAILED",
                                           update_target=NEW.sha256, update_since_ms=MONDAY_22 + 1)}
    closed = run(opened, failed, utc(2026, 12, 8, 4, 30))
    assert closed.rollout.state == RolloutState.ABORTED


WINDOWED = spec(Schedule(start_at_ms=30_000, windows=(parse_window("daily 00:01-00:03"),
                                                       parse_window("daily 00:05-00:06"))),
                waves=parse_waves("50%,100%"), device_timeout_s=10.0, soak_s=5.0,
                gates=Gates(max_failures_pct=50.0, min_success_pct=50.0))


@HOSTILE
@given(steps=st.lists(STEPS, min_size=1, max_size=30))
def test_no_sequence_over_opening_and_closing_windows_makes_an_undeclared_move(
        steps: list[tuple[str, dict[str, DeviceView] | None, int]]) -> None:
    rollout, now = Rollout("r1", WINDOWED), 0
    for action, views, advance in steps:
        now += advance
        before = rollout
        try:
            rollout = _act(rollout, action, views, now)
        except ConflictError:
            continue
        _assert_declared(before, rollout)
        if rollout.state == RolloutState.WAITING and action == "tick":
            assert not WINDOWED.schedule.open_at(now)
