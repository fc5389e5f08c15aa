"""Units: MiB, and parsing sizes ("512M", "1GiB") and rates ("100MB/s", "1gbit") from the command line."""
from __future__ import annotations

import re
from fractions import Fraction

#: Bytes in a mebibyte: the unit reports, tables and progress lines count in.
MiB = 1 << 20

_SIZE = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
         "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_size(text: str) -> int:
    """Bytes in `text`: a number with an optional binary unit (K, M, G, T; B/iB optional).

    Exact: a fraction of a byte ("1.3M") is refused, not rounded.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE:
        raise ValueError(f"bad size {text!r}: use e.g. 4096, 64K, 512M or 1G")
    size = Fraction(m.group(1)) * _SIZE[m.group(2).lower()]
    if size.denominator != 1:
        raise ValueError(f"bad size {text!r}: {float(size):.1f} bytes is not a whole number of bytes")
    return int(size)


def format_size(size: int) -> str:
    """`size` bytes in the largest binary unit it reaches, up to two decimals ("1.5 MiB")."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit:
            return f"{size / unit:.2f}".rstrip("0").rstrip(".") + f" {name}"
    return f"{size} B"


def parse_rate(text: str) -> int:
    """Bytes per second in `text`: a size per second ("100M", "100MB/s") or bits ("1gbit")."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)(/s)?\s*", text)
    unit = m.group(2).lower() if m else ""
    if m and unit in _BITS:
        return int(float(m.group(1)) * _BITS[unit] / 8)
    if m and unit in _SIZE:
        return int(float(m.group(1)) * _SIZE[unit])
    raise ValueError(f"bad rate {text!r}: use e.g. 100M, 100MB/s, 500mbit or 1gbit")
