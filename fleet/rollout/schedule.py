"""When a rollout may send bundles: a start time and weekly maintenance windows.

``--start-at 2026-12-08T22:00:00+01:00`` (ISO 8601 with its zone, ``Z`` for UTC) holds
a rollout back until then; ``--window 'Mon-Fri 22:00-04:00 Europe/Berlin'`` (repeatable)
lets it send bundles only inside one of its windows. A window is::

    window := DAYS HH:MM-HH:MM [ZONE]
    DAYS   := daily | DAY[-DAY] (',' DAY[-DAY])*       DAY: Mon Tue Wed Thu Fri Sat Sun

It opens on each of its days at the first time and closes at the second, the next day
when the second is not later (``22:00-04:00`` opened on Friday closes on Saturday at
04:00); ``00:00-24:00`` is the whole day. Times are wall-clock times of ``ZONE`` (an IANA
name, UTC when left out; never ``localtime``, ``Factory`` or ``posixrules``), so a window
keeps its local hours across daylight-saving changes and is an hour shorter or longer on
the night the clocks move; a time the clocks skip is read as if they had not jumped yet
(02:15 on the night 02:00 becomes 03:00 is 03:15 summer time), and a window whose start
is skipped stays open at least as long as it is long (``Sun 02:00-03:00 Europe/Berlin``
is 03:00-04:00 summer time that night, ``02:30-03:15`` is 03:30-04:15), so no window is
lost.

Everything is a pure function of the time it is given (:meth:`Schedule.next_open`);
the rollout executor asks it on each tick with the controller's clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from edgefleet.fleet.errors import InvalidRolloutError

__all__ = ["DAYS", "MAX_WINDOWS", "Schedule", "ScheduleError", "Window", "format_ms",
           "parse_start_at", "parse_window"]

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MAX_WINDOWS = 50
MAX_TEXT = 100
_DAY = {name.lower(): index for index, name in enumerate(DAYS)}
_WINDOW = re.compile(r"(?P<days>\S+)\s+(?P<start>\S+?)-(?P<end>\S+)(?:\s+(?P<zone>\S+))?",
                     re.ASCII)
_TIME = re.compile(r"([01][0-9]|2[0-4]):([0-5][0-9])", re.ASCII)
_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+){0,2}", re.ASCII)
_EXAMPLE = "e.g. --window 'Mon-Fri 22:00-04:00 Europe/Berlin'"
# files of the zone database that load as zones but name none a person means: the host's
# own zone (it differs from host to host), the "Factory" placeholder, the template POSIX
# rules are read with, and the copies under posix/ and right/ (right/ counts leap seconds)
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})
_NOT_ZONE_TREES = ("posix/", "right/")
# --start-at: from 2000-01-01 to the end of 9000, in UTC
_FIRST_MS = round(datetime(2000, 1, 1, tzinfo=UTC).timestamp() * 1000)
_AFTER_LAST_MS = round(datetime(9001, 1, 1, tzinfo=UTC).timestamp() * 1000)


class ScheduleError(InvalidRolloutError):
    """A start time or a window that does not parse; ``position`` is the 0-based character."""

    def __init__(self, text: str, position: int, problem: str, hint: str = _EXAMPLE) -> None:
        super().__init__(f"{text[:MAX_TEXT]!r} at character {position + 1}: {problem}",
                         hint=hint)
        self.position = position


@dataclass(frozen=True)
class Window:
    """A weekly window: open on ``days`` (0 = Monday) from ``start`` for as long as the
    wall clock of ``zone`` takes to reach ``end`` (minutes after midnight; 1440 = 24:00)."""

    days: frozenset[int]
    start: int
    end: int
    zone: str = "UTC"

    def __str__(self) -> str:
        return f"{_days_text(self.days)} {_hhmm(self.start)}-{_hhmm(self.end)} {self.zone}"

    def interval(self, day: date) -> tuple[int, int]:
        """When the window opened on ``day`` opens and closes (ms since the epoch)."""
        zone = ZoneInfo(self.zone)
        close_day = day if self.end > self.start else day + timedelta(days=1)
        opens, closes = _instant(day, self.start, zone), _instant(close_day, self.end, zone)
        if _skipped(day, self.start, zone):  # opened late: it keeps its length
            length = (self.end - self.start) % 1440 or 1440
            closes = max(closes, opens + length * 60_000)
        return opens, closes

    def next_open(self, now_ms: int) -> int | None:
        """``now_ms`` if the window is open then, else when it opens next (None: never
        within a week, which only a window shut by clock changes can be)."""
        today = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(self.zone)).date()
        for offset in range(-1, 9):
            day = today + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            opens, closes = self.interval(day)
            if closes > now_ms and opens < closes:
                return max(opens, now_ms)
        return None


@dataclass(frozen=True)
class Schedule:
    """A rollout's start time (None: at once) and windows (none: always open)."""

    start_at_ms: int | None = None
    windows: tuple[Window, ...] = ()

    @property
    def always(self) -> bool:
        return self.start_at_ms is None and not self.windows

    def next_open(self, now_ms: int) -> int | None:
        """The first instant at or after ``now_ms`` when bundles may be sent (``now_ms``
        itself when they may be now; None: never)."""
        earliest = max(now_ms, self.start_at_ms or now_ms)
        if not self.windows:
            return earliest
        opens = [t for w in self.windows if (t := w.next_open(earliest)) is not None]
        return min(opens) if opens else None

    def open_at(self, now_ms: int) -> bool:
        return self.next_open(now_ms) == now_ms

    def zone(self) -> str:
        """The zone a person reads this schedule's times in: its first window's."""
        return self.windows[0].zone if self.windows else "UTC"


def _instant(day: date, minutes: int, zone: ZoneInfo) -> int:
    """Wall-clock ``minutes`` after the midnight that starts ``day`` in ``zone``, as ms (a
    time the clocks skip is read with the offset before the change, as zoneinfo does)."""
    day, minutes = (day + timedelta(days=1), 0) if minutes == 1440 else (day, minutes)
    local = datetime.combine(day, time(minutes // 60, minutes % 60), tzinfo=zone)
    return round(local.timestamp() * 1000)


def _skipped(day: date, minutes: int, zone: ZoneInfo) -> bool:
    """Whether the clocks of ``zone`` skip that wall-clock time on ``day`` (spring)."""
    if minutes == 1440:
        day, minutes = day + timedelta(days=1), 0
    local = datetime.combine(day, time(minutes // 60, minutes % 60))
    there = datetime.fromtimestamp(local.replace(tzinfo=zone).timestamp(), zone)
    return there.replace(tzinfo=None) != local


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _days_text(days: frozenset[int]) -> str:
    if len(days) == 7:
        return "daily"
    runs: list[list[int]] = []
    for day in sorted(days):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return ",".join(DAYS[r[0]] if len(r) == 1 else f"{DAYS[r[0]]}-{DAYS[r[-1]]}"
                    for r in runs)


def format_ms(ms: int, zone: str = "UTC") -> str:
    """``ms`` as ISO 8601 in ``zone`` (to the minute), e.g. ``2026-12-08T22:00+01:00``."""
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(zone)).isoformat(timespec="minutes")


# --- parsing ----------------------------------------------------------------------------

def parse_window(text: str) -> Window:
    """``Mon-Fri 22:00-04:00 Europe/Berlin`` -> :class:`Window`, or :class:`ScheduleError`."""
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError(str(text), 0, "a window is empty")
    if len(text) > MAX_TEXT:
        raise ScheduleError(text, MAX_TEXT, f"a window is at most {MAX_TEXT} characters")
    lead = len(text) - len(text.lstrip(" "))
    match = _WINDOW.fullmatch(text.strip(" "))
    if match is None:
        raise ScheduleError(text, lead, "a window is DAYS HH:MM-HH:MM [ZONE]")
    days = _parse_days(text, match.group("days"), lead + match.start("days"))
    start = _parse_time(text, match.group("start"), lead + match.start("start"), 1439)
    end = _parse_time(text, match.group("end"), lead + match.start("end"), 1440)
    if start == end:
        raise ScheduleError(text, lead + match.start("end"), "the window opens and closes at "
                            "the same time", hint="for the whole day write 00:00-24:00")
    zone = match.group("zone") or "UTC"
    _check_zone(text, zone, lead + (match.start("zone") if match.group("zone") else 0))
    return Window(days, start, end, zone)


def _parse_days(text: str, days: str, at: int) -> frozenset[int]:
    if days.lower() == "daily":
        return frozenset(range(7))
    chosen: set[int] = set()
    offset = at
    for part in days.split(","):
        first, dash, last = part.partition("-")
        a = _day(text, first, offset)
        b = _day(text, last, offset + len(first) + 1) if dash else a
        chosen.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # Fri-Mon wraps
        offset += len(part) + 1
    return frozenset(chosen)


def _day(text: str, name: str, at: int) -> int:
    index = _DAY.get(name.lower())
    if index is None:
        raise ScheduleError(text, at, f"{name[:20]!r} is not a day",
                            hint="days are Mon Tue Wed Thu Fri Sat Sun, ranges like Mon-Fri, "
                                 "lists like Mon,Wed, or daily")
    return index


def _parse_time(text: str, value: str, at: int, most: int) -> int:
    match = _TIME.fullmatch(value)
    minutes = int(match.group(1)) * 60 + int(match.group(2)) if match else -1
    if not 0 <= minutes <= most:
        raise ScheduleError(text, at, f"{value[:20]!r} is not a time of day",
                            hint="write HH:MM on a 24-hour clock, 00:00 to 24:00")
    return minutes


def _check_zone(text: str, zone: str, at: int) -> None:
    if zone in _NOT_ZONES or zone.startswith(_NOT_ZONE_TREES):
        raise ScheduleError(text, at, f"{zone[:40]!r} is a file of the zone database, not a "
                            "time zone (it names no place's clock)",
                            hint="an IANA name like Europe/Berlin, America/New_York or UTC")
    try:
        if not _ZONE.fullmatch(zone):
            raise ValueError(zone)
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(text, at, f"{zone[:40]!r} is not a time zone",
                            hint="an IANA name like Europe/Berlin, America/New_York or UTC"
                            ) from None


def parse_start_at(text: str) -> int:
    """ISO 8601 with a zone (``2026-12-08T22:00:00+01:00``, ``...Z``) -> ms since the epoch."""
    if not isinstance(text, str) or len(text) > 64:
        raise ScheduleError(str(text)[:64], 0, "a start time is ISO 8601 text",
                            hint="e.g. --start-at 2026-12-08T22:00:00+01:00")
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ScheduleError(text, 0, "is not an ISO 8601 time",
                            hint="e.g. --start-at 2026-12-08T22:00:00+01:00") from None
    if when.tzinfo is None:
        shown = when.isoformat()  # a date alone is its midnight: 2026-12-08T00:00:00
        raise ScheduleError(text, len(text.rstrip()), "the time has no zone",
                            hint=f"add one: {shown}Z (UTC) or {shown}+01:00")
    ms = round(when.timestamp() * 1000)  # UTC: the bounds hold whatever the offset
    if not _FIRST_MS <= ms < _AFTER_LAST_MS:
        raise ScheduleError(text, 0, "is not a time between the years 2000 and 9000 (in "
                            "UTC)", hint="e.g. --start-at 2026-12-08T22:00:00+01:00")
    return ms
