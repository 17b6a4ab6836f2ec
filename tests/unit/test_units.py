"""Human-readable durations and sizes, as users write them in pool files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagepipe.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1.5h", 5400.0),
        (" 2H ", 7200.0),
        ("45", 45.0),
        (30, 30.0),
        (0.5, 0.5),
    ],
)
def test_durations_in_human_units_become_seconds(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["1 minute", "", "m", "1m30", "1h1h", "-5s", "5x", "abc"])
def test_a_malformed_duration_is_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration such as 90s"):
        parse_duration(text)


@pytest.mark.parametrize("value", [-1, -0.5])
def test_a_negative_duration_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(value)


def test_a_boolean_is_not_a_duration() -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(True)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * 1024**2),
        ("4G", 4 * 1024**3),
        ("4g", 4 * 1024**3),
        ("1.5K", 1536),
        ("2MiB", 2 * 1024**2),
        ("2MB", 2 * 1024**2),
        ("1T", 1024**4),
        ("2048", 2048),
        (4096, 4096),
    ],
)
def test_sizes_in_binary_units_become_bytes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "4X", "G", "-1M", ""])
def test_a_malformed_size_is_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size such as 512M"):
        parse_size(text)


def test_a_negative_or_boolean_size_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(False)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(90, "1m30s"), (7200, "2h"), (0.5, "0.5s"), (0, "0s"), (86400 + 61, "1d1m1s"), (60, "1m")],
)
def test_durations_print_in_their_shortest_form(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"), [(536870912, "512M"), (1536, "1.5K"), (100, "100B"), (4 * 1024**3, "4G")]
)
def test_sizes_print_in_binary_units(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=10 * 365 * 86400))
def test_a_printed_whole_second_duration_reads_back_the_same(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=2**50))
def test_a_printed_size_in_whole_units_reads_back_the_same(size: int) -> None:
    text = format_size(size)
    if "." not in text:
        assert parse_size(text.removesuffix("B")) == size
