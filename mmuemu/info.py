"""Read-only views of emulated state handed to users."""

from __future__ import annotations

from attrs import frozen

__all__ = ["FolioInfo", "PteInfo", "parse_size"]

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


@frozen
class PteInfo:
    """One decoded page-table entry (a PMD leaf is shown as the PTE of the page)."""

    present: bool
    pfn: int
    write: bool
    dirty: bool
    young: bool
    cont: bool
    special: bool
    uffd_wp: bool
    soft_dirty: bool
    raw: int
    pmd: bool = False


@frozen
class FolioInfo:
    """The folio a page belongs to, as the kernel's accounting sees it."""

    pfn: int  # head PFN
    order: int
    refcount: int
    mapcount: int  # of this page (PMD mappings included)
    anon: bool
    anon_exclusive: bool
    pinned: bool
    large_mapcount: int
    entire_mapcount: int
    pincount: int


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes from an int or a string like ``"16GiB"`` (binary units only)."""
    from mmuemu.errors import InvalidArgument

    if isinstance(value, bool):
        raise InvalidArgument(f"{what} {value!r}: expected bytes or a string like '16GiB'")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidArgument(f"{what} {value} must be positive")
        return value
    if isinstance(value, str):
        s = value.strip()
        for unit in sorted(_UNITS, key=len, reverse=True):
            if s.endswith(unit):
                num = s[: -len(unit)].strip()
                try:
                    n = float(num)
                except ValueError:
                    break
                if n <= 0:
                    raise InvalidArgument(f"{what} {value!r} must be positive")
                return int(n * _UNITS[unit])
        if s.isdigit():
            return int(s)
    raise InvalidArgument(f"{what} {value!r}: use bytes or binary units B, KiB, MiB, GiB, TiB "
                          f"(e.g. '16GiB'; '16GB' is not accepted)")
