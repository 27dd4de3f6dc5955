"""get_user_pages: FOLL_GET references and FOLL_PIN pins, with the unshare rules.

Mirrors: mm/gup.c __get_user_pages / follow_page_mask / try_grab_folio and
gup_must_unshare: a R/O pin of an anon page that is not known to be exclusive first unshares
it (FAULT_FLAG_UNSHARE), so the pin sees the process's later writes; a FOLL_LONGTERM one also
replaces the shared zero page and page-cache pages of private mappings by anon copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from typing import Any

import numpy as np
from attrs import define, field
from numpy.typing import NDArray

from mmuemu.errors import InvalidArgument
from mmuemu.mm.fault import fault_range
from mmuemu.mm.mm import Kernel, Mm
from mmuemu.mm.physmem import F_RESERVED, GUP_PIN_COUNTING_BIAS
from mmuemu.mm.work import Ops, Work
from mmuemu.runs import expand_runs

__all__ = ["GupHandle", "follow_range", "gup"]

I64 = NDArray[np.int64]
_ids = itertools.count(1)


def follow_range(k: Kernel, mm: Mm, start: int, end: int) -> tuple[I64, NDArray[np.bool_], NDArray[np.uint64]]:
    """Mirrors: follow_page_mask over [start, end): (PFN, present, entry) per page.

    PMD leaves yield their subpages, with the leaf's entry seen as a PTE.
    """
    a, pt = k.arch, k.pt
    n = a.ptrs_per_table
    npages = (end - start) >> 12
    pfn = np.zeros(npages, np.int64)
    vals = np.zeros(npages, np.uint64)
    slots = pt.pmd_slots(mm.pgd_row, start, end)
    if len(slots.va):
        pmd = pt.flat[slots.flat]
        lo = np.maximum(slots.va, start)
        hi = np.minimum(slots.va + (n << 12), end)
        cnt = (hi - lo) >> 12
        page0 = (lo - start) >> 12
        leaf = a.pmd_leaf(pmd)
        tabs = (pmd != 0) & ~leaf
        if tabs.any():
            rows = pt.rows_of(pmd[tabs])
            idx, off = expand_runs(rows * n + ((lo[tabs] - slots.va[tabs]) >> 12), cnt[tabs])
            pos = np.repeat(page0[tabs], cnt[tabs]) + off
            vals[pos] = pt.flat[idx]
        if leaf.any():
            sub = (lo[leaf] - slots.va[leaf]) >> 12
            base = a.pmd_to_pte(pmd[leaf])
            pos, off = expand_runs(page0[leaf], cnt[leaf])
            vals[pos] = a.pte_advance_pfn(np.repeat(base, cnt[leaf]), np.repeat(sub, cnt[leaf]) + off)
    present = a.pte_present(vals) & (vals != 0)
    pfn[present] = a.pte_pfn(vals[present])
    return pfn, present, vals


@define(eq=False)
class GupHandle:
    """Pages held by get_pages (FOLL_GET) or pin (FOLL_PIN): they stay allocated, and
    ``read()`` sees their contents whatever the page tables map now."""

    k: Kernel
    pfns: I64
    pin: bool
    longterm: bool
    write: bool
    id: int = field(factory=lambda: next(_ids))
    released: bool = False

    def read(self) -> NDArray[np.int64]:
        """The tokens of the held pages (as a DMA read would see them)."""
        if self.released:
            raise InvalidArgument("read of a released page reference")
        return self.k.phys.token[self.pfns].copy()

    def refs(self) -> tuple[I64, I64, I64]:
        """(folio heads, refcount held, pincount held) of this handle, one row per page."""
        ph = self.k.phys
        held = self.pfns[(ph.flags[self.pfns] & F_RESERVED) == 0]
        heads = ph.head[held].astype(np.int64)
        if not self.pin:
            return heads, np.ones(len(heads), np.int64), np.zeros(len(heads), np.int64)
        large = ph.order[heads] > 0
        ref = np.where(large, 1, GUP_PIN_COUNTING_BIAS).astype(np.int64)
        return heads, ref, large.astype(np.int64)

    def release(self) -> None:
        """Mirrors: put_page / unpin_user_pages."""
        if self.released:
            raise InvalidArgument("page reference released twice")
        heads, ref, pins = self.refs()
        np.subtract.at(self.k.phys.pincount, heads, pins.astype(np.int32))
        self.released = True
        del self.k.gup_handles[self.id]
        self.k.phys.ref_sub_and_free(heads, ref)


def gup(k: Kernel, mm: Mm, start: int, length: int, *, pin: bool, write: bool,
        longterm: bool) -> Generator[Work, Any, GupHandle]:
    """Mirrors: __get_user_pages: fault in as needed, then grab each page."""
    if start % 4096 or length <= 0:
        raise InvalidArgument(f"gup: range ({start:#x}, {length}) must be page aligned and non-empty")
    end = start + ((length + 4095) & ~4095)
    # faultin_page where follow_page_mask fails; FOLL_TOUCH marks the folio, not the PTE
    yield from fault_range(k, mm, start, end, write=write, touch=False)
    if pin and not write:  # gup_must_unshare: a R/O pin must not see a page COW may replace
        yield from fault_range(k, mm, start, end, write=False, touch=False,
                               unshare="longterm" if longterm else "pin")
    pfns, _, _ = follow_range(k, mm, start, end)
    h = GupHandle(k, pfns, pin, longterm, write)
    heads, ref, pins = h.refs()
    np.add.at(k.phys.refcount, heads, ref.astype(np.int32))
    np.add.at(k.phys.pincount, heads, pins.astype(np.int32))
    if pin:
        mm.has_pinned = True
    k.gup_handles[h.id] = h
    ops = Ops()
    ops.add("gup_pages", len(pfns))
    ops.add("folio_ref_ops", len(heads))
    yield Work("gup", ops)
    return h
