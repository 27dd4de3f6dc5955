"""fork(): dup_mmap and the page-table copy, batched (v6.9) or legacy (per PTE).

Mirrors: kernel/fork.c dup_mmap, mm/memory.c copy_page_range, copy_pmd_range,
copy_pte_range, copy_present_ptes, folio_pte_batch (mm/internal.h) and
mm/huge_memory.c copy_huge_pmd.

The parent holds its mmap_lock for writing, so its page tables cannot change while they
are copied: the whole copy of a VMA is planned in one pass over all its page tables (which
entries form batches, which folios are maybe pinned, what every child entry becomes), every
allocation is made, and only then is anything written.  The lock sections are then handed
to the runner, item by item, with the positions of their resched checkpoints.

Deliberate difference: the kernel allocates as it goes and leaves the parent's already
write-protected entries behind when a later allocation fails; mmuemu allocates first, so a
failed fork leaves the parent exactly as it was.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
from attrs import define
from numpy.typing import NDArray

from mmuemu.errors import InvalidArgument, OutOfMemory
from mmuemu.mm.huge_memory import split_huge_pmds
from mmuemu.mm.mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, Kernel, Mm
from mmuemu.mm.physmem import F_ANON, F_SWAPBACKED
from mmuemu.mm.progress import checkpoint_count, checkpoints
from mmuemu.mm.vma import AnonVma, Vma, VmFlag
from mmuemu.mm.work import Ops, Work
from mmuemu.runs import expand_runs

__all__ = ["FORK_MODES", "dup_mmap"]

FORK_MODES = ("batched", "legacy")
#: page tables planned and committed together (bounds the temporaries: 512 MiB of PTEs)
CHUNK_SLOTS = 256
I64 = NDArray[np.int64]
B = NDArray[np.bool_]


def vma_needs_copy(dst: Vma, src: Vma) -> bool:
    """Mirrors: mm/memory.c vma_needs_copy (v6.9)."""
    if dst.flags & VmFlag.UFFD_WP:
        return True
    if src.flags & (VmFlag.PFNMAP | VmFlag.MIXEDMAP):
        return True
    return src.anon_vma is not None


def dup_mmap(k: Kernel, parent: Mm, mode: str | None = None) -> Generator[Work, Any, Mm]:
    """Mirrors: kernel/fork.c dup_mmap: copy every VMA and its page tables into a new mm,
    then flush the parent's TLB once."""
    mode = mode or k.fork_mode
    if mode not in FORK_MODES:
        raise InvalidArgument(f"unknown fork mode {mode!r}; allowed: {', '.join(FORK_MODES)}")
    child = k.new_mm()
    child.folio_orders = parent.folio_orders
    child.cpumask = {k.cpu}
    copies: list[_VmaCopy] = []
    try:
        for src in parent.vmas:
            if src.flags & VmFlag.DONTCOPY:
                continue
            dst = src.copy()
            dst.flags &= ~VmFlag.UFFD_WP  # no UFFD_FEATURE_EVENT_FORK: dup_userfaultfd clears it
            if src.flags & VmFlag.WIPEONFORK:
                dst.anon_vma = None
            elif src.anon_vma is not None:
                dst.anon_vma = AnonVma()  # anon_vma_fork
            child.vmas.insert(dst)
            if src.flags & VmFlag.WIPEONFORK or not vma_needs_copy(dst, src):
                continue
            copies.append(_plan_vma(k, parent, child, src, dst, mode))
    except OutOfMemory:
        _discard(k, child, copies)
        raise
    for c in copies:
        c.commit(k, parent, child)
    for c in copies:
        for work in c.works:  # noqa: UP028 (a runner answers each yield with send())
            yield work
    ops = Ops()
    k.arch.flush_tlb_mm(parent, ops, k.cpu)
    ops.add("forks", 1)
    yield Work("dup_mmap", ops)
    return child


def _discard(k: Kernel, child: Mm, copies: list[_VmaCopy]) -> None:
    """Undo a fork that failed while planning: free every page the child got."""
    for c in copies:
        k.phys.ref_sub_and_free(c.copy_pages, 1) if len(c.copy_pages) else None
        if len(c.deposit_rows):
            k.pt.free(c.deposit_rows)
    k.pt.free_tree(child.pgd_row)
    del k.mms[child.id]


@define(eq=False)
class _VmaCopy:
    """The planned copy of one VMA: allocations made, nothing written yet."""

    src: Vma
    dst: Vma
    commit_steps: list[Any]
    works: list[Work]
    copy_pages: I64
    deposit_rows: I64

    def commit(self, k: Kernel, parent: Mm, child: Mm) -> None:
        for step in self.commit_steps:
            step()


def _plan_vma(k: Kernel, parent: Mm, child: Mm, src: Vma, dst: Vma, mode: str) -> _VmaCopy:
    """Mirrors: copy_page_range for one VMA (planning and allocation only)."""
    a, pt, ph = k.arch, k.pt, k.phys
    n = a.ptrs_per_table
    slots = pt.pmd_slots(parent.pgd_row, src.start, src.end)
    pmd = pt.flat[slots.flat]
    live = pmd != 0
    va, pflat, pmd = slots.va[live], slots.flat[live], pmd[live]
    leaf = a.pmd_leaf(pmd)
    copy = _VmaCopy(src, dst, [], [], np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not len(va):
        return copy

    # ---- PMD leaves: copy_huge_pmd (anon only), pinned exclusive ones are split instead
    thp = np.flatnonzero(leaf)
    split = np.zeros(0, np.int64)
    if len(thp):
        heads = a.pte_pfn(a.pmd_to_pte(pmd[thp]))
        if not src.is_anonymous:
            thp = thp[:0]  # file THPs are refilled by faults
            heads = heads[:0]
        pinned = parent.has_pinned & (ph.pincount[heads] > 0) & ph.anon_exclusive[heads]
        split = thp[pinned]
        thp = thp[~pinned]

    # ---- child tables for every slot we copy
    copy_slot = ~leaf
    copy_slot[split] = True
    want = copy_slot.copy()
    want[thp] = True
    child_rows: list[int] = []
    cslots = _child_slots(k, child, va[want], child_rows)
    cflat_all = np.full(len(va), -1, np.int64)
    cflat_all[want] = cslots.flat[np.searchsorted(cslots.va, va[want])]
    crow = np.full(len(va), -1, np.int64)
    sel = np.flatnonzero(copy_slot)
    if len(sel):
        crow[sel] = pt.pte_alloc(cflat_all[sel])

    # deposit tables for copied THPs (pte_alloc_one in copy_huge_pmd)
    if len(thp):
        copy.deposit_rows = pt.alloc(len(thp), 3)

    # ---- PTE level, CHUNK_SLOTS tables at a time so temporaries stay bounded
    prow = np.full(len(va), -1, np.int64)
    normal_tab = copy_slot & ~leaf
    prow[normal_tab] = pt.rows_of(pmd[normal_tab])
    if len(split):
        prow[split] = [parent.deposit[int(f)] for f in pflat[split]]
    lo = np.maximum(va, src.start)
    hi = np.minimum(va + (n << 12), src.end)
    cnt = np.where(copy_slot, (hi - lo) >> 12, 0)
    first = (lo - va) >> 12
    slots_ = np.flatnonzero(cnt > 0)
    chunks = [slots_[i : i + CHUNK_SLOTS] for i in range(0, len(slots_), CHUNK_SLOTS)]
    is_split = np.zeros(len(va), bool)
    is_split[split] = True

    def entries(chunk: I64, virtual: bool) -> tuple[I64, I64, NDArray[np.uint64], B, B | None]:
        """Parent and child flat indices, parent values and table starts of a chunk; with
        ``virtual``, tables still to be split are read as the split would fill them."""
        c_cnt, c_prow, c_crow, c_first = cnt[chunk], prow[chunk], crow[chunk], first[chunk]
        if (c_cnt == n).all():  # whole tables: gather rows, not entries
            ar = np.arange(n, dtype=np.int64)
            pidx = (c_prow[:, None] * n + ar[None, :]).ravel()
            cidx = (c_crow[:, None] * n + ar[None, :]).ravel()
            vals = pt.entries[c_prow].ravel()
        else:
            pidx, off = expand_runs(c_prow * n + c_first, c_cnt)
            cidx = np.repeat(c_crow * n + c_first, c_cnt) + off
            vals = pt.flat[pidx]
        new_table = np.zeros(len(vals), bool)
        new_table[np.cumsum(c_cnt) - c_cnt] = True
        ae_virtual = None
        if virtual and is_split[chunk].any():
            tab = np.repeat(chunk, c_cnt)
            sp = is_split[tab]
            base = a.pmd_to_pte(pmd[tab[sp]])
            vals[sp] = a.pte_advance_pfn(base, pidx[sp] % n)
            ae_virtual = np.zeros(len(vals), bool)
            ae_virtual[sp] = ph.anon_exclusive[a.pte_pfn(base)]
        return pidx, cidx, vals, new_table, ae_virtual

    # pinned exclusive pages are copied at fork: count them first to allocate their copies
    n_copies = [0] * len(chunks)
    if parent.has_pinned:
        for ci, chunk in enumerate(chunks):
            _, _, vals, new_table, ae_virtual = entries(chunk, virtual=True)
            n_copies[ci] = _plan_ptes(k, parent, src, dst, mode, vals, new_table, ae_virtual).n_copy
    if sum(n_copies):
        try:
            copy.copy_pages = ph.new_folios(0, sum(n_copies), F_ANON | F_SWAPBACKED)
        except OutOfMemory:
            if len(copy.deposit_rows):
                pt.free(copy.deposit_rows)
                copy.deposit_rows = np.zeros(0, np.int64)
            raise

    def commit() -> None:
        if len(split):
            split_huge_pmds(k, parent, pflat[split], Ops())
        if len(thp):
            _copy_huge_pmds(k, child, dst, pflat[thp], cflat_all[thp], copy.deposit_rows, copy.works)
        done = 0
        for chunk, n_copy in zip(chunks, n_copies, strict=True):
            pidx, cidx, vals, new_table, _ = entries(chunk, virtual=False)
            plan = _plan_ptes(k, parent, src, dst, mode, vals, new_table, None)
            assert plan.n_copy == n_copy, "pinned-page count changed between plan and commit"
            plan.commit(k, parent, child, pidx, cidx, copy.copy_pages[done : done + n_copy], copy.works)
            done += n_copy

    copy.commit_steps.append(commit)
    return copy


def _child_slots(k: Kernel, child: Mm, va: I64, new_rows: list[int]) -> Any:
    """Child PMD entries for these slots, allocating upper tables per 1 GiB group."""
    from mmuemu.mm.pagetable import PmdSlots

    a = k.arch
    if not len(va):
        return PmdSlots(np.zeros(0, np.int64), np.zeros(0, np.int64))
    pud = va >> a.level_shift(1)
    out_va, out_flat = [], []
    for g in np.unique(pud).tolist():
        v = va[pud == g]
        s = k.pt.pmd_slots(child.pgd_row, int(v.min()), int(v.max()) + (1 << a.pmd_shift),
                           alloc=True, new_rows=new_rows)
        out_va.append(s.va)
        out_flat.append(s.flat)
    return PmdSlots(np.concatenate(out_va), np.concatenate(out_flat))


def _copy_huge_pmds(k: Kernel, child: Mm, dst: Vma, pflat: I64, cflat: I64, deposit: I64,
                    works: list[Work]) -> None:
    """Mirrors: mm/huge_memory.c copy_huge_pmd (success path), for many PMDs."""
    a, ph = k.arch, k.phys
    flat = k.pt.flat
    pmd = flat[pflat]
    pte = a.pmd_to_pte(pmd)
    heads = a.pte_pfn(pte)
    ph.refcount[heads] += 1
    ph.entire_mapcount[heads] += 1
    ph.large_mapcount[heads] += 1
    ph.anon_exclusive[heads] = False
    flat[pflat] = a.pte_to_pmd(a.pte_wrprotect(pte))
    cpte = a.pte_mkold(a.pte_wrprotect(pte))
    if not dst.flags & VmFlag.UFFD_WP:
        cpte = a.pte_clear_uffd_wp(cpte)
    flat[cflat] = a.pte_to_pmd(cpte)
    for f, r in zip(cflat.tolist(), deposit.tolist(), strict=True):
        child.deposit[f] = r
    child.rss[MM_ANONPAGES] += len(heads) * a.ptrs_per_table
    m = len(heads)
    items = np.arange(m)
    ops = Ops(m)
    ops.add("folio_ref_ops", 1, items)
    ops.add("mapcount_ops", 1, items)
    ops.add("pmds_wrprotected", 1, items)
    ops.add("pte_atomics", 1, items)
    ops.add("pmd_writes", 1, items)
    ops.add("pgtable_allocs", 1, items)
    ops.add("ptl_locks", 2, items)
    ops.add("copy_huge_pmd", 1, items)
    works.append(Work("copy_huge_pmd", ops, sections=items, locks=("pmd_lock", "pmd_lock"),
                      lock_ids=pflat.copy()))


@define(eq=False)
class _PtePlan:
    n_copy: int
    commit: Any


K_NONE, K_PRESENT, K_SPECIAL = 0, 1, 2


def _plan_ptes(k: Kernel, parent: Mm, src: Vma, dst: Vma, mode: str, vals: NDArray[np.uint64],
               new_table: B, ae_virtual: B | None) -> _PtePlan:
    """Mirrors: copy_pte_range / copy_present_ptes / folio_pte_batch over every entry of the
    VMA at once.  ``new_table`` marks each table's first entry.  Returns the plan; its
    ``commit`` applies it and builds the Work."""
    a, ph = k.arch, k.phys
    m = len(vals)
    present = a.pte_present(vals)
    special = present & a.pte_special(vals)
    normal = present & ~special
    pfn = a.pte_pfn(vals)  # none entries give pfn 0: masked by ``normal`` wherever it matters
    head = ph.head[pfn]
    large = ph.order[head] > 0
    ae = ph.anon_exclusive[pfn]
    if ae_virtual is not None:
        ae |= ae_virtual
    anon = normal & ((ph.flags[head] & F_ANON) != 0)
    maybe_pinned = anon & ph.folio_maybe_dma_pinned(head) if parent.has_pinned else None

    # ---- folio_pte_batch: which entries continue the batch of the previous one
    region = None  # entries that go alone because their batch would fail (-EAGAIN)
    if mode == "batched" and large.any():
        ign = a.pte_wrprotect(a.pte_mkold(vals))
        if src.flags & VmFlag.SHARED:
            ign = a.pte_mkclean(ign)
        if not src.flags & VmFlag.SOFTDIRTY:
            ign = a.pte_clear_soft_dirty(ign)
        bits = a.pte_same_bits(ign)
        cont = np.zeros(m, bool)
        cont[1:] = (large[1:] & normal[1:] & (head[1:] == head[:-1]) & (pfn[1:] == pfn[:-1] + 1)
                    & (bits[1:] == bits[:-1]))
        cont &= ~new_table
        if maybe_pinned is not None:
            # a batch holding an exclusive page of a maybe-pinned folio fails; every entry
            # up to its last exclusive page then goes alone
            bstart = np.flatnonzero(~cont)
            bend = np.append(bstart[1:], m)
            pin_b = maybe_pinned[bstart] & np.logical_or.reduceat(ae, bstart) & ((bend - bstart) > 1)
            if pin_b.any():
                last_ae = np.maximum.reduceat(np.where(ae, np.arange(m), -1), bstart)
                rs, re_ = bstart[pin_b], last_ae[pin_b] + 1
                idx, _ = expand_runs(rs, re_ - rs)
                region = np.zeros(m, bool)
                region[idx] = True
                cont[idx] = False
                cont[re_[re_ < m]] = False
        starts: I64 | None = np.flatnonzero(~cont)
        batched_path = large[starts] & normal[starts]
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
    n_copy = 0 if is_copy is None else int(is_copy.sum())

    def commit(k: Kernel, parent: Mm, child: Mm, pidx: I64, cidx: I64, copy_pages: I64,
               works: list[Work]) -> None:
        e = _Entries(vals, normal, special, pfn, head, large, ae, anon, new_table)
        _commit(k, parent, child, src, dst, mode, e, pidx, cidx, starts, nr, is_copy, eagain,
                batched_path, copy_pages, works)

    return _PtePlan(n_copy, commit)


@define(eq=False)
class _Entries:
    """Per-entry facts of the parent's PTEs, from planning."""

    vals: NDArray[np.uint64]
    normal: B
    special: B
    pfn: I64
    head: NDArray[np.int32]
    large: B
    ae: B
    anon: B
    new_table: B


def _commit(k: Kernel, parent: Mm, child: Mm, src: Vma, dst: Vma, mode: str, e: _Entries,
            pidx: I64, cidx: I64, starts: I64 | None, nr: I64 | None, is_copy: B | None,
            eagain: B | None, batched_path: B | None, copy_pages: I64, works: list[Work]) -> None:
    """Write the planned copy: rmap and refcounts, the parent's wrprotects, child entries.

    ``starts``/``nr`` give the items (batches); None means every entry is its own item,
    the common case for order-0 folios and for legacy mode, which skips all indexing.
    """
    a, ph = k.arch, k.phys
    m = len(e.vals)
    singles = starts is None

    def at(x: NDArray[Any]) -> NDArray[Any]:
        return x if starts is None else x[starts]

    n_items = m if starts is None else len(starts)
    ops = Ops(n_items)
    flat = k.pt.flat

    # ---- dup items: present and not copied
    i_norm = at(e.normal)
    dup = i_norm | at(e.special)
    if is_copy is not None:
        dup &= ~is_copy
    di = np.flatnonzero(dup)
    # "full": every entry is its own item and is duplicated: no gathers needed at all
    full = singles and len(di) == m

    def g(x: NDArray[Any], idx: NDArray[Any]) -> NDArray[Any]:
        return x if full else x[idx]

    d_start = di if starts is None else starts[di]
    d_nr = np.ones(len(di), np.int64) if nr is None else nr[di]
    if singles:
        ent = d_start
    else:
        ent, ent_off = expand_runs(d_start, d_nr)
    norm_ent = g(e.normal, ent)
    all_norm = bool(norm_ent.all())
    full = full and all_norm
    ent_n = ent if all_norm else ent[norm_ent]
    pfn_n = g(e.pfn, ent_n)
    # refcount: one folio_ref_add (or folio_get) per item; small folios are mapped once
    ni = di if all_norm and singles else di[e.normal[d_start]]
    ni_first = ni if starts is None else starts[ni]
    h_items = g(e.head, ni_first)
    lg = g(e.large, ni_first)
    ni_nr = np.ones(len(ni), np.int64) if nr is None else nr[ni]
    if lg.any():
        ph.scatter_add(ph.refcount, h_items[lg], ni_nr[lg])
        ph.scatter_add(ph.large_mapcount, h_items[lg], ni_nr[lg])
        ph.refcount[h_items[~lg]] += 1
    else:
        ph.refcount[h_items] += 1
    # mapcount: one atomic per page (v6.9)
    ph.mapcount[pfn_n] += 1
    if full:
        ops.add_each("folio_ref_ops")
        ops.add_each("mapcount_ops")
    else:
        ops.add("folio_ref_ops", 1, ni)
        ops.add("mapcount_ops", ni_nr, ni)
    # AnonExclusive cleared on every page that had it
    ae_n = g(e.ae, ent_n)
    if ae_n.any():
        ph.anon_exclusive[pfn_n[ae_n]] = False
        if singles:
            ops.add("anon_exclusive_clears", 1, ni[ae_n])
        else:
            per = np.add.reduceat(e.ae[ent].astype(np.int64), np.cumsum(d_nr) - d_nr)
            ops.add("anon_exclusive_clears", per, di)
    # rss of the child
    anon_n = g(e.anon, ent_n)
    n_anon = int(np.count_nonzero(anon_n))
    child.rss[MM_ANONPAGES] += n_anon
    if n_anon < len(ent_n):
        shm = (ph.flags[e.head[ent_n[~anon_n]]] & F_SWAPBACKED) != 0
        child.rss[MM_SHMEMPAGES] += int(shm.sum())
        child.rss[MM_FILEPAGES] += int((~shm).sum())

    # ---- __copy_present_ptes: parent wrprotect, child entries from the first pte
    pte = e.vals.copy() if full else e.vals[d_start]
    write = a.pte_write(pte)
    if not singles and len(ent):
        any_w = np.logical_or.reduceat(a.pte_write(e.vals[ent]), np.cumsum(d_nr) - d_nr)
        mk = any_w & ~write
        if mk.any():
            pte[mk] = a.pte_mkwrite(pte[mk])
            write = any_w
    if src.is_cow and write.any():
        if write.all():
            a.wrprotect_ptes(parent, flat, pidx[d_start] if not full else pidx, d_nr, ops, di,
                             expanded=pidx if full else (None if singles else pidx[ent]))
            pte = a.pte_wrprotect(pte)
        else:
            wi = np.flatnonzero(write)
            a.wrprotect_ptes(parent, flat, pidx[d_start[wi]], d_nr[wi], ops, di[wi])
            pte[wi] = a.pte_wrprotect(pte[wi])
    if src.flags & VmFlag.SHARED:
        pte = a.pte_mkclean(pte)
    pte = a.pte_mkold(pte)
    if not dst.flags & VmFlag.UFFD_WP:
        pte = a.pte_clear_uffd_wp(pte)
    a.set_ptes(child, flat, cidx if full else cidx[d_start], pte, d_nr, ops, di,
               expanded=None if singles else (cidx[ent], ent_off))

    # ---- pinned exclusive pages: copy_present_page into the preallocated pages
    if is_copy is not None and is_copy.any():
        ci = np.flatnonzero(is_copy)
        ce = at(np.arange(m))[ci]
        ph.token[copy_pages] = ph.token[e.pfn[ce]]
        ph.mapcount[copy_pages] = 1
        ph.anon_exclusive[copy_pages] = True
        cp = a.pte_mkdirty(a.pfn_pte(copy_pages, a.vm_get_page_prot(dst.prot)))
        if dst.flags & VmFlag.WRITE:
            cp = a.pte_mkwrite(cp)
        flat[cidx[ce]] = cp
        child.rss[MM_ANONPAGES] += len(ci)
        ops.add("fork_page_copies", 1, ci)
        ops.add("page_copies", 1, ci)
        ops.add("pte_writes", 1, ci)
        ops.add("mapcount_ops", 1, ci)
        ops.add("folio_ref_ops", 2, ci)  # folio_get + folio_put of the failed dup
    if eagain is not None and eagain.any():
        assert is_copy is not None
        ei = np.flatnonzero(eagain)
        ops.add("prealloc_retries", 1, ei)
        ops.add("folio_allocs", 1, ei)
        if batched_path is not None:
            ops.add("folio_ref_ops", 2, ei[batched_path[ei]])  # ref_add + ref_sub of the failed batch
        ops.add("folios_freed", 1, ei[~is_copy[ei]])  # the unused prealloc

    # ---- the loop's own work: reads, progress, checkpoints, sections
    ops.add_each("pte_reads")
    if batched_path is not None and batched_path.any():
        bi = np.flatnonzero(batched_path)
        b_nr = np.ones(len(bi), np.int64) if nr is None else nr[bi]
        ops.add("pte_reads", b_nr - 1, bi)
        # folio_pte_batch also reads the entry that ends a batch, unless the table ended
        stop = (bi if starts is None else starts[bi]) + b_nr
        more = stop < m
        more[more] = ~e.new_table[stop[more]]
        ops.add("pte_reads", more.astype(np.int64), bi)
        ops.add("fork_batched_ptes", b_nr, bi)
    present_items = di if is_copy is None else np.flatnonzero(dup | is_copy)
    ops.add("fork_batches", 1, present_items)
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
    sec_start = np.flatnonzero(sec)
    count = checkpoint_count(inc, sec_start, n_items)
    if count is None:
        cps = checkpoints(inc, sec_start, n_items)
        ops.add("resched_checks", 1, cps)
        cp_arg: Any = cps
    else:
        ops.add_lazy("resched_checks", count, lambda: checkpoints(inc, sec_start, n_items))
        cp_arg = lambda: checkpoints(inc, sec_start, n_items)  # noqa: E731
    ops.add("ptl_locks", 2, sec_start)
    ops.add("cond_resched", 1, sec_start)
    ops.add("copy_pte_range", 1, sec_start)
    ops.add("pgtable_allocs", 1, np.flatnonzero(at(e.new_table)))
    lock_ids = cidx[at(np.arange(m))[sec_start]] // k.arch.ptrs_per_table
    works.append(Work("copy_pte_range", ops, sections=sec_start, locks=("ptl", "ptl"),
                      lock_ids=lock_ids, checkpoints=cp_arg, cond_resched=True))
