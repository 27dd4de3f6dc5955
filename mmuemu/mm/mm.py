"""The address space (``struct mm_struct``) and the kernel state every path works on."""

from __future__ import annotations

import itertools

import numpy as np
from attrs import define, field
from numpy.typing import NDArray

from mmuemu.arch.base import Arch
from mmuemu.mm.pagetable import PageTables
from mmuemu.mm.physmem import PhysMem
from mmuemu.mm.vma import File, VmaTree

__all__ = ["MM_ANONPAGES", "MM_FILEPAGES", "MM_SHMEMPAGES", "MM_SWAPENTS", "RSS_NAMES", "Kernel", "Mm"]

# include/linux/mm_types_task.h
MM_FILEPAGES, MM_ANONPAGES, MM_SWAPENTS, MM_SHMEMPAGES = 0, 1, 2, 3
RSS_NAMES = {MM_ANONPAGES: "anon", MM_FILEPAGES: "file", MM_SHMEMPAGES: "shmem", MM_SWAPENTS: "swap"}

_mm_ids = itertools.count(1)


@define(eq=False)
class Mm:
    """Mirrors: struct mm_struct (the parts fork, faults and zap use)."""

    pgd_row: int
    vmas: VmaTree = field(factory=VmaTree)
    rss: NDArray[np.int64] = field(factory=lambda: np.zeros(4, dtype=np.int64))
    #: MMF_HAS_PINNED: set on the first FOLL_PIN, never cleared
    has_pinned: bool = False
    #: mm_cpumask: CPUs this mm has run on
    cpumask: set[int] = field(factory=lambda: {0})
    #: anon folio orders the fault path may allocate (mTHP policy), largest first
    folio_orders: tuple[int, ...] = (0,)
    #: PTE tables deposited under PMD-mapped THPs, by the flat index of the PMD entry
    deposit: dict[int, int] = field(factory=dict)
    id: int = field(factory=lambda: next(_mm_ids))
    dead: bool = False


@define(eq=False)
class Kernel:
    """The machine's memory-management state, as the mm core sees it (no time, no costs)."""

    arch: Arch
    phys: PhysMem
    pt: PageTables
    fork_mode: str = "batched"
    mms: dict[int, Mm] = field(factory=dict)
    #: live GUP handles (get_pages references and pins), for accounting and checks
    gup_handles: dict[int, object] = field(factory=dict)
    #: files with a page cache (named files, and shmem behind shared anonymous mappings)
    files: list[File] = field(factory=list)
    #: the CPU the current path runs on (set by the runner)
    cpu: int = 0

    def new_mm(self) -> Mm:
        """Mirrors: mm_alloc / pgd_alloc."""
        row = self.pt.alloc_one(0)
        mm = Mm(pgd_row=row)
        self.mms[mm.id] = mm
        return mm

    def release_unused_files(self) -> None:
        """Mirrors: the last fput of a shmem file behind shared anonymous memory: once no
        VMA maps it, its pages are truncated and freed."""
        used = {id(v.file) for mm in self.mms.values() for v in mm.vmas if v.file is not None}
        for f in list(self.files):
            if f.anonymous and id(f) not in used:
                cached = f.pagecache[f.pagecache != 0]
                f.pagecache[:] = 0
                self.files.remove(f)
                if len(cached):
                    self.phys.ref_sub_and_free(cached, 1)
