"""Sizes and durations as StudioML clients write them: the one place they are parsed and shown.

Grammars (spec resources.md §1, message.md §5):

* Size = Go ``humanize.ParseBytes``: optional spaces, a decimal number (commas ignored, fraction allowed), an
  optional case-insensitive unit. No unit or ``b`` = bytes; ``k kb m mb g gb t tb p pb e eb`` are powers of
  1000; ``ki kib mi mib gi gib ti tib pi pib ei eib`` powers of 1024. Fractional bytes are truncated, as Go
  does. A JSON number is already bytes.
* Duration = the union of the client's ``[Nh][Nm][Ns]`` and Go's ``time.ParseDuration``: an unsigned
  sequence of ``<number><unit>`` with units ``ns us µs ms s m h`` (case-insensitive, no ``d``). ``"0"`` is
  zero and — our choice, Go would refuse it — any bare number (``"90"``, ``"1.5"``, a JSON number) is seconds.

Why hand-written: no maintained Python library implements exactly these grammars (``humanfriendly`` treats
``K`` differently and ignores commas; ``pytimeparse`` accepts ``d``, words and signs), and two anchored
regular expressions are easier to check against the spec than a library's adjustments.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtpe", start=1):
    _SIZE_UNITS[_p] = _SIZE_UNITS[_p + "b"] = 1000**_i
    _SIZE_UNITS[_p + "i"] = _SIZE_UNITS[_p + "ib"] = 1024**_i

_MAX_SIZE = 2**64 - 1
"""Go's ParseBytes returns a uint64 and refuses anything larger."""

_SIZE_RE = re.compile(r"\s*([0-9][0-9,]*(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.ASCII | re.IGNORECASE)

_DURATION_UNITS: dict[str, Decimal] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),  # U+00B5 micro sign
    "μs": Decimal("1e-6"),  # U+03BC Greek mu, which Go also accepts
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DURATION_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|m|h)", re.IGNORECASE)
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ns|us|µs|μs|ms|s|m|h))+", re.IGNORECASE)
_BARE_NUMBER_RE = re.compile(_NUMBER)

_MAX_DURATION = (2**63 - 1) / 1e9
"""Go's time.Duration limit (about 292 years); longer values are refused as Go refuses them."""

_SHOWN_MAX = 60


def _shown(value: object) -> str:
    """repr of a rejected value, cut short so garbage cannot flood a log line."""
    text = repr(value)
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


def parse_size(value: str | int | float) -> int:
    """Bytes in ``value`` (``"3g"`` = 3e9, ``"2GiB"`` = 2*1024**3, ``512`` = 512). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: expected a number of bytes or a string like '3g'")
    if isinstance(value, int):
        number = Decimal(value)
        unit = 1
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"invalid size {value!r}: not a finite number")
        number = Decimal(value)
        unit = 1
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        if match is None:
            raise ValueError(
                f"invalid size {_shown(value)}: expected a number with an optional unit, like 3g, 512mb, 2GiB"
            )
        suffix = match.group(2).lower()
        if suffix not in _SIZE_UNITS:
            raise ValueError(f"invalid size {_shown(value)}: unknown unit {suffix!r}")
        try:
            number = Decimal(match.group(1).replace(",", ""))
        except InvalidOperation:  # pragma: no cover - the regex admits only decimal numbers
            raise ValueError(f"invalid size {_shown(value)}") from None
        unit = _SIZE_UNITS[suffix]
    else:
        raise ValueError(f"invalid size: expected a string or a number, got {type(value).__name__}")
    if number < 0:
        raise ValueError(f"invalid size {_shown(value)}: negative")
    total = number * unit
    if total > _MAX_SIZE:
        raise ValueError(f"invalid size {_shown(value)}: too large")
    return int(total)


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value`` (``"1h30m"`` = 5400.0, ``"300ms"`` = 0.3, ``"90"`` = 90.0). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected seconds or a string like '1h30m'")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"invalid duration {_shown(value)}: too large") from None
    elif isinstance(value, str):
        text = value.strip()
        if _BARE_NUMBER_RE.fullmatch(text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            # Decimal keeps "300ms" at exactly 0.3 and copes with absurdly long digit strings.
            total = sum(Decimal(n) * _DURATION_UNITS[u.lower()] for n, u in _DURATION_PART.findall(text))
            seconds = float(total)
        else:
            raise ValueError(
                f"invalid duration {_shown(value)}: expected <number><unit>... with units ns us ms s m h,"
                " like 20m, 1h30m, 300ms"
            )
    else:
        raise ValueError(f"invalid duration: expected a string or a number, got {type(value).__name__}")
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {_shown(value)}: must be a non-negative number")
    if seconds > _MAX_DURATION:  # infinity included
        raise ValueError(f"invalid duration {_shown(value)}: too large")
    return seconds


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: int) -> str:
    """Bytes for people: ``1610612736`` -> ``"1.5 GiB"``, ``512`` -> ``"512 B"``."""
    sign = "-" if n < 0 else ""
    size = float(abs(n))
    for unit in _BINARY_UNITS:
        if size < 1024 or unit == _BINARY_UNITS[-1]:
            break
        size /= 1024
    if unit == "B":
        return f"{sign}{abs(n)} B"
    text = f"{size:.1f}".removesuffix(".0")
    return f"{sign}{text} {unit}"


def format_duration(seconds: float) -> str:
    """Seconds for people, in a form :func:`parse_duration` reads back: ``5400`` -> ``"1h30m"``.

    At a minute or more the value is rounded to whole seconds; below a second it is shown in milliseconds.
    """
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:.3f}".rstrip("0").rstrip(".") + "ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts)


def format_elapsed(seconds: float) -> str:
    """A duration for a log line, short and steady in width: ``0.4s``, ``45s``, ``1m03s``, ``1h02m``.

    Unlike :func:`format_duration` (exact, read back by :func:`parse_duration`), this rounds to what a person
    reading a log wants: tenths below 10 s, whole seconds below an hour, minutes from an hour on.
    """
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_elapsed(-seconds)
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def format_rate(nbytes: float, seconds: float) -> str:
    """Throughput for people: ``format_rate(31_500_000, 1.0)`` -> ``"30 MiB/s"``; ``"-"`` without time."""
    if seconds <= 0 or not math.isfinite(seconds):
        return "-"
    return f"{format_size(round(nbytes / seconds))}/s"
