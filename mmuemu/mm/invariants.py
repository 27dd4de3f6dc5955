"""Machine.check(): every invariant the kernel's accounting keeps, verified from scratch.

Mapcounts, refcounts and RSS counters are recomputed from the page tables, the page cache
and the live GUP handles and compared with what the paths maintained; page-table pages must
form trees with no leaks; no entry may map a free page; a writable entry of a private
mapping must map an exclusive anon page (so parent and child never share one).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from mmuemu.errors import InvariantError
from mmuemu.mm.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, RSS_NAMES, Kernel, Mm
from mmuemu.mm.physmem import F_ALLOC, F_ANON, F_PGTABLE, F_RESERVED, F_SWAPBACKED, MAX_ORDER
from mmuemu.mm.vma import File, VmFlag

__all__ = ["check"]

I64 = NDArray[np.int64]


def check(k: Kernel) -> None:
    """Raise InvariantError naming the first broken invariant."""
    a, ph, pt = k.arch, k.phys, k.pt
    n = a.ptrs_per_table
    npg = ph.nr_pages
    pte_map = np.zeros(npg, np.int64)
    pmd_map = np.zeros(npg, np.int64)
    table_refs = np.zeros(len(pt.row_pfn), np.int64)
    for mm in k.mms.values():
        try:
            levels, base, leaf_flat, leaf_va = k.pt.walk(mm.pgd_row)
        except ValueError as e:
            raise InvariantError(f"mm {mm.id}: {e}") from None
        for lv, rows in enumerate(levels):
            np.add.at(table_refs, rows, 1)
            bad = pt.row_level[rows] != lv
            if bad.any():
                raise InvariantError(f"mm {mm.id}: table row {int(rows[bad][0])} is used at level {lv} "
                                     f"but was allocated for level {int(pt.row_level[rows[bad][0]])}")
        for f, r in mm.deposit.items():
            table_refs[r] += 1
            if not a.pmd_leaf(pt.flat[np.array([f])])[0]:
                raise InvariantError(f"mm {mm.id}: a deposited table hangs off PMD entry {f}, which is not a leaf")
        ptes = levels[-1]
        vals = pt.entries[ptes].reshape(-1)
        if a.cont_ptes > 1:
            _check_cont_blocks(k, mm, vals)
        va = (base[:, None] + (np.arange(n, dtype=np.int64) << 12)[None, :]).reshape(-1)
        live = vals != 0
        vals, va = vals[live], va[live]
        present = a.pte_present(vals)
        if (~present).any():
            raise InvariantError(f"mm {mm.id}: non-present, non-none entry at {int(va[~present][0]):#x} "
                                 f"(mmuemu has no swap entries yet)")
        normal = ~a.pte_special(vals)
        pfn = a.pte_pfn(vals)
        _check_mapped_pages(k, mm, pfn[normal], va[normal])
        pte_map += np.bincount(pfn[normal], minlength=npg)
        leaf = pt.flat[leaf_flat]
        lpte = a.pmd_to_pte(leaf)
        lpfn = a.pte_pfn(lpte)
        _check_mapped_pages(k, mm, lpfn, leaf_va)
        if (ph.order[lpfn] != a.pmd_order).any() or (ph.head[lpfn] != lpfn).any():
            raise InvariantError(f"mm {mm.id}: a PMD leaf maps something other than a whole PMD-order folio")
        pmd_map += np.bincount(lpfn, minlength=npg)
        _check_vmas_and_rss(k, mm, vals[normal], pfn[normal], va[normal], lpte, lpfn, leaf_va)
    # every table page in use is referenced exactly once
    used = np.flatnonzero(pt.row_level >= 0)
    wrong = used[table_refs[used] != 1]
    if len(wrong):
        r = int(wrong[0])
        raise InvariantError(f"page-table row {r} (pfn {int(pt.row_pfn[r])}) is referenced "
                             f"{int(table_refs[r])} times (leaked or shared)")
    # free tables are empty (alloc hands them out without clearing them)
    free = np.flatnonzero(pt.row_level[: pt.rows_touched] < 0)
    dirty = free[pt.entries[free].any(axis=1)] if len(free) else free
    if len(dirty):
        raise InvariantError(f"page-table row {int(dirty[0])} is free but holds entries")
    _check_counts(k, pte_map, pmd_map)
    _check_buddy(k)


def _check_mapped_pages(k: Kernel, mm: Mm, pfn: I64, va: I64) -> None:
    ph = k.phys
    head = ph.head[pfn].astype(np.int64)
    ok = ((ph.flags[head] & F_ALLOC) != 0) & (pfn >= head) & (pfn < head + (1 << ph.order[head].astype(np.int64)))
    ok &= (ph.flags[head] & (F_PGTABLE | F_RESERVED)) == 0
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise InvariantError(f"mm {mm.id}: {int(va[i]):#x} maps pfn {int(pfn[i])}, which is free or not a data page")


def _check_vmas_and_rss(k: Kernel, mm: Mm, vals: NDArray[np.uint64], pfn: I64, va: I64,
                        lpte: NDArray[np.uint64], lpfn: I64, lva: I64) -> None:
    a, ph = k.arch, k.phys
    starts = np.array([v.start for v in mm.vmas], np.int64)
    ends = np.array([v.end for v in mm.vmas], np.int64)
    shared = np.array([bool(v.flags & VmFlag.SHARED) for v in mm.vmas], bool)
    writable_vma = np.array([bool(v.flags & VmFlag.WRITE) for v in mm.vmas], bool)
    rss = np.zeros(4, np.int64)
    for vv, pp, aa, mult in ((vals, pfn, va, 1), (lpte, lpfn, lva, a.ptrs_per_table)):
        if not len(vv):
            continue
        i = np.searchsorted(starts, aa, side="right") - 1
        span = (mult << 12) - 1  # a PMD leaf must lie inside one VMA
        inside = (i >= 0) & (aa + span < ends[np.maximum(i, 0)])
        if not inside.all():
            bad = int(aa[~inside][0])
            raise InvariantError(f"mm {mm.id}: an entry maps {bad:#x}, which is outside every VMA "
                                 f"(or a PMD leaf there spans two VMAs)")
        w = a.pte_write(vv)
        if (w & ~writable_vma[i]).any():
            bad = int(aa[w & ~writable_vma[i]][0])
            raise InvariantError(f"mm {mm.id}: writable entry at {bad:#x} in a VMA without VM_WRITE")
        head = ph.head[pp].astype(np.int64)
        anon = (ph.flags[head] & F_ANON) != 0
        excl = ph.anon_exclusive[pp] if mult == 1 else ph.anon_exclusive[head]
        bad = w & ~shared[i] & ~(anon & excl)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise InvariantError(f"mm {mm.id}: writable private entry at {int(aa[j]):#x} maps pfn "
                                 f"{int(pp[j])}, which is not an exclusive anon page (COW would leak)")
        shm = ~anon & ((ph.flags[head] & F_SWAPBACKED) != 0)
        rss[MM_ANONPAGES] += mult * int(anon.sum())
        rss[MM_SHMEMPAGES] += mult * int(shm.sum())
        rss[MM_FILEPAGES] += mult * int((~anon & ~shm).sum())
    for idx in (MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES):
        if rss[idx] != mm.rss[idx]:
            raise InvariantError(f"mm {mm.id}: rss {RSS_NAMES[idx]} is {int(mm.rss[idx])} but the tables "
                                 f"map {int(rss[idx])} such pages")


def _check_cont_blocks(k: Kernel, mm: Mm, vals: NDArray[np.uint64]) -> None:
    """Every block of ``cont_ptes`` entries holding a CONT entry is a whole contiguous
    mapping: all its entries valid and CONT, its PFNs consecutive from an aligned one, one
    folio, equal attributes (young and dirty aside).  ``vals`` are whole tables in order."""
    a, ph = k.arch, k.phys
    c = a.cont_ptes
    cont = a.pte_cont(vals)
    if not cont.any():
        return
    blk = vals.reshape(-1, c)
    has = cont.reshape(-1, c).any(axis=1)
    b = blk[has]
    bad = ~(a.pte_cont(b) & a.pte_present(b) & ~a.pte_special(b)).all(axis=1)
    pfn = a.pte_pfn(b)
    bad |= (pfn[:, 0] % c != 0) | (pfn != pfn[:, :1] + np.arange(c)).any(axis=1)
    head = ph.head[np.where(bad[:, None], 0, pfn)]
    bad |= (head != head[:, :1]).any(axis=1)
    attrs = a.pte_same_bits(a.pte_mkclean(a.pte_mkold(b)))
    bad |= (attrs != attrs[:, :1]).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(has)[np.flatnonzero(bad)[0]])
        raise InvariantError(f"mm {mm.id}: contiguous block {i} of its page tables is not {c} aligned "
                             f"entries of one folio with equal attributes: "
                             f"{[hex(int(v)) for v in blk[i]]}")


def _check_counts(k: Kernel, pte_map: I64, pmd_map: I64) -> None:
    ph = k.phys
    data = (ph.flags & (F_PGTABLE | F_RESERVED)) == 0
    heads_mask = ((ph.flags & F_ALLOC) != 0) & data
    bad = np.flatnonzero((ph.mapcount != pte_map) & data)
    if len(bad):
        p = int(bad[0])
        raise InvariantError(f"pfn {p}: mapcount {int(ph.mapcount[p])} but {int(pte_map[p])} PTEs map it")
    heads = np.flatnonzero(heads_mask)
    order = ph.order[heads].astype(np.int64)
    # per-folio sums of page mapcounts
    cs = np.concatenate([[0], np.cumsum(pte_map)])
    folio_pte = cs[heads + (1 << order)] - cs[heads]
    large = order > 0  # the large-folio counts live in tail pages: read only there
    entire = np.where(large, ph.entire_mapcount[heads], 0)
    if (entire != pmd_map[heads]).any():
        h = int(heads[entire != pmd_map[heads]][0])
        raise InvariantError(f"folio {h}: entire mapcount {int(entire[heads == h][0])} but "
                             f"{int(pmd_map[h])} PMDs map it")
    exp_large = folio_pte + pmd_map[heads]
    if (ph.large_mapcount[heads[large]] != exp_large[large]).any():
        h = int(heads[large][ph.large_mapcount[heads[large]] != exp_large[large]][0])
        raise InvariantError(f"folio {h}: large mapcount {int(ph.large_mapcount[h])} but it is mapped "
                             f"{int(exp_large[heads[large] == h][0])} times")
    expect = folio_pte + pmd_map[heads]
    pins = np.zeros(ph.nr_pages, np.int64)
    extra = np.zeros(ph.nr_pages, np.int64)
    for handle in k.gup_handles.values():
        hh, ref, pin = handle.refs()  # type: ignore[attr-defined]
        np.add.at(extra, hh, ref)
        np.add.at(pins, hh, pin)
    for mm_file in _files(k):
        cached = mm_file.pagecache[mm_file.pagecache != 0]
        np.add.at(extra, ph.head[cached].astype(np.int64), 1)
    expect = expect + extra[heads]
    wrong = ph.refcount[heads] != expect
    if wrong.any():
        h = int(heads[wrong][0])
        raise InvariantError(f"folio {h} (order {int(ph.order[h])}): refcount {int(ph.refcount[h])} but "
                             f"mappings, page cache and GUP hold {int(expect[wrong][0])}")
    pinc = np.where(large, ph.pincount[heads], 0)
    if (pinc != pins[heads]).any():
        h = int(heads[pinc != pins[heads]][0])
        raise InvariantError(f"folio {h}: pincount {int(pinc[heads == h][0])} but pins hold {int(pins[h])}")
    excl = np.flatnonzero(ph.anon_exclusive & (pte_map > 1))
    if len(excl):
        raise InvariantError(f"pfn {int(excl[0])} is AnonExclusive but mapped {int(pte_map[excl[0]])} times")
    # pages nobody holds must have been freed
    orphan = heads[(expect == 0) & (ph.refcount[heads] != 0)]
    if len(orphan):
        raise InvariantError(f"folio {int(orphan[0])} is allocated but nothing references it")


def _files(k: Kernel) -> list[File]:
    seen: dict[int, File] = {}
    for mm in k.mms.values():
        for v in mm.vmas:
            if v.file is not None:
                seen[id(v.file)] = v.file
    for f in k.files:
        seen[id(f)] = f
    return list(seen.values())


def _check_buddy(k: Kernel) -> None:
    ph = k.phys
    total = 0
    for order in range(MAX_ORDER + 1):
        blocks = np.fromiter(ph.free_lists[order], np.int64, len(ph.free_lists[order])) << order
        total += len(blocks) << order
        marked = (ph.free_order[blocks] == order + 1) if order < MAX_ORDER else True
        if len(blocks) and (not np.all(marked) or (blocks & ((1 << order) - 1)).any()):
            raise InvariantError(f"buddy: a free block of order {order} is misaligned or mismarked")
        if len(blocks):
            pages = (blocks[:, None] + np.arange(1 << order)[None, :]).ravel()
            if (ph.head[pages] != 0).any() or (ph.flags[pages] & F_ALLOC).any():
                raise InvariantError(f"buddy: a free block of order {order} overlaps an allocated folio")
            if (ph.token[pages] != 0).any():
                raise InvariantError(f"buddy: a free block of order {order} holds page contents")
        if order == MAX_ORDER and not np.array_equal(ph.max_free.nonzero()[0], np.sort(blocks >> order)):
            raise InvariantError(f"buddy: the bitmap of free order-{order} blocks differs from their list")
        cached = ph.highest_cached(order)
        if cached is not None and (not len(blocks) or cached != int(blocks.max()) >> order):
            raise InvariantError(f"buddy: the cached highest free block of order {order} is stale")
    if total != ph.nr_free:
        raise InvariantError(f"buddy: free lists hold {total} pages but nr_free says {ph.nr_free}")
