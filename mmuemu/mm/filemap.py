"""File pages: the page cache and mapping its pages on a fault.

Mirrors: mm/filemap.c filemap_fault / mm/shmem.c shmem_get_folio (one order-0 folio per
uncached page) and mm/memory.c finish_fault / set_pte_range.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from mmuemu.errors import SegmentationFault
from mmuemu.mm.mm import MM_FILEPAGES, MM_SHMEMPAGES, Kernel, Mm
from mmuemu.mm.physmem import F_SWAPBACKED
from mmuemu.mm.undo import Undo, alloc_folios
from mmuemu.mm.vma import Vma, VmFlag
from mmuemu.mm.work import Ops

__all__ = ["map_file", "pagecache"]

I64 = NDArray[np.int64]


def pagecache(k: Kernel, vma: Vma, addrs: I64, undo: Undo) -> I64:
    """Mirrors: filemap_fault / shmem_get_folio: the cached page for each address, allocating
    (order 0, zero-filled) pages not yet cached."""
    f = vma.file
    assert f is not None
    pg = np.asarray(vma.file_page(addrs), dtype=np.int64)
    if (pg >= f.nr_pages).any():
        bad = int(addrs[pg >= f.nr_pages][0])
        raise SegmentationFault(f"access at {bad:#x} beyond the end of file {f.name!r} (SIGBUS)")
    missing = np.unique(pg[f.pagecache[pg] == 0])
    if len(missing):
        flags = F_SWAPBACKED if f.swapbacked else np.uint8(0)
        heads = alloc_folios(k.phys, 0, len(missing), flags, undo)
        f.pagecache[missing] = heads
        undo.hooks.append(lambda: f.pagecache.__setitem__(missing, 0))
    return f.pagecache[pg]


def map_file(k: Kernel, mm: Mm, vma: Vma, idx: I64, pfns: I64, prot: int, write: bool, ops: Ops) -> None:
    """Mirrors: finish_fault / set_pte_range for file pages (read, or shared write)."""
    a, ph = k.arch, k.phys
    pte = a.pfn_pte(pfns, prot)
    if write:  # maybe_mkwrite(pte_mkdirty(entry)): a shared write fault maps it writable
        pte = a.pte_mkdirty(pte)
        if vma.flags & VmFlag.WRITE:
            pte = a.pte_mkwrite(pte)
    k.pt.flat[idx] = pte
    np.add.at(ph.mapcount, pfns, 1)
    np.add.at(ph.refcount, pfns, 1)
    shm = (ph.flags[pfns] & F_SWAPBACKED) != 0
    mm.rss[MM_SHMEMPAGES] += int(shm.sum())
    mm.rss[MM_FILEPAGES] += int((~shm).sum())
    ops.add("page_faults", len(idx))
    ops.add("pte_writes", len(idx))
