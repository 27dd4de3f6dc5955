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

from collections.abc import Callable, Generator
from typing import Any

import numpy as np
from attrs import define
from numpy.typing import NDArray

from mmuemu.errors import InvalidArgument, OutOfMemory
from mmuemu.mm.copy_pte import plan_ptes
from mmuemu.mm.huge_memory import split_huge_pmds
from mmuemu.mm.mm import MM_ANONPAGES, Kernel, Mm
from mmuemu.mm.pagetable import PmdSlots
from mmuemu.mm.physmem import F_ANON, F_SWAPBACKED
from mmuemu.mm.vma import AnonVma, Vma, VmFlag
from mmuemu.mm.work import Ops, Work
from mmuemu.runs import Rows, expand_runs, flat_index

__all__ = ["FORK_MODES", "dup_mmap"]

FORK_MODES = ("batched", "legacy")
#: page tables planned and committed together: 256 MiB of address space, whose temporaries
#: peak near 2.5 MiB (each chunk is one Work, so fewer chunks mean fewer runner events)
CHUNK_SLOTS = 128
I64 = NDArray[np.int64]
B = NDArray[np.bool_]
_NONE = np.zeros(0, np.int64)
_NONE.flags.writeable = False  # (shared: never written)


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
    for c in copies:  # each chunk's Work goes to the runner as soon as it is written
        for work in c.commit(k, parent, child):  # noqa: UP028 (a runner answers with send())
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
    works: list[Work]
    copy_pages: I64
    deposit_rows: I64
    #: writes the planned copy, yielding Works as it goes (None: nothing to write)
    write: Callable[[], Generator[Work, Any, None]] | None = None

    def commit(self, k: Kernel, parent: Mm, child: Mm) -> Generator[Work, Any, None]:
        """Write the copy, handing over the Works as they are made (and keeping none)."""
        write, self.write = self.write, None  # (it refers to self)
        if write is not None:
            yield from write()
        yield from self.drain()

    def drain(self) -> Generator[Work, Any, None]:
        works, self.works = self.works, []
        yield from works


def _plan_vma(k: Kernel, parent: Mm, child: Mm, src: Vma, dst: Vma, mode: str) -> _VmaCopy:
    """Mirrors: copy_page_range for one VMA (planning and allocation only).

    Each numpy call here runs once per VMA on arrays of one entry per 2 MiB, so it costs its
    call overhead (on this host, 10-25 us when its code has gone cold since the last fork)
    whatever the VMA's size; the usual case, PTE tables only, skips every mask it can."""
    a, pt, ph = k.arch, k.pt, k.phys
    n = a.ptrs_per_table
    slots = pt.pmd_slots(parent.pgd_row, src.start, src.end)
    va, pflat = slots.va, slots.flat
    pmd = pt.flat[pflat]
    if not pmd.all():
        live = pmd != 0
        va, pflat, pmd = va[live], pflat[live], pmd[live]
    copy = _VmaCopy(src, dst, [], _NONE, _NONE)
    if not len(va):
        return copy
    leaf = a.pmd_leaf(pmd)
    tables_only = not leaf.any()  # the usual case: every slot is a PTE table, all copied

    # ---- PMD leaves: copy_huge_pmd (anon only), pinned exclusive ones are split instead
    thp = split = _NONE
    copy_slot: B | None = None  # slots whose PTEs are copied (None: all)
    if not tables_only:
        thp = leaf.nonzero()[0]
        heads = a.pte_pfn(a.pmd_to_pte(pmd[thp]))
        if not src.is_anonymous:
            thp = thp[:0]  # file THPs are refilled by faults
            heads = heads[:0]
        pinned = parent.has_pinned & (ph.pincount[heads] > 0) & ph.anon_exclusive[heads]
        split = thp[pinned]
        thp = thp[~pinned]
        copy_slot = ~leaf
        copy_slot[split] = True

    # ---- child tables for every slot we copy
    child_rows: list[tuple[int, int]] = []
    if copy_slot is None:
        cslots = _child_slots(k, child, va, child_rows)
        cflat_all = cslots.flat  # (a new child: its slots are exactly these)
        if len(cslots.va) != len(va):
            cflat_all = cslots.flat[np.searchsorted(cslots.va, va)]
        fresh = pt.flat[cflat_all] == 0  # tables this fork allocates
        crow = pt.pte_alloc(cflat_all, fresh)
    else:
        want = copy_slot.copy()
        want[thp] = True
        wva = va[want]
        cslots = _child_slots(k, child, wva, child_rows)
        fresh = np.zeros(len(va), bool)
        cflat_all = np.full(len(va), -1, np.int64)
        if len(cslots.va) == len(wva):  # every slot in between is wanted: no search
            cflat_all[want] = cslots.flat
        else:
            cflat_all[want] = cslots.flat[np.searchsorted(cslots.va, wva)]
        crow = np.full(len(va), -1, np.int64)
        sel = copy_slot.nonzero()[0]
        if len(sel):
            fresh[sel] = pt.flat[cflat_all[sel]] == 0
            crow[sel] = pt.pte_alloc(cflat_all[sel])

    # deposit tables for copied THPs (pte_alloc_one in copy_huge_pmd)
    if len(thp):
        copy.deposit_rows = pt.alloc(len(thp), 3)

    # ---- PTE level, CHUNK_SLOTS tables at a time so temporaries stay bounded
    if copy_slot is None:
        prow = pt.rows_of(pmd)
    else:
        prow = np.full(len(va), -1, np.int64)
        normal_tab = copy_slot & ~leaf
        prow[normal_tab] = pt.rows_of(pmd[normal_tab])  # (not of leaves: no table there)
        if len(split):
            prow[split] = [parent.deposit[int(f)] for f in pflat[split]]
    # entries per slot and the first one: only the first and last slot can be partial
    head = max(src.start - int(va[0]), 0) >> 12
    tail = max(int(va[-1]) + (n << 12) - src.end, 0) >> 12
    cnt = np.full(len(va), n, np.int64)
    first = np.zeros(len(va), np.int64)
    first[0] = head
    cnt[0] -= head
    cnt[-1] -= tail
    if copy_slot is None:
        # whole tables, except maybe the first and last: slices, so chunks index by views
        m = len(va)
        chunks: list[I64 | slice] = [slice(i, min(i + CHUNK_SLOTS, m)) for i in range(0, m, CHUNK_SLOTS)]
        partial = {j for j, part in ((0, head), (m - 1, tail)) if part}
        whole = [not any(c.start <= j < c.stop for j in partial) for c in chunks]  # type: ignore[union-attr]
        is_split = None
    else:
        cnt[~copy_slot] = 0
        slots_ = (cnt > 0).nonzero()[0]
        chunks = [slots_[i : i + CHUNK_SLOTS] for i in range(0, len(slots_), CHUNK_SLOTS)]
        whole = [bool((cnt[c] == n).all()) for c in chunks]
        is_split = np.zeros(len(va), bool)
        is_split[split] = True

    def entries(ci: int, virtual: bool) -> tuple[I64 | Rows, I64 | Rows, NDArray[np.uint64], B, B | None]:
        """Parent and child flat indices, parent values and table starts of chunk ``ci``;
        with ``virtual``, tables still to be split are read as the split would fill them."""
        chunk = chunks[ci]
        c_prow, c_crow = prow[chunk], crow[chunk]
        if whole[ci]:  # whole tables: gather rows, not entries
            pidx: I64 | Rows = Rows(c_prow, n)
            cidx: I64 | Rows = Rows(c_crow, n)
            vals = pt.entries[c_prow].ravel()
            starts = np.zeros((len(c_prow), n), bool)
            starts[:, 0] = True
            new_table: B = starts.ravel()
        else:
            c_cnt, c_first = cnt[chunk], first[chunk]
            pidx, off = expand_runs(c_prow * n + c_first, c_cnt)
            cidx = np.repeat(c_crow * n + c_first, c_cnt) + off
            vals = pt.flat[pidx]
            new_table = np.zeros(len(vals), bool)
            new_table[np.cumsum(c_cnt) - c_cnt] = True
        ae_virtual = None
        if virtual and is_split is not None and is_split[chunk].any():
            tab = np.repeat(chunk, cnt[chunk])  # type: ignore[arg-type]  # (an array here)
            sp = is_split[tab]
            base = a.pmd_to_pte(pmd[tab[sp]])
            vals[sp] = a.pte_advance_pfn(base, flat_index(pidx)[sp] % n)
            ae_virtual = np.zeros(len(vals), bool)
            ae_virtual[sp] = ph.anon_exclusive[a.pte_pfn(base)]
        return pidx, cidx, vals, new_table, ae_virtual

    # pinned exclusive pages are copied at fork: count them first to allocate their copies
    # (each chunk's arrays live and die inside one call: they are gone before its Work goes
    # to the runner, instead of staying alive, 1.4 MiB a chunk, while the runner and, in a
    # simulation, other tasks run until the next chunk replaces them)
    def count_copies(ci: int) -> int:
        _, _, vals, new_table, ae_virtual = entries(ci, virtual=True)
        return plan_ptes(k, parent, src, dst, mode, vals, new_table, ae_virtual).n_copy

    def write_chunk(ci: int, copy_pages: I64) -> None:
        pidx, cidx, vals, new_table, _ = entries(ci, virtual=False)
        plan = plan_ptes(k, parent, src, dst, mode, vals, new_table, None)
        assert plan.n_copy == len(copy_pages), "pinned-page count changed between plan and commit"
        plan.commit(k, parent, child, pidx, cidx, copy_pages, copy.works, fresh[chunks[ci]])

    n_copies = [count_copies(ci) for ci in range(len(chunks))] if parent.has_pinned else [0] * len(chunks)
    if sum(n_copies):
        try:
            copy.copy_pages = ph.new_folios(0, sum(n_copies), F_ANON | F_SWAPBACKED)
        except OutOfMemory:
            if len(copy.deposit_rows):
                pt.free(copy.deposit_rows)
                copy.deposit_rows = np.zeros(0, np.int64)
            raise

    def commit() -> Generator[Work, Any, None]:
        if len(split):
            split_ops = Ops()
            split_huge_pmds(k, parent, pflat[split], split_ops)
            copy.works.append(Work("split_huge_pmd", split_ops))
        if len(thp):
            _copy_huge_pmds(k, child, dst, pflat[thp], cflat_all[thp], copy.deposit_rows, copy.works)
        done = 0
        for ci, n_copy in enumerate(n_copies):
            write_chunk(ci, copy.copy_pages[done : done + n_copy])
            done += n_copy
            yield from copy.drain()

    if child_rows:
        upper = Ops()
        upper.add("pgtable_allocs", len(child_rows))
        copy.works.append(Work("pgd_pud_pmd_alloc", upper))
    copy.write = commit
    return copy


def _child_slots(k: Kernel, child: Mm, va: I64, new_rows: list[tuple[int, int]]) -> PmdSlots:
    """Child PMD entries for these slots, allocating upper tables per 1 GiB group."""
    a = k.arch
    if not len(va):
        return PmdSlots(np.zeros(0, np.int64), np.zeros(0, np.int64))
    shift = a.level_shift(1)
    lo, hi = int(va[0]), int(va[-1])  # (sorted)
    if lo >> shift == hi >> shift:  # one PMD table's worth: one walk
        return k.pt.pmd_slots(child.pgd_row, lo, hi + (1 << a.pmd_shift), alloc=True, new_rows=new_rows)
    pud = va >> shift
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
    n = k.arch.ptrs_per_table  # split PMD locks: one per PMD table, parent's and child's
    works.append(Work("copy_huge_pmd", ops, sections=items, locks=("pmd_lock", "pmd_lock"),
                      lock_ids=np.stack([pflat // n, cflat // n], axis=1)))
