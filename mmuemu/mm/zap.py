"""Unmapping: zap_pte_range for munmap, exit and MADV_DONTNEED, batched or legacy.

Mirrors: mm/memory.c unmap_page_range, zap_pmd_range, zap_pte_range, zap_present_ptes
(v6.9 batched: one rmap removal and one reference drop per folio batch) and the pre-v6.9
per-PTE zap; mm/mmu_gather.c drops the references after the TLB flush.

Like fork's copy, a chunk of tables is zapped in one pass.  The usual chunk (a process
faulted its memory in order, or a fork copied it) maps one physically contiguous run of
normal pages, each entry the previous one with the PFN advanced by one: that case is
detected with a few scalar tests and one vector test, and zapped with slices of the state
arrays and per-chunk counts (:func:`_zap_normal`); a chunk whose entries all map normal
pages, but not as one run (after COW faults, from fragmented memory), takes the same pass
with arrays of PFNs; anything else (holes, the zero page, non-present entries) takes the
general pass (:func:`_zap_ptes`).  All give exactly the same entries, folios, counters
and Works.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mmuemu.arch.base import Arch
from mmuemu.mm.huge_memory import split_huge_pmds_in, zap_huge_pmds
from mmuemu.mm.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, Kernel, Mm
from mmuemu.mm.pagetable import PageTables
from mmuemu.mm.physmem import F_ANON, F_SWAPBACKED, PhysMem
from mmuemu.mm.work import ALL, Ops, Work
from mmuemu.runs import Rows, Sel, as_span, expand_runs, flat_index, sel_view

__all__ = ["zap_range"]

I64 = NDArray[np.int64]
#: PTE tables zapped per Work (as fork copies them): 256 MiB of address space, whose
#: temporaries stay near fork's, instead of growing with the VMA (an 8 GiB exit's used to
#: reach the allocator's trim threshold, so the next fork paid ~670 page faults)
CHUNK_TABLES = 128
#: references gathered for the flush: (folio heads, or a slice of order-0 pages; count each)
Drops = list[tuple[I64 | slice, I64 | int]]


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
    drops: Drops = []
    span: list[int] = []
    pmd_only = True
    if leaf.any():
        span += [int(slots.va[leaf][0]), int(slots.va[leaf][-1]) + (n << 12)]
        h = zap_huge_pmds(k, mm, slots.flat[leaf], ops)
        drops.append((h, np.ones(len(h), np.int64)))
        ops.add("folio_ref_ops", len(h))
        tabs = (pmd != 0) & ~leaf
        va, rows = slots.va[tabs], pt.rows_of(pmd[tabs])
    elif pmd.all():  # the usual case: every slot holds a PTE table
        va, rows = slots.va, pt.rows_of(pmd)
    else:
        tabs = pmd != 0
        va, rows = slots.va[tabs], pt.rows_of(pmd[tabs])
    lo = np.maximum(va, start)
    hi = np.minimum(va + (n << 12), end)
    first = (lo - va) >> 12
    cnt = (hi - lo) >> 12
    work: Work | None = None
    for c in range(0, len(va), CHUNK_TABLES):  # a Work per chunk: temporaries stay bounded
        sl = slice(c, c + CHUNK_TABLES)
        chunk = _Chunk(pt, rows[sl], first[sl], cnt[sl], n)
        pages = _normal_pages(a, chunk.vals)
        if pages is not None:  # every entry live: the flush covers the chunk's whole range
            span += [int(lo[c]), int(hi[sl][-1])]
            live = None
        else:
            live = (chunk.vals != 0).nonzero()[0]
            if not len(live):
                continue
            span += [chunk.addr(lo[sl], int(live[0])), chunk.addr(lo[sl], int(live[-1])) + 4096]
        pmd_only = False
        if work is not None:
            yield work
        # the ops so far (split and huge PMDs) go with the first chunk's Work
        if pages is not None:
            work = _zap_normal(k, mm, chunk, pages, mode, full, ops, drops)
        else:
            idx = chunk.flat()
            work = _zap_ptes(k, mm, idx[live], chunk.vals[live], mode, full, ops, drops)
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
    if drops:
        dead = _put_folios(ph, drops)
        freed = len(dead)
        small = int((dead == 0).sum())
        ops.add("folios_freed", freed)
        ops.add("folios_freed_small", small)
        ops.add("folios_freed_large", freed - small)
    yield work


class _Chunk:
    """The entries of a chunk of PTE tables (each a run of consecutive entries), in address
    order: ``sel`` selects them in the flat store (a slice when they are whole tables in
    consecutive rows, as a fork or a fault of a big range allocates them; whole rows;
    else flat indices) and ``vals`` holds them (a view of the store for a slice)."""

    __slots__ = ("cnt", "first", "rows", "sel", "vals", "whole")

    def __init__(self, pt: PageTables, rows: I64, first: I64, cnt: I64, n: int) -> None:
        self.rows, self.first, self.cnt = rows, first, cnt
        # only the range's first table can start late and only its last can end early
        self.whole = int(first[0]) == 0 and int(cnt[0]) == n and int(cnt[-1]) == n
        if self.whole:
            span = as_span(rows)
            self.sel: Sel = Rows(rows, n) if span is None else slice(span.start * n, span.stop * n)
        else:
            self.sel = expand_runs(rows * n + first, cnt)[0]
        self.vals = sel_view(pt.flat, self.sel)

    def flat(self) -> I64:
        """The flat index of every entry."""
        return flat_index(self.sel)

    def table_starts(self) -> I64:
        """The position of each table's first entry."""
        if self.whole:
            n = len(self.vals) // len(self.rows)
            return np.arange(0, len(self.vals), n, dtype=np.int64)
        return np.cumsum(self.cnt) - self.cnt

    def addr(self, lo: I64, j: int) -> int:
        """The virtual address of the entry at position ``j`` (``lo``: each table's first)."""
        t = int(np.searchsorted(np.cumsum(self.cnt), j, side="right"))
        return int(lo[t]) + ((j - int(self.cnt[:t].sum())) << 12)


def _normal_pages(a: Arch, vals: NDArray[np.uint64]) -> slice | I64 | None:
    """The pages the entries map, when every entry maps a normal page (None otherwise): as
    a slice when they are one run (:meth:`~mmuemu.arch.base.Arch.normal_pfn_run`; the
    entries then differ in nothing else), else as an array of PFNs."""
    p0 = a.normal_pfn_run(vals)
    if p0 is not None:
        return slice(p0, p0 + len(vals))
    if not len(vals) or not bool((a.pte_present(vals) & ~a.pte_special(vals)).all()):
        return None
    return a.pte_pfn(vals)


def _zap_normal(k: Kernel, mm: Mm, chunk: _Chunk, pages: slice | I64, mode: str, full: bool, ops: Ops,
                drops: Drops) -> Work:
    """Mirrors: zap_present_ptes / zap_present_folio_ptes / folio_pte_batch over a chunk
    whose every entry maps a normal page (``pages``, see :func:`_normal_pages`).

    Nothing needs filtering: per-entry state is read and written through the pages (a
    slice of the page arrays when they are one run), a batch is a folio's pages within one
    table whose PFNs and batch bits continue (which one run of identical entries always
    does), and counts are given for every item at once where they are alike.  The same
    results as :func:`_zap_ptes`.
    """
    a, ph = k.arch, k.phys
    m = len(chunk.vals)
    order = ph.order[pages]  # (order and flags are kept on every page of a folio)
    tstart = chunk.table_starts()
    batched = mode == "batched" and bool(order.any())
    if batched:
        head = ph.head[pages]
        large = order > 0
        cont = np.empty(m, bool)
        cont[0] = False
        np.equal(head[1:], head[:-1], out=cont[1:])
        cont[1:] &= large[1:]
        cont[1:] &= large[:-1]
        if not isinstance(pages, slice):  # zap_present_ptes batches with FPB_IGNORE_DIRTY | FPB_IGNORE_SOFT_DIRTY
            cont[1:] &= pages[1:] == pages[:-1] + 1
            bits = a.pte_batch_bits(chunk.vals, ignore_dirty=True, ignore_soft_dirty=True)
            cont[1:] &= bits[1:] == bits[:-1]
        cont[tstart] = False  # a batch never crosses a table
        starts = np.flatnonzero(~cont)
        nr: I64 = np.diff(starts, append=m)
        n_items = len(starts)
        sec = np.searchsorted(starts, tstart)  # every table's first entry starts an item
        h = head[starts].astype(np.int64)
        lg = large[starts]
        fl = ph.flags[h]
    else:  # every entry is an item of its own
        n_items = m
        nr = np.broadcast_to(np.int64(1), (m,))
        sec = tstart
        fl = ph.flags[pages]
    ops2 = Ops(n_items)
    ops2.merge(ops)
    # clear the entries (batches through the arch's clear helpers; kernel v6.9 uses
    # clear_full_ptes for anon folios, whose dirty and young bits it does not need, and
    # get_and_clear_full_ptes for the others: their effects and counts are the same)
    anon = (fl & F_ANON) != 0
    n_anon = int(np.count_nonzero(anon))
    clear = a.clear_full_ptes if n_anon == n_items else a.get_and_clear_full_ptes
    flat = k.pt.flat
    if batched:
        clear(mm, flat, flat_index(chunk.sel, starts), nr, full, ops2, ALL, expanded=chunk.sel)
    else:  # runs of one entry: the selection itself
        clear(mm, flat, chunk.sel, nr, full, ops2, ALL, expanded=chunk.sel)
    ops2.add("pte_reads", 1, ALL)
    if batched:
        bi: Any = ALL if bool(lg.all()) else np.flatnonzero(lg)
        ops2.add("pte_reads", nr if bi is ALL else nr[bi], bi)  # folio_pte_batch's reads
        ops2.add("zap_batches", 1, bi)
    ops2.add("zap_items", 1, ALL)
    # rmap: per-page mapcount atomics, large mapcount once per batch
    if isinstance(pages, slice):
        ph.mapcount[pages] -= 1
    else:
        ph.scatter_add(ph.mapcount, pages, -1)  # a file page may be mapped twice here
    ops2.add("mapcount_ops", nr, ALL)
    if batched:
        ph.scatter_add(ph.large_mapcount, h[lg], -nr[lg])
        drops.append((h, nr))
    elif order.any():  # legacy: a large folio's mapcount drops page by page
        h = ph.head[pages].astype(np.int64)
        ph.scatter_add(ph.large_mapcount, h[order > 0], -1)
        drops.append((h, 1))
    else:  # order-0 pages: each is its own folio's head
        drops.append((pages, 1))
    # rss
    _sub_rss(mm, fl, anon, n_anon, nr if batched else None)
    # references are dropped after the TLB flush (mmu_gather), one per gathered batch
    ops2.add("gather_entries", 1, ALL)
    ops2.add("folio_ref_ops", 1, ALL)
    ops2.add("ptl_locks", 1, sec)
    # zap_pmd_range calls cond_resched() after each table (its cost is in the per-table costs)
    return Work("zap_pte_range", ops2, sections=sec, locks=("ptl",), lock_ids=chunk.rows, cond_resched=True)


def _sub_rss(mm: Mm, fl: NDArray[np.uint8], anon: NDArray[np.bool_], n_anon: int, nr: I64 | None) -> None:
    """Mirrors: zap_present_folio_ptes' rss[mm_counter(folio)] -= nr, for items with folio
    flags ``fl`` and ``nr`` entries each (None: one each)."""
    if nr is None:
        mm.rss[MM_ANONPAGES] -= n_anon
    else:
        mm.rss[MM_ANONPAGES] -= int(nr[anon].sum())
    if n_anon == len(fl):
        return
    shm = ~anon & ((fl & F_SWAPBACKED) != 0)
    file = ~anon & ~shm
    if nr is None:
        mm.rss[MM_SHMEMPAGES] -= int(np.count_nonzero(shm))
        mm.rss[MM_FILEPAGES] -= int(np.count_nonzero(file))
    else:
        mm.rss[MM_SHMEMPAGES] -= int(nr[shm].sum())
        mm.rss[MM_FILEPAGES] -= int(nr[file].sum())


def _zap_ptes(k: Kernel, mm: Mm, idx: I64, vals: NDArray[np.uint64], mode: str, full: bool,
              ops: Ops, drops: Drops) -> Work:
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
    _sub_rss(mm, fl, anon, int(np.count_nonzero(anon)), nr[ni])
    # references are dropped after the TLB flush (mmu_gather), one per gathered batch
    drops.append((h, nr[ni]))
    ops2.add("gather_entries", 1, ni)
    ops2.add("folio_ref_ops", 1, ni)
    sec = np.flatnonzero(np.append(True, tab[starts][1:] != tab[starts][:-1]))
    ops2.add("ptl_locks", 1, sec)
    return Work("zap_pte_range", ops2, sections=sec, locks=("ptl",), lock_ids=tab[starts][sec], cond_resched=True)


def _put_folios(ph: PhysMem, drops: Drops) -> NDArray[np.int8]:
    """Mirrors: mm/mmu_gather.c tlb_batch_pages_flush (free_pages_and_swap_cache,
    folios_put_refs): drop every gathered reference, then free the folios that reached
    zero, all at once.  Returns the orders of the folios freed."""
    runs = [sl for sl, _ in drops if isinstance(sl, slice)]
    heads = [h for h, _ in drops if not isinstance(h, slice)]
    nrs = [c if isinstance(c, np.ndarray) else np.full(len(h), c, np.int64)
           for h, c in drops if not isinstance(h, slice)]
    if not runs:
        if len(heads) == 1:
            return ph.ref_sub_and_free(heads[0], nrs[0])
        return ph.ref_sub_and_free(np.concatenate(heads), np.concatenate(nrs))
    for sl in runs:  # order-0 pages, one reference each: a slice, no scatter
        ph.refcount[sl] -= 1
    hs = np.concatenate(heads) if heads else None
    if hs is not None:
        ph.scatter_add(ph.refcount, hs, -np.concatenate(nrs))
    # (only once every reference is dropped: a folio may be gathered more than once)
    dead = [sl.start + np.flatnonzero(ph.refcount[sl] == 0) for sl in runs]
    if hs is not None:
        dead.append(hs[ph.refcount[hs] == 0])
    return ph.free_dead(np.concatenate(dead) if len(dead) > 1 else dead[0])
