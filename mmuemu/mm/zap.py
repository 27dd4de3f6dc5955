"""Unmapping: zap_pte_range for munmap, exit and MADV_DONTNEED, batched or legacy.

Mirrors: mm/memory.c unmap_page_range, zap_pmd_range, zap_pte_range, zap_present_ptes
(v6.9 batched: one rmap removal and one reference drop per folio batch) and the pre-v6.9
per-PTE zap; mm/mmu_gather.c drops the references after the TLB flush.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mmuemu.mm.huge_memory import split_huge_pmds_in, zap_huge_pmds
from mmuemu.mm.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, Kernel, Mm
from mmuemu.mm.physmem import F_ANON, F_SWAPBACKED
from mmuemu.mm.work import Ops, Work
from mmuemu.runs import expand_runs

__all__ = ["zap_range"]

I64 = NDArray[np.int64]
#: PTE tables zapped per Work (as fork copies them): 256 MiB of address space, whose
#: temporaries stay near fork's, instead of growing with the VMA (an 8 GiB exit's used to
#: reach the allocator's trim threshold, so the next fork paid ~670 page faults)
CHUNK_TABLES = 128


def zap_range(k: Kernel, mm: Mm, start: int, end: int, *, mode: str | None = None,
              full: bool = False, flush: bool = True) -> Generator[Work, Any, None]:
    """Mirrors: unmap_page_range + tlb_finish_mmu over [start, end) of ``mm``.

    The TLB flush covers only what was cleared (the mmu_gather's range, with a PMD stride
    when only PMD leaves were), and nothing when nothing was; ``flush=False`` leaves it to
    the caller (exit_mmap gathers every VMA and flushes once).
    """
    mode = mode or k.fork_mode
    a, pt, ph = k.arch, k.pt, k.phys
    n = a.ptrs_per_table
    ops = Ops()
    split_huge_pmds_in(k, mm, start, end, ops)
    slots = pt.pmd_slots(mm.pgd_row, start, end)
    pmd = pt.flat[slots.flat]
    leaf = a.pmd_leaf(pmd)
    drop_heads: list[I64] = []
    drop_nr: list[I64] = []
    span: list[int] = []
    pmd_only = True
    if leaf.any():
        span += [int(slots.va[leaf][0]), int(slots.va[leaf][-1]) + (n << 12)]
        h = zap_huge_pmds(k, mm, slots.flat[leaf], ops)
        drop_heads.append(h)
        drop_nr.append(np.ones(len(h), np.int64))
        ops.add("folio_ref_ops", len(h))
    tabs = (pmd != 0) & ~leaf
    va = slots.va[tabs]
    rows = pt.rows_of(pmd[tabs])
    lo = np.maximum(va, start)
    hi = np.minimum(va + (n << 12), end)
    first = (lo - va) >> 12
    cnt = (hi - lo) >> 12
    work: Work | None = None
    for c in range(0, len(va), CHUNK_TABLES):  # a Work per chunk: temporaries stay bounded
        sl = slice(c, c + CHUNK_TABLES)
        idx, off = expand_runs(rows[sl] * n + first[sl], cnt[sl])
        vals = pt.flat[idx]
        live = (vals != 0).nonzero()[0]
        if not len(live):
            continue
        base = np.repeat(lo[sl], cnt[sl])
        j0, j1 = int(live[0]), int(live[-1])
        span += [int(base[j0]) + (int(off[j0]) << 12), int(base[j1]) + (int(off[j1]) << 12) + 4096]
        pmd_only = False
        if work is not None:
            yield work
        # the ops so far (split and huge PMDs) go with the first chunk's Work
        work = _zap_ptes(k, mm, idx[live], vals[live], mode, full, ops, drop_heads, drop_nr)
        ops = Ops()
    if work is None:
        work = Work("zap_pte_range", ops)
    ops = work.ops
    if flush and span:
        if full:
            a.flush_tlb_mm(mm, ops, k.cpu)
        else:
            a.flush_tlb_range(mm, min(span), max(span), ops, k.cpu,
                              stride_shift=a.pmd_shift if pmd_only else a.page_shift)
    if drop_heads:
        heads = np.concatenate(drop_heads)
        nrs = np.concatenate(drop_nr)
        dead = ph.ref_sub_and_free(heads, nrs)
        freed = len(dead)
        small = int((dead == 0).sum())
        ops.add("folios_freed", freed)
        ops.add("folios_freed_small", small)
        ops.add("folios_freed_large", freed - small)
    yield work


def _zap_ptes(k: Kernel, mm: Mm, idx: I64, vals: NDArray[np.uint64], mode: str, full: bool,
              ops: Ops, drop_heads: list[I64], drop_nr: list[I64]) -> Work:
    """Mirrors: zap_present_ptes / zap_present_folio_ptes over every live entry at once."""
    a, ph = k.arch, k.phys
    n = a.ptrs_per_table
    m = len(vals)
    present = a.pte_present(vals)
    normal = present & ~a.pte_special(vals)
    pfn = np.where(normal, a.pte_pfn(vals), 0)
    head = ph.head[pfn].astype(np.int64)
    large = normal & (ph.order[head] > 0)
    tab = idx // n
    cont = np.zeros(m, bool)
    if mode == "batched" and large.any():
        # zap_present_ptes batches with FPB_IGNORE_DIRTY | FPB_IGNORE_SOFT_DIRTY
        bits = a.pte_batch_bits(vals, ignore_dirty=True, ignore_soft_dirty=True)
        cont[1:] = (large[1:] & large[:-1] & (head[1:] == head[:-1]) & (pfn[1:] == pfn[:-1] + 1)
                    & (bits[1:] == bits[:-1]) & (tab[1:] == tab[:-1]) & (idx[1:] == idx[:-1] + 1))
    starts = np.flatnonzero(~cont)
    nr = np.diff(np.append(starts, m))
    n_items = len(starts)
    items = np.arange(n_items)
    ops2 = Ops(n_items)
    ops2.merge(ops)
    # clear the entries (batches through the arch's get_and_clear_full_ptes)
    a.get_and_clear_full_ptes(mm, k.pt.flat, idx[starts], nr, full, ops2, items)
    ops2.add("pte_reads", 1, items)
    bi = np.flatnonzero(large[starts]) if mode == "batched" else np.zeros(0, np.int64)
    if len(bi):
        ops2.add("pte_reads", nr[bi], bi)  # folio_pte_batch's reads, the mismatch included
        ops2.add("zap_batches", 1, bi)
    ops2.add("zap_items", 1, items)
    # rmap: per-page mapcount atomics, large mapcount once per batch
    np_norm = normal[starts]
    ni = np.flatnonzero(np_norm)
    ent, _ = expand_runs(starts[ni], nr[ni])
    ph.scatter_add(ph.mapcount, pfn[ent], -1)  # a file page may be mapped twice here
    ops2.add("mapcount_ops", nr[ni], ni)
    h = head[starts[ni]]
    lg = ph.order[h] > 0
    ph.scatter_add(ph.large_mapcount, h[lg], -nr[ni][lg])
    # rss
    fl = ph.flags[h]
    anon = (fl & F_ANON) != 0
    shm = ~anon & ((fl & F_SWAPBACKED) != 0)
    mm.rss[MM_ANONPAGES] -= int(nr[ni][anon].sum())
    mm.rss[MM_SHMEMPAGES] -= int(nr[ni][shm].sum())
    mm.rss[MM_FILEPAGES] -= int(nr[ni][~anon & ~shm].sum())
    # references are dropped after the TLB flush (mmu_gather), one per gathered batch
    drop_heads.append(h)
    drop_nr.append(nr[ni])
    ops2.add("gather_entries", 1, ni)
    ops2.add("folio_ref_ops", 1, ni)
    sec = np.flatnonzero(np.append(True, tab[starts][1:] != tab[starts][:-1]))
    ops2.add("ptl_locks", 1, sec)
    # zap_pmd_range calls cond_resched() after each table (its cost is in the per-table costs)
    return Work("zap_pte_range", ops2, sections=sec, locks=("ptl",), lock_ids=tab[starts][sec], cond_resched=True)
