"""Write-protect faults: reuse the page or copy it (and FAULT_FLAG_UNSHARE).

Mirrors: mm/memory.c do_wp_page, wp_page_reuse, wp_page_copy (and do_cow_fault's copy of a
private file page), for many pages at once.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from mmuemu.mm.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, Kernel, Mm
from mmuemu.mm.physmem import F_ANON, F_SWAPBACKED, ZERO_PFN
from mmuemu.mm.vma import AnonVma, Vma, VmFlag
from mmuemu.mm.work import Ops

__all__ = ["anon_vma_prepare", "wp_copy", "wp_reuse"]

I64 = NDArray[np.int64]


def anon_vma_prepare(vma: Vma) -> None:
    """Mirrors: anon_vma_prepare."""
    if vma.anon_vma is None:
        vma.anon_vma = AnonVma()


def wp_reuse(k: Kernel, mm: Mm, vma: Vma, idx: I64, cur: NDArray[np.uint64], pfn: I64,
              unshare_only: bool, ops: Ops) -> None:
    """Mirrors: do_wp_page's reuse branch and wp_page_reuse (or wp_page_shared)."""
    a, ph = k.arch, k.phys
    if not vma.flags & VmFlag.SHARED:
        ph.anon_exclusive[pfn] = True
    ops.add("page_faults", len(idx))
    ops.add("cow_reuses", len(idx))
    if unshare_only:
        return
    new = a.pte_mkyoung(a.pte_mkdirty(a.pte_mkwrite(cur)))
    a.ptep_set_access_flags(mm, k.pt.flat, idx, new, ops)


def wp_copy(k: Kernel, mm: Mm, vma: Vma, idx: I64, cur: NDArray[np.uint64], src: I64,
             was_mapped: NDArray[np.bool_], new: I64, prot: int, write: bool,
             ops: Ops) -> None:
    """Mirrors: wp_page_copy (and do_cow_fault for private file pages not yet mapped)."""
    a, ph = k.arch, k.phys
    ph.token[new] = ph.token[src]
    ph.mapcount[new] = 1
    ph.anon_exclusive[new] = True
    pte = a.pfn_pte(new, prot)
    if write:
        pte = a.pte_mkdirty(pte)
        if vma.flags & VmFlag.WRITE:
            pte = a.pte_mkwrite(pte)
    else:  # an unshare maps the copy read-only and clean, keeping soft-dirty and uffd-wp
        pte = np.where(a.pte_soft_dirty(cur), a.pte_mksoft_dirty(pte), pte)
        pte = np.where(a.pte_uffd_wp(cur), a.pte_mkuffd_wp(pte), pte)
    mapped = idx[was_mapped]
    if len(mapped):
        old = a.ptep_get_and_clear(mm, k.pt.flat, mapped, ops)
        a.flush_tlb_pages(mm, len(mapped), ops, k.cpu)  # ptep_clear_flush, per page
        opfn = a.pte_pfn(old)
        normal = ~a.pte_special(old)
        op = opfn[normal]
        oh = ph.head[op].astype(np.int64)
        ph.mapcount[op] -= 1
        large = ph.order[oh] > 0
        np.subtract.at(ph.large_mapcount, oh[large], 1)
        anon = (ph.flags[oh] & F_ANON) != 0
        shm = ~anon & ((ph.flags[oh] & F_SWAPBACKED) != 0)
        mm.rss[MM_ANONPAGES] -= int(anon.sum())
        mm.rss[MM_SHMEMPAGES] -= int(shm.sum())
        mm.rss[MM_FILEPAGES] -= int((~anon & ~shm).sum())
        ops.add("folios_freed", len(ph.ref_sub_and_free(oh, 1)))
        ops.add("mapcount_ops", len(op))
        # folio_get in do_wp_page, then the put of that reference and of the mapping's
        ops.add("folio_ref_ops", 3 * len(op))
    k.pt.flat[idx] = pte
    anon_vma_prepare(vma)
    mm.rss[MM_ANONPAGES] += len(new)
    ops.add("page_faults", len(idx))
    ops.add("cow_copies", len(idx))
    zeroed = int(np.count_nonzero(src == ZERO_PFN))  # wp_page_copy zero-fills, not copies
    ops.add("page_zeroes", zeroed)
    ops.add("page_copies", len(idx) - zeroed)
    ops.add("pte_writes", len(idx))
