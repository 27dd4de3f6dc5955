"""Page faults over a range: what touching every page of [start, end) does, vectorised.

Mirrors: mm/memory.c handle_mm_fault for each page in address order (do_anonymous_page with
alloc_anon_folio's order fallback, do_huge_pmd_anonymous_page, do_read_fault/do_cow_fault/
do_shared_fault for files, do_wp_page with reuse or wp_page_copy, FAULT_FLAG_UNSHARE), plus
the hardware setting Accessed/Dirty on entries that do not fault.

Pages are handled as the sequential loop would, but a whole range at a time: a block of
order k is allocated iff it lies in the VMA, all its PTEs are none once the larger orders
are placed, and it holds a page of the range (the first touch of a page in it would
allocate it, and nothing else can change it first).

Every allocation happens before any entry is written, so OutOfMemory leaves the machine as
it was.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mmuemu.errors import OutOfMemory, SegmentationFault
from mmuemu.mm.filemap import map_file, pagecache
from mmuemu.mm.huge_memory import split_huge_pmds
from mmuemu.mm.mm import MM_ANONPAGES, Kernel, Mm
from mmuemu.mm.physmem import F_ANON, F_SWAPBACKED, ZERO_PFN
from mmuemu.mm.undo import Undo, alloc_folios
from mmuemu.mm.vma import Vma, VmFlag
from mmuemu.mm.work import Ops, Work
from mmuemu.mm.wp import anon_vma_prepare, wp_copy, wp_reuse
from mmuemu.runs import expand_runs

__all__ = ["check_access", "fault_range", "populate_tables"]

I64 = NDArray[np.int64]
PAGE = 4096


def check_access(mm: Mm, start: int, end: int, write: bool) -> list[Vma]:
    """The VMAs covering [start, end), or SegmentationFault for the first page no VMA allows.

    Mirrors: lock_mm_and_find_vma + access_error.
    """
    vmas = mm.vmas.overlapping(start, end)
    addr = start
    for v in vmas:
        if v.start > addr:
            break
        need = VmFlag.WRITE if write else VmFlag.READ
        if not v.flags & need:
            kind = "write to" if write else "read from"
            raise SegmentationFault(
                f"{kind} {addr:#x}: the mapping [{v.start:#x}, {v.end:#x}) does not allow it "
                f"(prot {_prot_str(v.flags)})"
            )
        addr = v.end
        if addr >= end:
            return vmas
    raise SegmentationFault(f"access at {addr:#x}: no mapping there (SIGSEGV)")


def _prot_str(flags: int) -> str:
    s = "".join(c for c, f in (("r", VmFlag.READ), ("w", VmFlag.WRITE), ("x", VmFlag.EXEC)) if flags & f)
    return s or "none"


def populate_tables(k: Kernel, mm: Mm, start: int, end: int, undo: Any = None) -> tuple[I64, I64]:
    """PMD slots over [start, end), with upper tables allocated: (va, pmd flat index)."""
    new: list[tuple[int, int]] = []
    try:
        slots = k.pt.pmd_slots(mm.pgd_row, start, end, alloc=True, new_rows=new)
    finally:
        if undo is not None:
            undo.tables.extend(new)
    return slots.va, slots.flat


def fault_range(k: Kernel, mm: Mm, start: int, end: int, *, write: bool,
                unshare: str | None = None, touch: bool = True) -> Generator[Work, Any, None]:
    """Fault in every page of [start, end) for reading or writing, as a CPU touching each
    page in order would (``touch``: also set the hardware Accessed/Dirty bits of entries that
    need no fault; GUP does not).  ``unshare`` is the FAULT_FLAG_UNSHARE of a R/O pin:
    ``"pin"`` unshares anon pages not known to be exclusive, ``"longterm"`` (FOLL_LONGTERM)
    also replaces the zero page and page-cache pages of private mappings by anon copies
    (mm/gup.c gup_must_unshare)."""
    vmas = check_access(mm, start, end, write)
    if not _can_split(k, vmas, start, end):
        yield from _fault_part(k, mm, vmas, start, end, write, unshare, touch)
        return
    lo = start
    while lo < end:  # in address order, as the CPU touches them
        hi = min(end, (lo // FAULT_CHUNK + 1) * FAULT_CHUNK)
        part = [v for v in vmas if v.start < hi and v.end > lo]
        yield from _fault_part(k, mm, part, lo, hi, write, unshare, touch)
        lo = hi


#: address space planned at once by a large fault_range that cannot fail half-way (bounds
#: the temporaries: a 1 GiB populate holds about 3 MiB of them instead of 30)
FAULT_CHUNK = 64 << 20


def _can_split(k: Kernel, vmas: list[Vma], start: int, end: int) -> bool:
    """Whether [start, end) may be planned FAULT_CHUNK at a time: only when no part can
    fail (anonymous memory, enough free pages for a new page per page plus every table and
    deposit, no injected failure), so that a failure still leaves the machine as it was."""
    size = end - start
    if size <= FAULT_CHUNK or k.phys.fail_countdown is not None:
        return False
    if any(not v.is_anonymous for v in vmas):
        return False  # SIGBUS past a file's end must undo everything
    a = k.arch
    pmds = (size >> a.pmd_shift) + 2
    bound = (size >> a.page_shift) + 2 * pmds + 2 * ((size >> a.level_shift(1)) + 2) + 8
    return k.phys.nr_free >= bound


def _fault_part(k: Kernel, mm: Mm, vmas: list[Vma], start: int, end: int, write: bool,
                unshare: str | None, touch: bool) -> Generator[Work, Any, None]:
    """fault_range over one part: plan every VMA (allocating), then apply."""
    ops = Ops()
    undo = Undo(k)
    plans = []
    try:
        for v in vmas:
            plans.append(_plan_vma(k, mm, v, max(start, v.start), min(end, v.end), write, unshare,
                                   touch, ops, undo))
    except BaseException:  # OutOfMemory, or SIGBUS past the end of a file
        undo.rollback()
        raise
    for plan in plans:
        plan()
    yield Work("handle_mm_fault", ops)


def _accessed(a: Any, pte: NDArray[np.uint64], write: bool) -> NDArray[np.uint64]:
    """The entry handle_pte_fault makes of a present one it may use: young, and dirty for a
    write (the caller has made sure the entry is writable then)."""
    out = a.pte_mkyoung(pte)
    return a.pte_mkdirty(out) if write else out  # type: ignore[no-any-return]


def _access_faults(k: Kernel, mm: Mm, flat_idx: I64, cur: NDArray[np.uint64], write: bool,
                   ops: Ops) -> None:
    """Without hardware access-flag and dirty management, using an old entry (or writing
    a clean writable one) takes a fault that software fixes up.

    Mirrors: mm/memory.c handle_pte_fault's tail (pte_mkdirty on a write to a writable
    entry, pte_mkyoung, ptep_set_access_flags)."""
    want = _accessed(k.arch, cur, write)
    f = np.flatnonzero(want != cur)
    if len(f):
        k.arch.ptep_set_access_flags(mm, k.pt.flat, flat_idx[f], want[f], ops, dirty=write)
        ops.add("page_faults", len(f))


def _pte_index(k: Kernel, rows: I64, va: I64, start: int, end: int) -> tuple[I64, I64]:
    """Flat indices and addresses of the PTEs for the pages of [start, end) in these tables."""
    a = k.arch
    n = a.ptrs_per_table
    size = PAGE * n
    lo = np.maximum(va, start)
    hi = np.minimum(va + size, end)
    first = (lo - va) >> 12
    cnt = (hi - lo) >> 12
    idx, off = expand_runs(rows * n + first, cnt)
    addrs = np.repeat(lo, cnt) + (off << 12)
    return idx, addrs


def _plan_vma(k: Kernel, mm: Mm, vma: Vma, s: int, e: int, write: bool, unshare: str | None,
              touch: bool,
              ops: Ops, undo: Undo) -> Any:
    """Allocate what faulting [s, e) of ``vma`` needs; return the step that maps it."""
    a, ph, pt = k.arch, k.phys, k.pt
    n = a.ptrs_per_table
    pmd_size = PAGE * n
    anon_private = vma.is_anonymous and not vma.flags & VmFlag.SHARED
    prot = vma.page_prot(a)
    orders = _orders(mm, vma)
    va, pmd_flat = populate_tables(k, mm, s, e, undo)
    pmd = pt.flat[pmd_flat]
    leaf = a.pmd_leaf(pmd)

    # ---- PMD level: THP allocation on none PMDs, wp on leaves
    thp_heads = np.zeros(0, np.int64)
    thp_slots = np.zeros(0, np.int64)
    if write and anon_private and a.pmd_order in orders:
        cand = (pmd == 0) & (va >= vma.start) & (va + pmd_size <= vma.end)
        thp_slots = np.flatnonzero(cand)
        if len(thp_slots):
            thp_heads = _alloc_some(ph, a.pmd_order, len(thp_slots), undo)
            thp_slots = thp_slots[: len(thp_heads)]
            deposit = pt.alloc(len(thp_heads), 3)
            undo.rows.append(deposit)
    leaf_split = np.zeros(0, np.int64)
    leaf_wp_reuse = np.zeros(0, np.int64)
    if (write or unshare) and leaf.any():
        lv = a.pmd_to_pte(pmd[leaf])
        heads = a.pte_pfn(lv)
        is_anon = (ph.flags[heads] & F_ANON) != 0
        needs = ~a.pte_write(lv) if write else is_anon & ~ph.anon_exclusive[heads]
        reuse = (ph.anon_exclusive[heads] | (ph.refcount[heads] == 1)) & is_anon
        li = np.flatnonzero(leaf)
        leaf_wp_reuse = li[needs & reuse]
        leaf_split = li[needs & ~reuse]

    # ---- PTE level: tables for every non-leaf slot that is not getting a THP
    pte_slot = ~leaf
    if len(thp_slots):
        pte_slot[thp_slots] = False
    pte_slot[leaf_split] = True
    need_table = pte_slot & (pmd == 0)
    table_rows = np.full(len(va), -1, dtype=np.int64)
    new = np.zeros(0, np.int64)
    if need_table.any():
        # a PMD slot shared with a VMA planned earlier in this fault gets that plan's table
        nt = np.flatnonzero(need_table)
        known = np.array([undo.pending.get(int(f), -1) for f in pmd_flat[nt]], dtype=np.int64)
        table_rows[nt] = known
        fresh = nt[known < 0]
        if len(fresh):
            new = pt.alloc(len(fresh), 3)
            undo.rows.append(new)  # linked into the PMDs only in the apply step
            table_rows[fresh] = new
            undo.pending.update(zip(pmd_flat[fresh].tolist(), new.tolist(), strict=True))
        need_table = np.zeros(len(va), bool)
        need_table[fresh] = True
    exist = pte_slot & (pmd != 0) & ~leaf
    table_rows[exist] = pt.rows_of(pmd[exist])
    split_rows = np.array([mm.deposit.get(int(f), -1) for f in pmd_flat[leaf_split]], dtype=np.int64)
    table_rows[leaf_split] = split_rows

    sl = np.flatnonzero(pte_slot)
    idx, addrs = _pte_index(k, table_rows[sl], va[sl], s, e)
    # values as they will be once leaves are split (split tables are filled in apply)
    vals = pt.flat[idx]
    if len(leaf_split):
        o = np.argsort(split_rows)
        srow, sval = split_rows[o], a.pmd_to_pte(pmd[leaf_split])[o]
        r = idx // n
        pos = np.minimum(np.searchsorted(srow, r), len(srow) - 1)
        sp = srow[pos] == r
        vals[sp] = a.pte_advance_pfn(sval[pos[sp]], idx[sp] % n)
    none = vals == 0
    present = a.pte_present(vals)
    pfn = a.pte_pfn(vals)

    # ---- decide per page
    if vma.is_anonymous and not vma.flags & VmFlag.SHARED:
        if write:
            alloc_pages = none
        else:
            alloc_pages = np.zeros(len(vals), bool)
        zero_pages = none & (not write)
        file_pages = np.zeros(len(vals), bool)
        cow_new = np.zeros(len(vals), bool)
    else:
        alloc_pages = np.zeros(len(vals), bool)
        zero_pages = np.zeros(len(vals), bool)
        shared = bool(vma.flags & VmFlag.SHARED)
        cow_new = none & write & (not shared)
        file_pages = none & ~cow_new

    normal = present & ~a.pte_special(vals)
    heads = np.where(normal, ph.head[np.where(normal, pfn, 0)], 0)
    is_anon = normal & ((ph.flags[heads] & F_ANON) != 0)
    wp = np.zeros(len(vals), bool)
    if (write or unshare) and present.any():
        if write:
            wp = present & ~a.pte_write(vals)
        else:  # unshare: anon pages not known exclusive (and more for FOLL_LONGTERM)
            wp = is_anon & ~ph.anon_exclusive[np.where(normal, pfn, 0)]
            if unshare == "longterm" and vma.is_cow:  # the zero page, private file pages
                zero = a.pte_special(vals) & (pfn == ZERO_PFN)
                wp |= present & ~is_anon & (normal | zero)
    if vma.flags & VmFlag.SHARED:
        reuse = wp  # wp_page_shared: the page itself becomes writable
    else:
        small = ph.order[heads] == 0
        reuse = wp & is_anon & (ph.anon_exclusive[pfn] | (small & (ph.refcount[heads] == 1)))
    copy = wp & ~reuse

    # ---- allocate: anon folios by order, zero-fill/copy targets, page cache pages
    new_folios: list[tuple[int, I64, I64]] = []  # (order, heads, flat index of first pte)
    if alloc_pages.any():
        new_folios = _alloc_anon(k, vma, orders, table_rows, sl, va, idx, alloc_pages, undo)
    copy_new = np.zeros(0, np.int64)
    cow_targets = copy | cow_new
    if cow_targets.any():
        copy_new = alloc_folios(ph, 0, int(cow_targets.sum()), F_ANON | F_SWAPBACKED, undo)
    cache = np.zeros(0, np.int64)
    if (file_pages | cow_new).any():
        cache = pagecache(k, vma, addrs[file_pages | cow_new], undo)

    def apply() -> None:
        flat = pt.flat
        if len(new):
            flat[pmd_flat[need_table]] = a.mk_table(pt.row_pfn[new])
        split_huge_pmds(k, mm, pmd_flat[leaf_split], ops)
        flat = pt.flat
        if len(thp_heads):
            _map_thp(k, mm, vma, pmd_flat[thp_slots], thp_heads, deposit, prot, ops)
        if len(leaf_wp_reuse):
            lf = pmd_flat[leaf_wp_reuse]
            lv = a.pmd_to_pte(flat[lf])
            h = a.pte_pfn(lv)
            ph.anon_exclusive[h] = True
            if write:
                flat[lf] = a.pte_to_pmd(a.pte_mkyoung(a.pte_mkdirty(a.pte_mkwrite(lv))))
            ops.add("page_faults", len(lf))
            ops.add("cow_reuses", len(lf))
        cur = flat[idx]
        # the hardware sets Accessed (and Dirty) on entries it uses without a fault
        touched = present & ~wp if touch else np.zeros(len(cur), bool)
        if touched.any():
            ti = idx[touched]
            if a.hw_access_flags:
                flat[ti] = a.pte_hw_access(cur[touched], write)
            else:
                _access_faults(k, mm, ti, cur[touched], write, ops)
        if touch and leaf.any():
            lf = pmd_flat[leaf]
            lv = flat[lf]
            ok = a.pmd_leaf(lv) & (a.pte_write(a.pmd_to_pte(lv)) | (not write))
            if ok.any():
                lpte = a.pmd_to_pte(lv[ok])
                if a.hw_access_flags:
                    flat[lf[ok]] = a.pte_to_pmd(a.pte_hw_access(lpte, write))
                else:
                    want = _accessed(a, lpte, write)
                    f = want != lpte
                    flat[lf[ok][f]] = a.pte_to_pmd(want[f])  # huge_pmd_set_accessed
                    ops.add("page_faults", int(f.sum()))
                    ops.add("pmd_writes", int(f.sum()))
        if zero_pages.any():
            z = a.pte_mkspecial(a.pfn_pte(np.full(int(zero_pages.sum()), ZERO_PFN), prot))
            flat[idx[zero_pages]] = z
            ops.add("page_faults", len(z))
            ops.add("pte_writes", len(z))
        for order, fheads, first in new_folios:
            _map_new_anon(k, mm, vma, fheads, order, first, prot, ops)
        if reuse.any():
            wp_reuse(k, mm, vma, idx[reuse], cur[reuse], pfn[reuse], unshare is not None and not write, ops)
        if cow_targets.any():
            src = np.where(copy, pfn, 0)
            ci = np.flatnonzero(cow_targets)
            fidx = np.flatnonzero(file_pages | cow_new)
            if cow_new.any():
                cache_of = np.zeros(len(vals), np.int64)
                cache_of[fidx] = cache
                src[cow_new] = cache_of[cow_new]
            wp_copy(k, mm, vma, idx[ci], cur[ci], src[ci], copy[ci], copy_new, prot,
                     write, ops)
        if file_pages.any():
            cache_of = np.zeros(len(vals), np.int64)
            cache_of[np.flatnonzero(file_pages | cow_new)] = cache
            map_file(k, mm, vma, idx[file_pages], cache_of[file_pages], prot, write, ops)

    return apply


def _orders(mm: Mm, vma: Vma) -> tuple[int, ...]:
    if vma.flags & VmFlag.NOHUGEPAGE or not vma.is_anonymous:
        return (0,)
    return mm.folio_orders


def _alloc_some(ph: Any, order: int, n: int, undo: Undo) -> I64:
    """Up to ``n`` folios of a large ``order``; fewer (maybe none) when memory is short.

    Mirrors: alloc_anon_folio trying an order and falling back on failure.
    """
    try:
        return alloc_folios(ph, order, min(n, ph.available(order)), F_ANON | F_SWAPBACKED, undo)
    except OutOfMemory:
        return np.zeros(0, np.int64)


def _alloc_anon(k: Kernel, vma: Vma, orders: tuple[int, ...], table_rows: I64, sl: I64, va: I64,
                idx: I64, alloc_pages: NDArray[np.bool_], undo: Undo) -> list[tuple[int, I64, I64]]:
    """Place anon folios over the none PTEs the range touches (alloc_anon_folio's fallback).

    Returns (order, heads, flat index of the first PTE) per order used.
    """
    a, ph, pt = k.arch, k.phys, k.pt
    n = a.ptrs_per_table
    out: list[tuple[int, I64, I64]] = []
    small = [o for o in orders if o < a.pmd_order]
    if small == [0]:  # order-0 only: one folio per touched none entry
        first = idx[alloc_pages]
        return [(0, alloc_folios(ph, 0, len(first), F_ANON | F_SWAPBACKED, undo), first)]
    # the tables involved, whole, so blocks can look at PTEs outside the range
    rows = np.unique(idx[alloc_pages] // n)
    srows = table_rows[sl]
    o = np.argsort(srows)
    slot_va = va[sl][o][np.searchsorted(srows[o], rows)]
    tab = pt.entries[rows] == 0  # none, per table
    touched = np.zeros(tab.shape, bool)
    ti = np.searchsorted(rows, idx[alloc_pages] // n)
    touched[ti, idx[alloc_pages] % n] = True
    page_va = slot_va[:, None] + (np.arange(n, dtype=np.int64) << 12)[None, :]
    inside = (page_va >= vma.start) & (page_va < vma.end)
    free = tab & inside
    for order in sorted((o for o in orders if o < a.pmd_order), reverse=True):
        size = 1 << order
        blocks_free = free.reshape(len(rows), n // size, size).all(axis=2)
        blocks_touch = touched.reshape(len(rows), n // size, size).any(axis=2)
        cand = np.argwhere(blocks_free & blocks_touch)
        if not len(cand):
            continue
        if order:
            heads = _alloc_some(ph, order, len(cand), undo)
            cand = cand[: len(heads)]
            if not len(heads):
                continue
        else:
            heads = alloc_folios(ph, order, len(cand), F_ANON | F_SWAPBACKED, undo)
        first = rows[cand[:, 0]] * n + cand[:, 1] * size
        out.append((order, heads, first))
        view = free.reshape(len(rows), n // size, size)
        view[cand[:, 0], cand[:, 1], :] = False
        tv = touched.reshape(len(rows), n // size, size)
        tv[cand[:, 0], cand[:, 1], :] = False
    return out


def _map_new_anon(k: Kernel, mm: Mm, vma: Vma, heads: I64, order: int, first: I64, prot: int,
                  ops: Ops) -> None:
    """Mirrors: do_anonymous_page's tail: folio_add_new_anon_rmap (exclusive), set_ptes."""
    a, ph = k.arch, k.phys
    nr = 1 << order
    pages, _ = expand_runs(heads, np.full(len(heads), nr, dtype=np.int64))
    ph.mapcount[pages] = 1
    ph.anon_exclusive[pages] = True
    ph.refcount[heads] = nr
    if order:
        ph.large_mapcount[heads] = nr
    pte = a.pfn_pte(heads, prot)
    pte = a.pte_mkdirty(pte)
    if vma.flags & VmFlag.WRITE:
        pte = a.pte_mkwrite(pte)
    a.set_ptes(mm, k.pt.flat, first, pte, np.full(len(heads), nr, dtype=np.int64), ops)
    anon_vma_prepare(vma)
    mm.rss[MM_ANONPAGES] += len(pages)
    ops.add("page_faults", len(heads))
    ops.add("folio_allocs", len(heads))
    ops.add("page_zeroes", len(pages))


def _map_thp(k: Kernel, mm: Mm, vma: Vma, pmd_flat: I64, heads: I64, deposit: I64, prot: int,
             ops: Ops) -> None:
    """Mirrors: __do_huge_pmd_anonymous_page: map a new THP with one PMD leaf."""
    a, ph = k.arch, k.phys
    ph.entire_mapcount[heads] = 1
    ph.large_mapcount[heads] = 1
    ph.anon_exclusive[heads] = True
    pte = a.pte_mkdirty(a.pfn_pte(heads, prot))
    if vma.flags & VmFlag.WRITE:
        pte = a.pte_mkwrite(pte)
    k.pt.flat[pmd_flat] = a.pte_to_pmd(pte)
    for f, r in zip(pmd_flat.tolist(), deposit.tolist(), strict=True):
        mm.deposit[f] = r
    anon_vma_prepare(vma)
    mm.rss[MM_ANONPAGES] += len(heads) * a.ptrs_per_table
    ops.add("page_faults", len(heads))
    ops.add("folio_allocs", len(heads))
    ops.add("page_zeroes", len(heads) * a.ptrs_per_table)


