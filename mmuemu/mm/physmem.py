"""Physical memory: page frames and folios as structure-of-arrays, over the buddy
allocator of :mod:`mmuemu.mm.buddy`.

Every array is indexed by PFN; large folios have order >= 2 (as anon mTHP in the kernel).
Per-page fields (token, mapcount, AnonExclusive, head) are meaningful for every page of an
allocated folio; so are the folio's order and flags, which are copied to every page so that
a contiguous range of pages reads them as a slice (F_ALLOC marks the head only).  Per-folio
counts (refcount, entire and large mapcounts, pin count) are indexed by the folio's head
PFN; as in struct folio, the last three are stored in the first tail pages (views of the
refcount array at offsets 1..3), so they exist for large folios only.  Arrays are made with
``np.zeros`` so untouched frames cost no host memory.

Mapcounts are stored as counts (the kernel's ``_mapcount`` is this minus one).
"""

from __future__ import annotations

import numpy as np
from attrs import define, field
from numpy.typing import NDArray

from mmuemu.mm.buddy import MAX_ORDER, BuddyAllocator
from mmuemu.runs import expand_runs

__all__ = [
    "F_ALLOC",
    "F_ANON",
    "F_PGTABLE",
    "F_RESERVED",
    "F_SWAPBACKED",
    "GUP_PIN_COUNTING_BIAS",
    "MAX_ORDER",
    "ZERO_PFN",
    "PhysMem",
]

#: a FOLL_PIN on a small folio adds this to its refcount (include/linux/mm.h)
GUP_PIN_COUNTING_BIAS = 1024
ZERO_PFN = 0

F_ALLOC = np.uint8(1)  # allocated folio head
F_ANON = np.uint8(2)  # folio_test_anon
F_SWAPBACKED = np.uint8(4)  # shmem / anon
F_PGTABLE = np.uint8(8)  # a page-table page
F_RESERVED = np.uint8(16)  # the shared zero page

I64 = NDArray[np.int64]
Idx = NDArray[np.integer]  # any integer index array


@define(eq=False)
class PhysMem(BuddyAllocator):
    """The PFN space of one machine: the buddy allocator's free blocks, and the folios
    allocated from it as arrays by PFN."""

    token: NDArray[np.int64] = field(init=False)
    mapcount: NDArray[np.int32] = field(init=False)
    anon_exclusive: NDArray[np.bool_] = field(init=False)
    head: NDArray[np.int32] = field(init=False)  # folio head of each allocated page
    order: NDArray[np.int8] = field(init=False)
    refcount: NDArray[np.int32] = field(init=False)
    entire_mapcount: NDArray[np.int32] = field(init=False)
    large_mapcount: NDArray[np.int32] = field(init=False)
    pincount: NDArray[np.int32] = field(init=False)
    flags: NDArray[np.uint8] = field(init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        n = self.nr_pages
        self.token = np.zeros(n, dtype=np.int64)
        self.mapcount = np.zeros(n, dtype=np.int32)
        self.anon_exclusive = np.zeros(n, dtype=bool)
        self.head = np.zeros(n, dtype=np.int32)
        self.order = np.zeros(n, dtype=np.int8)
        # like struct folio, the large-folio counts live in the first tail pages: views of
        # one array at offsets 1, 2, 3 (large folios have order >= 2, so these are theirs)
        words = np.zeros(n + 3, dtype=np.int32)
        self.refcount = words[:n]
        self.large_mapcount = words[1 : n + 1]
        self.pincount = words[2 : n + 2]
        self.entire_mapcount = words[3 : n + 3]
        self.flags = np.zeros(n, dtype=np.uint8)
        self.flags[ZERO_PFN] = F_ALLOC | F_RESERVED
        self.refcount[ZERO_PFN] = 1
        self._add_free_range(ZERO_PFN + 1, n)

    # ------------------------------------------------------------------ pages
    def new_page_top(self, flags: np.uint8 | int) -> int:
        """One order-0 page from the top with refcount 1: ``new_folios(0, 1, flags, top=True)``
        in plain Python (page tables of a walk come one at a time)."""
        self._check_alloc(0, 1)
        pfn, _ = self._take_top(0, 1)
        self._init_page(pfn, flags)
        return pfn

    def _init_page(self, pfn: int, flags: np.uint8 | int) -> None:
        """An order-0 folio at ``pfn`` with refcount 1, in scalar writes."""
        self.head[pfn] = pfn
        self.refcount[pfn] = 1
        self.flags[pfn] = F_ALLOC | flags

    # ------------------------------------------------------------------ folios
    def new_folios(self, order: int, n: int, flags: np.uint8, top: bool = False) -> I64:
        """Allocate ``n`` folios of ``order`` with refcount 1 and zeroed contents (``top``:
        from the top of memory, see :meth:`alloc`)."""
        if order == 1:
            raise ValueError("order-1 folios are not supported: large folios have order >= 2")
        heads = self.alloc(order, n, top)
        if n == 1 and not order:  # one page: scalar writes
            self._init_page(int(heads[0]), flags)
            return heads
        nr = 1 << order
        # one run?  From the top the blocks come in address order (see _alloc_top), so their
        # ends say it; otherwise every step is checked
        if len(heads) and (len(heads) == 1 or (int(heads[-1]) - int(heads[0]) == (n - 1) * nr if top
                                               else bool((np.diff(heads) == nr).all()))):
            # one physically contiguous run (the usual bulk case): slices, not scatters
            lo, hi = int(heads[0]), int(heads[-1]) + nr
            pages: slice | I64 = slice(lo, hi)
            hs: slice | I64 = slice(lo, hi, nr)
            self.head[lo:hi] = np.repeat(heads, nr) if order else heads
        else:
            hs = heads
            if order:
                pages, _ = expand_runs(heads, np.full(len(heads), nr, dtype=np.int64))
                self.head[pages] = np.repeat(heads, nr)
            else:
                pages = heads
                self.head[pages] = pages
        # contents (token), mapcounts, pin count and AnonExclusive are zero on every free
        # page (freeing guarantees it), so they are not written here: untouched arrays cost
        # no host memory, and a page whose content is never set never costs its token
        if order:
            self.order[pages] = order
            self.flags[pages] = flags
        self.refcount[hs] = 1
        self.flags[hs] = F_ALLOC | flags
        return heads

    def scatter_add(self, arr: NDArray[np.int32], idx: Idx, val: Idx | int) -> None:
        """``arr[idx] += val`` where ``idx`` may repeat (like np.add.at, much faster).

        Adjacent repeats (pages of one folio in address order) are summed first; indices
        that are then strictly increasing are unique; others go through np.add.at.
        """
        idx = np.asarray(idx)
        if len(idx) <= 1:
            if len(idx):
                arr[idx] += np.asarray(val, dtype=arr.dtype).reshape(-1)[:1]
            return
        val = np.broadcast_to(np.asarray(val, dtype=arr.dtype), idx.shape)
        if len(idx) > 1:
            step = np.diff(idx)
            if (step > 0).all():
                arr[idx] += val
                return
            same = step == 0
            if same.any():
                starts = np.concatenate([[0], np.flatnonzero(~same) + 1])
                val = np.add.reduceat(val, starts)
                idx = idx[starts]
                if len(idx) == 1 or (np.diff(idx) > 0).all():
                    arr[idx] += val
                    return
        np.add.at(arr, idx, val)

    def ref_sub_and_free(self, heads: Idx, nr: Idx | int) -> NDArray[np.int8]:
        """Mirrors: folio_ref_sub / folio_put; frees folios whose refcount reaches 0.

        Returns the orders of the folios freed.
        """
        heads = np.asarray(heads, dtype=np.int64)
        self.scatter_add(self.refcount, heads, -np.asarray(nr, dtype=np.int64))
        return self.free_dead(heads[self.refcount[heads] == 0])

    def free_dead(self, dead: I64) -> NDArray[np.int8]:
        """Free these folios, whose last reference is gone (a head may repeat); return the
        orders of the folios freed."""
        if len(dead) > 1:
            dead = np.unique(dead)
        orders = self.order[dead]
        if len(dead):
            self.free_folios(dead)
        return orders

    def free_folios(self, heads: I64) -> None:
        """Mirrors: free_unref_folios: give the pages of dead folios back to the buddy."""
        orders = self.order[heads]
        for order in np.unique(orders).tolist():
            hs = heads[orders == order]
            if order:
                pages, _ = expand_runs(hs, np.full(len(hs), 1 << order, dtype=np.int64))
                self.order[pages] = 0
            else:
                pages = hs
            self.head[pages] = 0
            self.anon_exclusive[pages] = False
            self.flags[pages] = 0
            written = pages[self.token[pages] != 0]  # (reading leaves untouched memory alone)
            if len(written):
                self.token[written] = 0
            if order:  # only after a bug; keeps the "zero when free" promise
                for arr in (self.pincount, self.entire_mapcount, self.large_mapcount):
                    if arr[hs].any():
                        arr[hs] = 0
            self.free_blocks(hs, order)

    def folio_maybe_dma_pinned(self, heads: Idx) -> NDArray[np.bool_]:
        """Mirrors: folio_maybe_dma_pinned (pincount for large folios, bias for small)."""
        large = self.order[heads] > 0
        return np.where(large, self.pincount[heads] > 0, self.refcount[heads] >= GUP_PIN_COUNTING_BIAS)
