"""VMAs: flags, files, anon_vmas and the sorted per-mm tree with split and merge."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

import numpy as np
from attrs import define, field
from numpy.typing import NDArray

from mmuemu.arch.base import Arch, Prot

__all__ = ["AnonVma", "File", "VmFlag", "Vma", "VmaTree"]


class VmFlag:
    """The vm_flags mmuemu models (include/linux/mm.h names), as plain int bits.

    Plain ints, not an enum: flag tests run on every VMA of every fork.
    """

    READ = 1 << 0
    WRITE = 1 << 1
    EXEC = 1 << 2
    SHARED = 1 << 3
    MAYREAD = 1 << 4
    MAYWRITE = 1 << 5
    MAYEXEC = 1 << 6
    MAYSHARE = 1 << 7
    DONTCOPY = 1 << 8
    WIPEONFORK = 1 << 9
    HUGEPAGE = 1 << 10
    NOHUGEPAGE = 1 << 11
    UFFD_WP = 1 << 12
    PFNMAP = 1 << 13
    MIXEDMAP = 1 << 14
    SOFTDIRTY = 1 << 15

    @classmethod
    def names(cls, flags: int) -> str:
        """``"READ|WRITE|MAYREAD..."`` for a flags value."""
        out = [k for k, v in vars(cls).items() if isinstance(v, int) and k.isupper() and flags & v]
        return "|".join(out) or "0"


_ids = itertools.count(1)


@define(eq=False)
class AnonVma:
    """Mirrors: struct anon_vma (identity only: which VMAs may hold a folio's anon rmap)."""

    id: int = field(factory=lambda: next(_ids))


@define(eq=False)
class File:
    """A file with a page cache (shmem-like when ``swapbacked``).

    ``pagecache[i]`` is the PFN caching page ``i`` (0: not cached).  The cache holds one
    reference on each cached page.
    """

    name: str
    nr_pages: int
    swapbacked: bool = True
    #: shmem behind a shared anonymous mapping (freed when nothing maps it)
    anonymous: bool = False
    pagecache: NDArray[np.int64] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.pagecache = np.zeros(self.nr_pages, dtype=np.int64)


@define(eq=False)
class Vma:
    """Mirrors: struct vm_area_struct."""

    start: int
    end: int
    flags: int
    file: File | None = None
    pgoff: int = 0  # in pages, for file mappings
    anon_vma: AnonVma | None = None

    @property
    def prot(self) -> Prot:
        f = self.flags
        return Prot(bool(f & VmFlag.READ), bool(f & VmFlag.WRITE), bool(f & VmFlag.EXEC),
                    bool(f & VmFlag.SHARED))

    @property
    def is_cow(self) -> bool:
        """Mirrors: is_cow_mapping ((flags & (SHARED|MAYWRITE)) == MAYWRITE)."""
        return (self.flags & (VmFlag.SHARED | VmFlag.MAYWRITE)) == VmFlag.MAYWRITE

    @property
    def is_anonymous(self) -> bool:
        """Mirrors: vma_is_anonymous (no file behind it)."""
        return self.file is None

    @property
    def nr_pages(self) -> int:
        return (self.end - self.start) >> 12

    @property
    def wants_writenotify(self) -> bool:
        """Mirrors: vma_wants_writenotify: shared writable mappings of a file with writeback
        (not shmem) map pages read-only, so the first write faults (page_mkwrite)."""
        f = self.flags
        return bool(f & VmFlag.SHARED and f & VmFlag.WRITE and self.file is not None
                    and not self.file.swapbacked)

    def page_prot(self, arch: Arch) -> int:
        """Mirrors: vma_set_page_prot: vm_get_page_prot, without write for write-notify."""
        p = self.prot
        if self.wants_writenotify:
            p = Prot(p.read, False, p.exec, p.shared)
        return arch.vm_get_page_prot(p)

    def copy(self, **changes: object) -> Vma:
        v = Vma(self.start, self.end, self.flags, self.file, self.pgoff, self.anon_vma)
        for k, val in changes.items():
            setattr(v, k, val)
        return v

    def file_page(self, addr: int | NDArray[np.int64]) -> int | NDArray[np.int64]:
        """The file page index that ``addr`` maps."""
        return ((addr - self.start) >> 12) + self.pgoff


def _mergeable(a: Vma, b: Vma) -> bool:
    if a.end != b.start or a.flags != b.flags or a.file is not b.file:
        return False
    if a.file is not None and a.pgoff + ((a.end - a.start) >> 12) != b.pgoff:
        return False
    return a.anon_vma is b.anon_vma or a.anon_vma is None or b.anon_vma is None


@define(eq=False)
class VmaTree:
    """The VMAs of one mm, sorted by address (the maple tree's role)."""

    vmas: list[Vma] = field(factory=list)

    def __iter__(self) -> Iterator[Vma]:
        return iter(list(self.vmas))

    def __len__(self) -> int:
        return len(self.vmas)

    def find(self, addr: int) -> Vma | None:
        """Mirrors: vma_lookup: the VMA containing ``addr``."""
        i = bisect.bisect_right([v.start for v in self.vmas], addr) - 1
        if i >= 0 and self.vmas[i].end > addr:
            return self.vmas[i]
        return None

    def overlapping(self, start: int, end: int) -> list[Vma]:
        return [v for v in self.vmas if v.start < end and v.end > start]

    def insert(self, vma: Vma) -> None:
        i = bisect.bisect_left([v.start for v in self.vmas], vma.start)
        self.vmas.insert(i, vma)

    def remove(self, vma: Vma) -> None:
        self.vmas.remove(vma)

    def split(self, start: int, end: int) -> list[Vma]:
        """Split VMAs at ``start`` and ``end``; return the VMAs now inside [start, end).

        Mirrors: mm/mmap.c split_vma (both halves keep the anon_vma).
        """
        for at in (start, end):
            v = self.find(at)
            if v is not None and v.start < at:
                right = v.copy(start=at)
                if v.file is not None:
                    right.pgoff = v.pgoff + ((at - v.start) >> 12)
                v.end = at
                self.insert(right)
        return self.overlapping(start, end)

    def merge(self, start: int, end: int) -> None:
        """Mirrors: vma_merge: join neighbours around [start, end) that can be one VMA."""
        i = 0
        vs = self.vmas
        while i + 1 < len(vs):
            a, b = vs[i], vs[i + 1]
            if b.start <= end and a.end >= start and _mergeable(a, b):
                a.end = b.end
                a.anon_vma = a.anon_vma or b.anon_vma
                del vs[i + 1]
            else:
                i += 1

    def in_use(self, lo: NDArray[np.int64], hi: NDArray[np.int64]) -> NDArray[np.bool_]:
        """For spans [lo, hi), whether any VMA overlaps each."""
        if not self.vmas:
            return np.zeros(len(lo), dtype=bool)
        starts = np.array([v.start for v in self.vmas], dtype=np.int64)
        ends = np.array([v.end for v in self.vmas], dtype=np.int64)
        i = np.searchsorted(ends, lo, side="right")  # first VMA ending after lo
        ok = i < len(ends)
        ic = np.minimum(i, len(ends) - 1)
        return ok & (starts[ic] < hi)

    def unmapped_area(self, length: int, align: int, lo: int, hi: int) -> int | None:
        """Mirrors: vm_unmapped_area (top-down): the highest free aligned gap of ``length``."""
        bounds = [lo] + [x for v in self.vmas for x in (v.start, v.end)] + [hi]
        for g_lo, g_hi in reversed(list(zip(bounds[0::2], bounds[1::2], strict=True))):
            g_lo, g_hi = max(g_lo, lo), min(g_hi, hi)
            cand = (g_hi - length) & ~(align - 1)
            if g_hi - g_lo >= length and cand >= g_lo:
                return cand
        return None
