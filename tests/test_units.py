"""Sizes and durations: the grammar of spec resources.md §1 and message.md §5, value by value."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from studio_runner.units import format_duration, format_size, parse_duration, parse_size

# --- sizes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3gb", 3_000_000_000),
        ("3g", 3_000_000_000),
        ("4G", 4_000_000_000),
        ("2GiB", 2 * 1024**3),
        ("512mb", 512_000_000),
        ("16gib", 17_179_869_184),
        ("1024mb", 1_024_000_000),
        ("60g", 60_000_000_000),
        ("1.5g", 1_500_000_000),
        ("1,024", 1024),
        ("1,000 kb", 1_000_000),
        ("  8 G  ", 8_000_000_000),
        (".5k", 500),
        ("7.", 7),
        ("0", 0),
        ("0g", 0),
        ("512", 512),
        ("512b", 512),
        ("512 B", 512),
        ("1.9", 1),  # fractional bytes are truncated, as Go does
        ("1e", 10**18),  # "e" is the exa unit, not an exponent
        ("2Ki", 2048),
        ("3TB", 3 * 10**12),
        ("1pib", 1024**5),
        ("15eib", 15 * 1024**6),
    ],
)
def test_parse_size_examples(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("prefix", list("kmgtpe"))
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("with_b", [False, True])
def test_every_unit_spelling_in_any_case(prefix: str, binary: bool, with_b: bool) -> None:
    power = "kmgtpe".index(prefix) + 1
    base = 1024 if binary else 1000
    unit = prefix + ("i" if binary else "") + ("b" if with_b else "")
    for spelling in (unit, unit.upper(), unit.capitalize()):
        assert parse_size(f"3{spelling}") == 3 * base**power, spelling


@pytest.mark.parametrize(("number", "expected"), [(0, 0), (5, 5), (2.7, 2), (1e9, 1_000_000_000)])
def test_parse_size_numbers_are_bytes(number: float, expected: int) -> None:
    assert parse_size(number) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "g",
        "gb",
        "-1g",
        "+1g",
        "abc",
        "1x",
        "1gig",
        "1.2.3g",
        "1e5",
        "1 2",
        "3 g b",
        ",5",
        "16eib",  # 2**64: past Go's uint64
        "18446744073709551616",
        "9" * 5000,
        -1,
        -0.5,
        float("nan"),
        float("inf"),
        2**64,
        True,
        None,
        [],
        {"ram": "3g"},
    ],
)
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)  # type: ignore[arg-type]


def test_parse_size_error_is_short_for_long_garbage() -> None:
    with pytest.raises(ValueError) as info:
        parse_size("x" * 10_000)
    assert len(str(info.value)) < 200


_UNIT_VALUES = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtpe", start=1):
    _UNIT_VALUES.update({_p: 1000**_i, _p + "b": 1000**_i, _p + "i": 1024**_i, _p + "ib": 1024**_i})


@given(
    whole=st.integers(min_value=0, max_value=10**6),
    frac=st.one_of(st.just(""), st.from_regex(r"\.[0-9]{0,4}", fullmatch=True)),
    unit=st.sampled_from(sorted(_UNIT_VALUES)),
    upper=st.booleans(),
    space=st.sampled_from(["", " ", "  "]),
)
@settings(max_examples=300, deadline=None)
def test_parse_size_matches_the_grammar(whole: int, frac: str, unit: str, upper: bool, space: str) -> None:
    text = f"{space}{whole}{frac}{space}{unit.upper() if upper else unit}{space}"
    expected = int(Decimal(f"{whole}{frac}".rstrip(".") or "0") * _UNIT_VALUES[unit])
    if expected >= 2**64:
        with pytest.raises(ValueError):
            parse_size(text)
    else:
        assert parse_size(text) == expected


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_parse_size_on_any_text_returns_bytes_or_raises_value_error(text: str) -> None:
    try:
        result = parse_size(text)
    except ValueError:
        return
    assert isinstance(result, int) and 0 <= result < 2**64


# --- durations ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20m", 1200.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("48h2m10s", 172_930.0),
        ("300ms", 0.3),
        ("1.5h", 5400.0),
        ("2h45m", 9900.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1H30M", 5400.0),
        ("10S", 10.0),
        ("1m1m", 120.0),  # Go sums repeated units
        ("1500us", 0.0015),
        ("5µs", 0.000005),
        ("5μs", 0.000005),
        ("250ns", 2.5e-7),
        (" 20m ", 1200.0),
        ("90", 90.0),  # bare number = seconds (our choice)
        ("1.5", 1.5),
    ],
)
def test_parse_duration_examples(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize(("number", "expected"), [(0, 0.0), (90, 90.0), (1.5, 1.5)])
def test_parse_duration_numbers_are_seconds(number: float, expected: float) -> None:
    assert parse_duration(number) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "  ",
        "h",
        "1d",
        "1w",
        "-1h",
        "+1h",
        "1h 30m",
        "1hh",
        "1.2.3s",
        "soon",
        "1 h",
        "1e3s",
        "9" * 400 + "h",
        "3000000000h",
        -1,
        float("nan"),
        float("inf"),
        1e300,
        True,
        None,
        ["1h"],
    ],
)
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)  # type: ignore[arg-type]


@given(
    parts=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=10_000),
            st.sampled_from(["ns", "us", "µs", "ms", "s", "m", "h", "NS", "Ms", "S", "M", "H"]),
        ),
        min_size=1,
        max_size=4,
    )
)
@settings(max_examples=300, deadline=None)
def test_parse_duration_sums_its_parts(parts: list[tuple[int, str]]) -> None:
    scale = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    text = "".join(f"{n}{u}" for n, u in parts)
    expected = sum(n * scale[u.lower()] for n, u in parts)
    assert parse_duration(text) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_parse_duration_on_any_text_returns_seconds_or_raises_value_error(text: str) -> None:
    try:
        result = parse_duration(text)
    except ValueError:
        return
    assert isinstance(result, float) and result >= 0


# --- display --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (3 * 1024**2, "3 MiB"),
        (1_610_612_736, "1.5 GiB"),
        (3_000_000_000, "2.8 GiB"),
        (16 * 1024**3, "16 GiB"),
        (2**64, "16 EiB"),
        (-2048, "-2 KiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@given(st.integers(min_value=0, max_value=2**63))
@settings(max_examples=300, deadline=None)
def test_format_size_reads_back_within_rounding(n: int) -> None:
    assert parse_size(format_size(n)) == pytest.approx(n, rel=0.05, abs=0)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (0.3, "300ms"),
        (0.0015, "1.5ms"),
        (1.5, "1.5s"),
        (59, "59s"),
        (60, "1m"),
        (90, "1m30s"),
        (1200, "20m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (5400.4, "1h30m"),
        (172_930, "48h2m10s"),
        (-90, "-1m30s"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@given(st.integers(min_value=0, max_value=10**8))
@settings(max_examples=300, deadline=None)
def test_format_duration_reads_back(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
