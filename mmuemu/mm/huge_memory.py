"""PMD-mapped THP: splitting a PMD mapping into PTEs, and zapping one.

Mirrors: mm/huge_memory.c (__split_huge_pmd_locked, zap_huge_pmd).  The folio stays large;
only its mapping changes from one PMD leaf to 512 PTEs in the deposited page table.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from mmuemu.mm.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, Kernel, Mm
from mmuemu.mm.physmem import F_ANON, F_SWAPBACKED
from mmuemu.mm.work import Ops
from mmuemu.runs import Rows

__all__ = ["split_huge_pmds", "split_huge_pmds_in", "zap_huge_pmds"]

I64 = NDArray[np.int64]


def split_huge_pmds(k: Kernel, mm: Mm, pmd_flat: I64, ops: Ops) -> None:
    """Mirrors: mm/huge_memory.c __split_huge_pmd_locked, for many PMD leaves at once.

    Each leaf's deposited table is withdrawn and filled with 512 PTEs carrying the leaf's
    attributes; the folio gains a per-page mapcount on every page and 511 references, loses
    its entire mapcount, and AnonExclusive moves from the head to every page.
    """
    if not len(pmd_flat):
        return
    a, pt, ph = k.arch, k.pt, k.phys
    n = a.ptrs_per_table
    flat = pt.flat
    pmd = flat[pmd_flat]
    pte0 = a.pmd_to_pte(pmd)
    heads = a.pte_pfn(pte0)
    rows = np.array([mm.deposit.pop(int(f)) for f in pmd_flat], dtype=np.int64)
    offs = np.arange(n, dtype=np.int64)
    # the deposited tables are filled with one set_ptes(HPAGE_PMD_NR) each
    a.set_ptes(mm, flat, rows * n, pte0, np.full(len(rows), n, dtype=np.int64), ops,
               expanded=(Rows(rows, n), np.tile(offs, len(rows))))
    flat[pmd_flat] = a.mk_table(pt.row_pfn[rows])
    pages = (heads[:, None] + offs[None, :]).ravel()
    ph.mapcount[pages] += 1
    ph.entire_mapcount[heads] -= 1
    ph.large_mapcount[heads] += n - 1
    ph.refcount[heads] += n - 1
    anon = (ph.flags[heads] & F_ANON) != 0
    excl = anon & ph.anon_exclusive[heads]
    if excl.any():
        ph.anon_exclusive[(heads[excl][:, None] + offs[None, :]).ravel()] = True
    ops.add("thp_splits", len(rows))
    ops.add("pte_writes", len(rows) * n)
    ops.add("folio_ref_ops", len(rows))  # folio_ref_add(folio, HPAGE_PMD_NR - 1)
    ops.add("mapcount_ops", len(rows) * (n + 1))  # every page's, and the entire mapcount


def split_huge_pmds_in(k: Kernel, mm: Mm, start: int, end: int, ops: Ops, partial_only: bool = True) -> None:
    """Split the PMD leaves that [start, end) covers only partly (or all, if not ``partial_only``).

    Mirrors: split_huge_pmd_address as vma_adjust_trans_huge / mprotect / zap call it.
    """
    a = k.arch
    size = 1 << a.pmd_shift
    slots = k.pt.pmd_slots(mm.pgd_row, start, end)
    if not len(slots.va):
        return
    leaf = a.pmd_leaf(k.pt.flat[slots.flat])
    if partial_only:
        leaf &= (slots.va < start) | (slots.va + size > end)
    split_huge_pmds(k, mm, slots.flat[leaf], ops)


def zap_huge_pmds(k: Kernel, mm: Mm, pmd_flat: I64, ops: Ops) -> I64:
    """Mirrors: mm/huge_memory.c zap_huge_pmd: clear leaves, drop mapcount and reference,
    free the deposited tables.  Returns the heads whose reference was dropped."""
    a, pt, ph = k.arch, k.pt, k.phys
    flat = pt.flat
    pmd = flat[pmd_flat]
    heads = a.pte_pfn(a.pmd_to_pte(pmd))
    flat[pmd_flat] = 0
    ph.entire_mapcount[heads] -= 1
    ph.large_mapcount[heads] -= 1
    n = a.ptrs_per_table
    fl = ph.flags[heads]
    anon = (fl & F_ANON) != 0
    mm.rss[MM_ANONPAGES] -= n * int(anon.sum())
    shm = ~anon & ((fl & F_SWAPBACKED) != 0)
    mm.rss[MM_SHMEMPAGES] -= n * int(shm.sum())
    mm.rss[MM_FILEPAGES] -= n * int((~anon & ~shm).sum())
    rows = np.array([mm.deposit.pop(int(f)) for f in pmd_flat], dtype=np.int64)
    pt.free(rows)
    ops.add("pmd_clears", len(pmd_flat))
    ops.add("mapcount_ops", len(pmd_flat))
    return heads
