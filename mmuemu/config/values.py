"""Values in configs: sizes (bytes, or a number with a binary unit such as ``"64KiB"``) and
the error a field validator raises."""

from __future__ import annotations

import re

__all__ = ["FieldError", "Size", "parse_size_value"]

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_DECIMAL = {"K": "KiB", "KB": "KiB", "k": "KiB", "kB": "KiB", "M": "MiB", "MB": "MiB", "G": "GiB",
            "GB": "GiB", "T": "TiB", "TB": "TiB"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


class FieldError(ValueError):
    """A field's value is not allowed: ``name`` is the field, the message says what is."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class Size(int):
    """A size in bytes (an int; configs may spell it with a binary unit)."""


def parse_size_value(value: object) -> Size:
    """``value`` as a Size; ValueError saying what is allowed otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a size: bytes or a string like '64KiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return Size(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            num, unit = m.groups()
            if unit in _UNITS or unit == "":
                n = float(num) * _UNITS[unit or "B"]
                if n != int(n):
                    raise ValueError("a size must be a whole number of bytes")
                return Size(int(n))
            if unit in _DECIMAL:
                raise ValueError(f"unit {unit!r} is ambiguous: use binary units B, KiB, MiB, GiB, TiB "
                                 f"(did you mean '{num}{_DECIMAL[unit]}'?)")
        if value.strip().startswith("-"):
            raise ValueError("a size cannot be negative")
    raise ValueError("expected a size: bytes or a number with a binary unit B, KiB, MiB, GiB, TiB "
                     "(e.g. '64KiB')")
