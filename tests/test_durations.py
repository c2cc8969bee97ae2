"""How long ago, as an operator writes it (``fleet devices --stale 7d``): ``fleet.durations``.

Property-based: every duration reads back from its own text; any other text is either a
duration in range or a ValueError, never another exception, and costs little memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.fleet.durations import MAX_AGE_S, UNITS, format_age, parse_age
from tests.hostile import HOSTILE, MiB, peak_traced_bytes


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("12h", 43_200), ("7d", 604_800), ("2w", 1_209_600),
    ("1d12h", 129_600), ("1w2d3h4m5s", 788_645), ("0d1s", 1), ("3650d", MAX_AGE_S),
])
def test_durations_as_operators_write_them(text: str, seconds: int) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize(("text", "expected"), [
    ("", "not a duration"), ("7", "not a duration"), ("7 d", "not a duration"),
    (" 7d", "not a duration"), ("7D", "not a duration"), ("-7d", "not a duration"),
    ("1.5h", "not a duration"), ("٣d", "not a duration"), ("7d\n", "not a duration"),
    ("12h1d", "largest first"), ("1d1d", "largest first"), ("0s", "from 1s to 3650d"),
    ("3651d", "from 1s to 3650d"), ("99999999999s", "not a duration"),
])
def test_what_is_not_a_duration_is_refused_saying_why(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        parse_age(text)


@HOSTILE
@given(seconds=st.integers(1, MAX_AGE_S))
def test_every_duration_reads_back_from_its_own_text(seconds: int) -> None:
    assert parse_age(format_age(seconds)) == seconds


@HOSTILE
@given(parts=st.lists(st.tuples(st.sampled_from(list(UNITS)), st.integers(0, 10_000)),
                      min_size=1, max_size=5))
def test_parts_largest_first_add_up(parts: list[tuple[str, int]]) -> None:
    order = list(UNITS)
    chosen = sorted(dict(parts).items(), key=lambda p: order.index(p[0]))
    text = "".join(f"{count}{unit}" for unit, count in chosen)
    seconds = sum(count * UNITS[unit] for unit, count in chosen)
    if 1 <= seconds <= MAX_AGE_S:
        assert parse_age(text) == seconds
    else:
        with pytest.raises(ValueError):
            parse_age(text)


@HOSTILE
@given(text=st.one_of(st.text(max_size=60),
                      st.text(alphabet="0123456789wdhms ", max_size=60)))
def test_any_text_is_a_duration_in_range_or_a_value_error(text: str) -> None:
    result, peak = peak_traced_bytes(lambda: parse_age(text))
    assert peak < MiB
    if isinstance(result, BaseException):
        assert isinstance(result, ValueError), repr(result)
        assert len(str(result)) < 200  # the text is quoted cut short, whatever its length
    else:
        assert 1 <= result <= MAX_AGE_S


def test_a_huge_text_is_refused_without_reading_it_all_into_numbers() -> None:
    result, peak = peak_traced_bytes(lambda: parse_age("9" * 1_000_000 + "s"))
    assert isinstance(result, ValueError) and peak < 4 * MiB
