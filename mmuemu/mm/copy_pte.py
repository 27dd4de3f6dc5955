"""The PTE-level copy of fork: copy_pte_range and copy_present_ptes over whole ranges.

Mirrors: mm/memory.c copy_pte_range, copy_present_ptes, __copy_present_ptes,
copy_present_page and mm/internal.h folio_pte_batch, planned for every entry of a range of
page tables at once (which entries form batches, which go alone because a maybe-pinned
batch would fail) and then committed: rmap and refcounts, the architecture's
``wrprotect_ptes`` on the parent and ``set_ptes`` on the child, and the lock sections with
their resched checkpoints as a :class:`~mmuemu.mm.work.Work`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from attrs import define
from numpy.typing import NDArray

from mmuemu.mm.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, Kernel, Mm
from mmuemu.mm.physmem import F_ANON, F_SWAPBACKED
from mmuemu.mm.progress import LazyCheckpoints, checkpoint_count, checkpoints
from mmuemu.mm.vma import Vma, VmFlag
from mmuemu.mm.work import ALL, Ops, Work
from mmuemu.runs import Rows, as_span, expand_runs, flat_index

__all__ = ["PtePlan", "plan_ptes"]

I64 = NDArray[np.int64]
B = NDArray[np.bool_]


@define(eq=False)
class PtePlan:
    n_copy: int
    commit: Any


def plan_ptes(k: Kernel, parent: Mm, src: Vma, dst: Vma, mode: str, vals: NDArray[np.uint64],
               new_table: B, ae_virtual: B | None) -> PtePlan:
    """Mirrors: copy_pte_range / copy_present_ptes / folio_pte_batch over every entry of the
    VMA at once.  ``new_table`` marks each table's first entry.  Returns the plan; its
    ``commit`` applies it and builds the Work."""
    a, ph = k.arch, k.phys
    m = len(vals)
    # the usual case: each entry is the previous one with the PFN advanced by one
    p0 = a.normal_pfn_run(vals) if m > 1 else None
    if p0 is not None:  # one progression of normal entries: every test is the first entry's
        present = normal = np.ones(m, bool)
        special = np.zeros(m, bool)
        all_normal = True
        pfn: I64 | None = None  # (made from ``span`` only where an array is needed)
        span: slice | None = slice(p0, p0 + m)
    else:
        present = a.pte_present(vals)
        special = present & a.pte_special(vals)
        normal = present & ~special
        pfn = a.pte_pfn(vals)  # none entries give pfn 0: masked by ``normal`` wherever it matters
        span = as_span(pfn)  # one run of consecutive pages: the state arrays are read as views
        all_normal = bool(normal.all())
    at_pfn = span if span is not None else pfn
    head = ph.head[at_pfn]
    large = ph.order[at_pfn] > 0  # order and flags are kept on every page of a folio
    ae = ph.anon_exclusive[at_pfn]
    if ae_virtual is not None:
        ae = ae | ae_virtual
    anon = normal & ((ph.flags[at_pfn] & F_ANON) != 0)
    maybe_pinned = anon & ph.folio_maybe_dma_pinned(head) if parent.has_pinned else None

    # ---- folio_pte_batch: which entries continue the batch of the previous one
    uniform = True  # every batch's entries are its first one advanced page by page
    region = None  # entries that go alone because their batch would fail (-EAGAIN)
    fail_reads = None  # per region entry: PTEs the failed folio_pte_batch attempt read
    if mode == "batched" and large.any():
        # FPB_IGNORE_DIRTY for shared mappings; FPB_IGNORE_SOFT_DIRTY when
        # vma_soft_dirty_enabled() is false (VM_SOFTDIRTY set)
        cont = np.zeros(m, bool)
        same = large[1:] & normal[1:] & (head[1:] == head[:-1])
        step = None if p0 is not None else (vals[1:] - vals[:-1]) == a.pte_pfn_unit  # (None: all one page)
        if step is not None and (same & ~step).any():  # entries differing in bits the batch may ignore
            uniform = False
            bits = a.pte_batch_bits(vals, ignore_dirty=bool(src.flags & VmFlag.SHARED),
                                    ignore_soft_dirty=bool(src.flags & VmFlag.SOFTDIRTY))
            assert pfn is not None  # (step is None when the entries are one run)
            cont[1:] = same & (pfn[1:] == pfn[:-1] + 1) & (bits[1:] == bits[:-1])
        else:
            cont[1:] = same if step is None else same & step
        cont &= ~new_table
        if maybe_pinned is not None:
            # a batch holding an exclusive page of a maybe-pinned folio fails; every entry
            # up to its last exclusive page then goes alone
            bstart = (~cont).nonzero()[0]
            bend = np.append(bstart[1:], m)
            pin_b = maybe_pinned[bstart] & np.logical_or.reduceat(ae, bstart) & ((bend - bstart) > 1)
            if pin_b.any():
                last_ae = np.maximum.reduceat(np.where(ae, np.arange(m), -1), bstart)
                rs, re_ = bstart[pin_b], last_ae[pin_b] + 1
                idx, _ = expand_runs(rs, re_ - rs)
                region = np.zeros(m, bool)
                region[idx] = True
                fail_reads = np.zeros(m, np.int64)
                fail_reads[idx] = np.repeat(bend[pin_b], re_ - rs) - idx
                cont[idx] = False
                cont[re_[re_ < m]] = False
        starts: I64 | None = (~cont).nonzero()[0]
        batched_path = large[starts] & normal[starts]
        if region is not None:
            batched_path &= ~region[starts]  # after the failed attempt they go alone
    else:
        starts = None  # every entry is an item of its own
        batched_path = None
    if starts is not None and len(starts) == m:
        starts = None
    nr = np.diff(np.append(starts, m)) if starts is not None else None
    is_copy = eagain = None
    if maybe_pinned is not None:
        sp = maybe_pinned if starts is None else maybe_pinned[starts] & (nr == 1)
        ae_s = ae if starts is None else ae[starts]
        is_copy = sp & ae_s
        reg = False if region is None else (region if starts is None else region[starts])
        eagain = sp & (ae_s | reg)
        if fail_reads is not None:
            fail_reads = fail_reads if starts is None else fail_reads[starts]
    n_copy = 0 if is_copy is None else int(is_copy.sum())

    def commit(k: Kernel, parent: Mm, child: Mm, pidx: I64 | Rows, cidx: I64 | Rows, copy_pages: I64,
               works: list[Work], fresh: B) -> None:
        e = Entries(vals, normal, special, pfn, head, large, ae, anon, new_table, span, all_normal)
        _commit(k, parent, child, src, dst, mode, e, pidx, cidx, starts, nr, is_copy, eagain,
                batched_path, copy_pages, works, fresh, fail_reads, uniform)

    return PtePlan(n_copy, commit)


@define(eq=False)
class Entries:
    """Per-entry facts of the parent's PTEs, from planning."""

    vals: NDArray[np.uint64]
    normal: B
    special: B
    pfn: I64 | None  # None when ``span`` says it: see :meth:`pfns`
    head: NDArray[np.int32]
    large: B
    ae: B
    anon: B
    new_table: B
    span: slice | None  # ``pfn`` as a slice when it is one run of consecutive pages
    all_normal: bool  # every entry maps a normal page

    def pfns(self) -> I64:
        """Each entry's PFN as an array (for one run, made only when asked: 8 bytes an
        entry that the usual fork never needs)."""
        if self.pfn is not None:
            return self.pfn
        assert self.span is not None
        return np.arange(self.span.start, self.span.stop, dtype=np.int64)


def _commit(k: Kernel, parent: Mm, child: Mm, src: Vma, dst: Vma, mode: str, e: Entries,
            pidx: I64 | Rows, cidx: I64 | Rows, starts: I64 | None, nr: I64 | None, is_copy: B | None,
            eagain: B | None, batched_path: B | None, copy_pages: I64, works: list[Work],
            fresh: B, fail_reads: I64 | None = None, uniform: bool = False) -> None:
    """Write the planned copy: rmap and refcounts, the parent's wrprotects, child entries.

    ``fresh`` says, per table, whether the child's table was allocated for it (a second VMA
    in the same 2 MiB finds it there).

    ``starts``/``nr`` give the items (batches); None means every entry is its own item,
    the common case for order-0 folios and for legacy mode, which skips all indexing.
    ``uniform`` says every batch's entries are its first one advanced page by page, so the
    child's entries can be computed entry by entry instead of expanded from the batches.
    """
    a, ph = k.arch, k.phys
    m = len(e.vals)
    singles = starts is None
    p_sel, c_sel = pidx, cidx  # Rows (whole tables) when the caller had them
    cache: dict[str, I64] = {}

    def P() -> I64:
        if "p" not in cache:
            cache["p"] = flat_index(p_sel)
        return cache["p"]

    def C() -> I64:
        if "c" not in cache:
            cache["c"] = flat_index(c_sel)
        return cache["c"]

    def at(x: NDArray[Any]) -> NDArray[Any]:
        return x if starts is None else x[starts]

    n_items = m if starts is None else len(starts)
    ops = Ops(n_items)
    flat = k.pt.flat

    # ---- dup items: present and not copied
    i_norm = at(e.normal)
    ent_off: I64 | None = None  # offsets of entries in their items, when expanded
    every = e.all_normal and is_copy is None  # the usual case: every item is a normal dup
    if every:
        di = np.arange(n_items, dtype=np.int64)
        d_start = di if starts is None else starts
        d_nr = np.broadcast_to(np.int64(1), (n_items,)) if nr is None else nr
        dense = all_norm = True
        ent = d_start if singles else np.zeros(0, np.int64)
    else:
        dup = i_norm | at(e.special)
        if is_copy is not None:
            dup &= ~is_copy
        di = dup.nonzero()[0]
        d_start = di if starts is None else starts[di]
        d_nr = np.ones(len(di), np.int64) if nr is None else nr[di]
        # "dense": the items cover every entry, in order: per-entry arrays are used as they are
        dense = int(d_nr.sum()) == m
        if singles:
            ent = d_start
        elif dense:
            ent = np.zeros(0, np.int64)  # not needed
        else:
            ent, ent_off = expand_runs(d_start, d_nr)
        norm_ent = e.normal if dense else e.normal[ent]
        all_norm = bool(norm_ent.all())
        dense = dense and all_norm
        if not all_norm:
            ent = (np.arange(m) if len(ent) == 0 else ent)

    def E(x: NDArray[Any]) -> NDArray[Any]:
        return x if dense else x[ent]

    ent_n = ent if all_norm else ent[norm_ent]
    span = e.span if dense else None  # the pages duplicated are one physical run
    pfn_n = None if span is not None else e.pfns() if dense else e.pfns()[ent_n]  # (None: span)
    n_dup = len(ent_n) if not dense else m  # pages duplicated

    def offsets() -> I64:
        """Each item's first position among the duplicated entries."""
        if "off" not in cache:
            cache["off"] = np.cumsum(d_nr) - d_nr
        return cache["off"]

    # refcount: one folio_ref_add (or folio_get) per item; small folios are mapped once
    ni = di if all_norm else di[e.normal[d_start]]
    ni_first = ni if starts is None else starts[ni]
    h_items = e.head if dense and singles else e.head[ni_first]
    lg = e.large if dense and singles else e.large[ni_first]
    ni_nr = d_nr if all_norm else (np.ones(len(ni), np.int64) if nr is None else nr[ni])
    if lg.any():
        if bool(lg.all()) and (len(h_items) < 2 or bool((h_items[1:] > h_items[:-1]).all())):
            add = ni_nr.astype(np.int32)  # one batch per folio here: plain adds
            ph.refcount[h_items] += add
            ph.large_mapcount[h_items] += add
        else:
            ph.scatter_add(ph.refcount, h_items[lg], ni_nr[lg])
            ph.scatter_add(ph.large_mapcount, h_items[lg], ni_nr[lg])
            ph.refcount[h_items[~lg]] += 1
    elif span is not None and singles:  # small folios: each page is its own head
        ph.refcount[span] += 1
    else:
        ph.refcount[h_items] += 1
    # mapcount: one atomic per page (v6.9)
    ph.mapcount[span if pfn_n is None else pfn_n] += 1
    if dense and singles:
        ops.add_each("folio_ref_ops")
        ops.add_each("mapcount_ops")
    else:
        ops.add("folio_ref_ops", 1, ALL if every else ni)
        ops.add("mapcount_ops", ni_nr, ALL if every else ni)
    # AnonExclusive cleared on every page that had it
    ae_n = e.ae if dense else e.ae[ent_n]
    if ae_n.any():
        if singles:
            all_ae = every and len(ni) == ops.n_items and bool(ae_n.all())
            ops.add("anon_exclusive_clears", 1, ALL if all_ae else ni[ae_n])
        else:
            ops.add("anon_exclusive_clears", np.add.reduceat(E(e.ae).astype(np.int64), offsets()),
                    ALL if every else di)
        # last: with ``span``, e.ae is a view of the array cleared here
        ph.anon_exclusive[span if pfn_n is None else pfn_n[ae_n]] = False
    # rss of the child
    anon_n = e.anon if dense else e.anon[ent_n]
    n_anon = int(np.count_nonzero(anon_n))
    child.rss[MM_ANONPAGES] += n_anon
    if n_anon < n_dup:
        shm = (ph.flags[ph.head[(e.pfns() if pfn_n is None else pfn_n)[~anon_n]]] & F_SWAPBACKED) != 0
        child.rss[MM_SHMEMPAGES] += int(shm.sum())
        child.rss[MM_FILEPAGES] += int((~shm).sum())

    # ---- __copy_present_ptes: parent wrprotect, child entries from the first pte
    pte = e.vals if dense and singles else e.vals[d_start]  # (changed below only by copies)
    write = a.pte_write(pte)
    if not singles and len(di) and not uniform:
        any_w = np.logical_or.reduceat(a.pte_write(E(e.vals)), offsets())
        mk = any_w & ~write
        if mk.any():
            pte[mk] = a.pte_mkwrite(pte[mk])
            write = any_w
    whole = dense and isinstance(p_sel, Rows)  # the runs are whole tables, in order
    # whole tables of uniform batches: the child's entries are the parent's (write-protected
    # below where they were writable) with the child's changes, which leave the PFN alone,
    # so they are made entry by entry from the parent's table rows
    elementwise = whole and uniform
    items = ALL if every else di
    if src.is_cow and write.any():
        if write.all():
            a.wrprotect_ptes(parent, flat, p_sel if whole and singles else flat_index(p_sel, d_start), d_nr,
                             ops, items,
                             expanded=p_sel if whole else (None if singles else P()[ent] if len(ent) else P()))
            if not elementwise:
                pte = a.pte_wrprotect(pte)
        else:
            wi = write.nonzero()[0]
            a.wrprotect_ptes(parent, flat, flat_index(p_sel, d_start[wi]), d_nr[wi], ops, di[wi])
            if not elementwise:
                pte = np.where(write, a.pte_wrprotect(pte), pte)
    if elementwise:
        assert isinstance(p_sel, Rows)
        pte = p_sel.get(flat)
    if src.flags & VmFlag.SHARED:
        pte = a.pte_mkclean(pte)
    pte = a.pte_mkold(pte)
    if not dst.flags & VmFlag.UFFD_WP:
        pte = a.pte_clear_uffd_wp(pte)
    if singles:
        a.set_ptes(child, flat, c_sel if whole else flat_index(c_sel, d_start), pte, d_nr, ops, items)
    elif elementwise:
        a.set_ptes(child, flat, flat_index(c_sel, d_start), pte[d_start], d_nr, ops, items,
                   expanded=(c_sel, None), values=pte)
    else:
        c_ent = c_sel if whole else (C()[ent] if len(ent) else C())
        a.set_ptes(child, flat, flat_index(c_sel, d_start), pte, d_nr, ops, items,
                   expanded=(c_ent, ent_off))

    # ---- pinned exclusive pages: copy_present_page into the preallocated pages
    if is_copy is not None and is_copy.any():
        ci = is_copy.nonzero()[0]
        ce = at(np.arange(m))[ci]
        ph.token[copy_pages] = ph.token[e.pfns()[ce]]
        ph.mapcount[copy_pages] = 1
        ph.anon_exclusive[copy_pages] = True
        cp = a.pte_mkdirty(a.pfn_pte(copy_pages, dst.page_prot(a)))
        if dst.flags & VmFlag.WRITE:
            cp = a.pte_mkwrite(cp)
        flat[C()[ce]] = cp
        child.rss[MM_ANONPAGES] += len(ci)
        ops.add("fork_page_copies", 1, ci)
        ops.add("page_copies", 1, ci)
        ops.add("pte_writes", 1, ci)
        ops.add("mapcount_ops", 1, ci)
        ops.add("folio_ref_ops", 2, ci)  # folio_get + folio_put of the failed dup
    if eagain is not None and eagain.any():
        assert is_copy is not None
        ei = eagain.nonzero()[0]
        ops.add("prealloc_retries", 1, ei)
        ops.add("folio_allocs", 1, ei)
        ops.add("folios_freed", 1, ei[~is_copy[ei]])  # the unused prealloc
        # the attempt that failed before the retry: a whole batch (folio_pte_batch over
        # the rest of it, folio_ref_add + folio_ref_sub) or one small page (get + put)
        failed = fail_reads[ei] > 0 if fail_reads is not None else np.zeros(len(ei), bool)
        fb = ei[failed]
        ops.add("fork_batches", 1, fb)
        ops.add("pte_reads", fail_reads[fb] if fail_reads is not None else 0, fb)
        ops.add("folio_ref_ops", 2, ei)
        # a failure at a table's first entry is a pass of its own that copied nothing
        empty = ei[at(e.new_table)[ei]]
        ops.add("ptl_locks", 2, empty)
        ops.add("cond_resched", 1, empty)
        ops.add("copy_pte_range", 1, empty)

    # ---- the loop's own work: reads, progress, checkpoints, sections
    ops.add_each("pte_reads")
    loads = a.ptep_get_reads(e.vals)  # a layer whose ptep_get gathers reads more per entry
    if loads is not None:
        more_loads = loads - 1
        ops.add("pte_reads", more_loads if starts is None else np.add.reduceat(more_loads, starts), ALL)
    if batched_path is not None and batched_path.any():
        bi = batched_path.nonzero()[0]
        b_nr = np.ones(len(bi), np.int64) if nr is None else nr[bi]
        ops.add("pte_reads", b_nr - 1, bi)
        # folio_pte_batch also reads the entry that ends a batch, unless the table ended
        stop = (bi if starts is None else starts[bi]) + b_nr
        more = stop < m
        more[more] = ~e.new_table[stop[more]]
        stop_reads = more.astype(np.int64) if loads is None else np.where(more, loads[np.minimum(stop, m - 1)], 0)
        ops.add("pte_reads", stop_reads, bi)
        ops.add("fork_batched_ptes", b_nr, bi)
    present_items = di if is_copy is None else (dup | is_copy).nonzero()[0]
    ops.add("fork_batches", 1, ALL if every else present_items)
    n_present = len(present_items)
    if n_present == n_items and (mode == "legacy" or nr is None):
        inc: I64 | int = 8
    elif n_present == n_items and nr is not None and (nr == nr[0]).all():
        inc = 8 * int(nr[0])
    else:
        none_item = ~(i_norm | at(e.special))
        inc = np.where(none_item, 1, 8 * nr if mode == "batched" and nr is not None else 8)
    sec = at(e.new_table)
    if eagain is not None:
        sec = sec | eagain
    sec_start = sec.nonzero()[0]
    count = checkpoint_count(inc, sec_start, n_items)
    if count is None:
        cps = checkpoints(inc, sec_start, n_items)
        ops.add("resched_checks", 1, cps)
        cp_arg: Any = cps
    else:
        assert isinstance(inc, int)
        cp_arg = LazyCheckpoints(inc, sec_start, n_items)
        ops.add_lazy("resched_checks", count, cp_arg)
    ops.add("ptl_locks", 2, sec_start)
    ops.add("cond_resched", 1, sec_start)
    ops.add("copy_pte_range", 1, sec_start)
    # pte_alloc_map_lock: one per table this fork allocates (often every section's first item)
    every_table_fresh = eagain is None and bool(fresh.all()) and len(fresh) == len(sec_start)
    ops.add("pgtable_allocs", 1, sec_start if every_table_fresh else at(e.new_table).nonzero()[0][fresh])
    # each section holds the parent's table lock (src_ptl) and the child's (dst_ptl)
    if isinstance(c_sel, Rows) and isinstance(p_sel, Rows) and dense and singles:  # whole tables
        lock_ids = np.stack([p_sel.rows, c_sel.rows], axis=1)
    else:
        first_entry = sec_start if starts is None else starts[sec_start]
        n_tab = k.arch.ptrs_per_table
        lock_ids = np.stack([flat_index(p_sel, first_entry) // n_tab, flat_index(c_sel, first_entry) // n_tab],
                            axis=1)
    works.append(Work("copy_pte_range", ops, sections=sec_start, locks=("ptl", "ptl"),
                      lock_ids=lock_ids, checkpoints=cp_arg, cond_resched=True))
