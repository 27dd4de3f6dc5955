"""The buddy allocator: free page blocks of orders 0..MAX_ORDER, by PFN.

Mirrors: mm/page_alloc.c (__rmqueue_smallest, expand, __free_one_page) for one zone, without
per-CPU lists or migrate types.  Free blocks are kept per order as sets of block numbers
(start PFN >> order), and, for the buddies a free can merge with, as ``free_order`` marks
in a per-PFN array.  :class:`~mmuemu.mm.physmem.PhysMem` adds the folios on top.
"""

from __future__ import annotations

import itertools

import numpy as np
from attrs import define, field
from numpy.typing import NDArray

from mmuemu.errors import OutOfMemory
from mmuemu.runs import expand_runs

__all__ = ["MAX_ORDER", "BuddyAllocator"]

MAX_ORDER = 10

#: free lists up to this long are searched for the lowest (highest) blocks
_CHOOSE_MAX = 4096
#: allocations of at least this many blocks are made in address order
_BULK = 16

I64 = NDArray[np.int64]


@define(eq=False)
class BuddyAllocator:
    """Free blocks of ``nr_pages`` page frames; all of them are in use until freed (the
    owner frees what it does not reserve)."""

    nr_pages: int
    #: order + 1 at the start of free blocks below MAX_ORDER (the buddies a free can merge
    #: with); MAX_ORDER blocks never merge and are not marked, so a fresh machine's array
    #: stays untouched
    free_order: NDArray[np.uint8] = field(init=False)
    #: free blocks per order, as block numbers (start PFN >> order): small consecutive ints
    #: iterate in ascending order from a set, so bulk allocations come out contiguous
    free_lists: list[set[int]] = field(init=False)
    #: highest block number per order, while its free list is unchanged
    _max_cache: dict[int, int] = field(init=False, factory=dict)
    #: the MAX_ORDER free list as a bitmap by block number: its highest block is found by a
    #: numpy scan instead of comparing hundreds of Python ints after each one taken
    max_free: NDArray[np.bool_] = field(init=False)
    nr_free: int = field(init=False, default=0)
    #: allocation-failure injection: number of allocation calls left before one fails
    fail_countdown: int | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        n = self.nr_pages
        self.free_order = np.zeros(n, dtype=np.uint8)
        self.free_lists = [set() for _ in range(MAX_ORDER + 1)]
        self.max_free = np.zeros((n >> MAX_ORDER) + 1, dtype=bool)

    def _cache_add(self, order: int, block: int) -> None:
        """A block joined list ``order``: the cached highest block stays right."""
        c = self._max_cache.get(order)
        if c is not None and block > c:
            self._max_cache[order] = block

    def _cache_remove(self, order: int, top: int) -> None:
        """Blocks up to ``top`` left list ``order``: forget its highest only if it went."""
        if self._max_cache.get(order) == top:
            del self._max_cache[order]

    def _add_block(self, start: int, order: int) -> None:
        self.free_lists[order].add(start >> order)
        self._cache_add(order, start >> order)
        if order < MAX_ORDER:
            self.free_order[start] = order + 1
        else:
            self.max_free[start >> MAX_ORDER] = True
        self.nr_free += 1 << order

    def _add_free_range(self, lo: int, hi: int) -> None:
        """Free [lo, hi) as maximal naturally aligned blocks."""
        while lo < hi:
            # the largest order that lo is aligned to and that fits below hi
            order = min(MAX_ORDER, (lo & -lo).bit_length() - 1 if lo else MAX_ORDER, (hi - lo).bit_length() - 1)
            self._add_block(lo, order)
            lo += 1 << order

    def _pop_blocks(self, order: int, n: int) -> I64:
        """Take ``n`` free blocks of ``order``: the lowest ones, so that bulk allocations
        come out physically contiguous; from a long list of scattered blocks, any ``n`` of
        them (choosing would cost more than the allocation)."""
        blocks = self.free_lists[order]
        if n >= len(blocks):
            arr = np.fromiter(blocks, dtype=np.int64, count=len(blocks))
            blocks.clear()
        elif len(blocks) <= _CHOOSE_MAX or 16 * n >= len(blocks):
            every = np.fromiter(blocks, dtype=np.int64, count=len(blocks))
            arr = np.partition(every, n - 1)[:n]
            blocks.difference_update(arr.tolist())
        else:
            arr = np.fromiter(itertools.islice(blocks, n), dtype=np.int64, count=n)
            blocks.difference_update(arr.tolist())
        arr.sort()
        if len(arr):
            self._cache_remove(order, int(arr[-1]))
        if order == MAX_ORDER:
            self.max_free[arr] = False
        arr <<= order
        if order < MAX_ORDER:
            self.free_order[arr] = 0
        self.nr_free -= len(arr) << order
        return arr

    def available(self, order: int) -> int:
        """How many blocks of ``order`` could be allocated now."""
        if order == 0:
            return self.nr_free
        return sum(len(self.free_lists[j]) << (j - order) for j in range(order, MAX_ORDER + 1))

    def _check_alloc(self, order: int, n: int) -> None:
        """Raise OutOfMemory if ``n`` blocks of ``order`` cannot be had (or a failure is
        injected here)."""
        if self.fail_countdown is not None:
            if self.fail_countdown == 0:
                self.fail_countdown = None
                raise OutOfMemory(f"injected allocation failure (order {order}, {n} blocks)")
            self.fail_countdown -= 1
        if (self.nr_free if order == 0 else self.available(order)) < n:
            raise OutOfMemory(
                f"out of memory: need {n} blocks of order {order}, "
                f"{self.nr_free} pages free (largest orders exhausted)"
            )

    def alloc(self, order: int, n: int = 1, top: bool = False) -> I64:
        """Allocate ``n`` blocks of ``order`` (lowest orders first, splitting larger blocks).

        Mirrors: mm/page_alloc.c __rmqueue_smallest / expand.  Raises OutOfMemory, changing
        nothing, when the request cannot be met in full.  Blocks come from the bottom of
        physical memory, or with ``top`` from its top (page tables: which PFNs a page gets
        is not kernel semantics, and keeping tables apart keeps user memory contiguous).
        """
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        self._check_alloc(order, n)
        if top:
            return self._alloc_top(order, n)
        if n >= _BULK:
            bulk = self._alloc_low(order, n)
            if bulk is not None:
                return bulk
        out: list[I64] = []
        remaining = n
        for j in range(order, MAX_ORDER + 1):
            if not self.free_lists[j]:
                continue
            per = 1 << (j - order)
            blocks = self._pop_blocks(j, -(-remaining // per))
            if per == 1:
                subs = blocks
            else:
                subs = (blocks[:, None] + (np.arange(per, dtype=np.int64) << order)[None, :]).ravel()
            use = subs[:remaining]
            out.append(use)
            remaining -= len(use)
            if len(subs) > len(use):  # the unused part of the split block goes back
                self._add_free_range(int(subs[len(use)]), int(blocks[-1]) + (1 << j))
            if remaining == 0:
                break
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _alloc_low(self, order: int, n: int) -> I64 | None:
        """A bulk alloc in address order: the lowest free blocks first, split as needed, so
        that what a big populate gets is as contiguous as free memory allows.  None when
        there are too many free blocks to sort (fragmented memory: contiguity is lost)."""
        lists = [(j, self.free_lists[j]) for j in range(order, MAX_ORDER + 1) if self.free_lists[j]]
        if sum(len(b) for _, b in lists) > 16 * _CHOOSE_MAX:
            return None
        start = np.concatenate([np.fromiter(b, np.int64, len(b)) << j for j, b in lists])
        orders = np.concatenate([np.full(len(b), j, np.int64) for j, b in lists])
        o = np.argsort(start)
        start, orders = start[o], orders[o]
        pieces = np.int64(1) << (orders - order)
        cum = np.cumsum(pieces)
        k = int(np.searchsorted(cum, n)) + 1  # blocks used, the last one maybe in part
        start, orders, pieces = start[:k], orders[:k], pieces[:k].copy()
        for j in np.unique(orders).tolist():
            gone = start[orders == j] >> j
            self.free_lists[j].difference_update(gone.tolist())
            self._cache_remove(j, int(gone.max()))
            if j == MAX_ORDER:
                self.max_free[gone] = False
        self.free_order[start[orders < MAX_ORDER]] = 0
        self.nr_free -= int((np.int64(1) << orders).sum())
        spare = int(cum[k - 1]) - n
        if spare:  # the top of the last block goes back
            pieces[-1] -= spare
            end = int(start[-1]) + (1 << int(orders[-1]))
            self._add_free_range(end - (spare << order), end)
        heads, off = expand_runs(start, pieces)
        return heads + (off << order) - off

    def highest_cached(self, order: int) -> int | None:
        """The cached highest free block number of ``order`` (None: not cached)."""
        return self._max_cache.get(order)

    def _highest(self, order: int) -> int:
        """The highest free block number of ``order`` (cached until the list changes)."""
        b = self._max_cache.get(order)
        if b is None:
            if order == MAX_ORDER:  # (the list is not empty)
                b = len(self.max_free) - 1 - int(self.max_free[::-1].argmax())
            else:
                b = max(self.free_lists[order])
            self._max_cache[order] = b
        return b

    def _top_block(self, order: int) -> tuple[int, int]:
        """The highest free block of ``order`` or above: (its order, its start PFN).  A
        plain loop: building the per-order dict that :meth:`_alloc_top` keeps cost about
        13k instructions more per page, four pages per fork."""
        lists, cache = self.free_lists, self._max_cache
        best_j, best = -1, -1
        for j in range(order, MAX_ORDER + 1):
            if lists[j]:
                b = cache.get(j)
                if b is None:
                    b = self._highest(j)
                if b << j > best:
                    best_j, best = j, b << j
        return best_j, best

    def _take_top(self, order: int, n: int, block: tuple[int, int] | None = None) -> tuple[int, int]:
        """Take the highest free block (or ``block``, as (order, start PFN)) and split off
        its top ``n`` blocks of ``order`` at most; the rest goes back.  Returns (first PFN
        taken, blocks taken)."""
        best_j, best = block or self._top_block(order)
        self.free_lists[best_j].remove(best >> best_j)
        self._max_cache.pop(best_j, None)
        if best_j < MAX_ORDER:
            self.free_order[best] = 0
        else:
            self.max_free[best >> MAX_ORDER] = False
        self.nr_free -= 1 << best_j
        per = 1 << (best_j - order)
        take = min(per, n)
        lo = best + ((per - take) << order)
        if take < per:  # the rest of the block goes back
            self._add_free_range(best, lo)
        return lo, take

    def _alloc_top(self, order: int, n: int) -> I64:
        """alloc from the top: the top ``n`` blocks of the highest free block that holds them
        all (one split; for one block, the highest free block); when none is that big, split
        the highest free block, again while more are needed.  (A fork's child takes its PTE
        tables right after its upper tables split the top block: taking the highest pages
        instead took ~8 buddy remainders one by one, a third of a fork's fixed cost.)

        The piecewise path: only the list a block was taken from changes until the last
        split, so each order's highest block is looked up once and then only for that list.
        The blocks come back in address order: usually one run, made by one numpy call."""
        fit = order + (n - 1).bit_length()  # the least order of a block holding all n
        if fit <= MAX_ORDER:
            block = self._top_block(fit)
            if block[0] >= 0:
                lo, _ = self._take_top(order, n, block)
                return np.arange(lo, lo + (n << order), 1 << order, dtype=np.int64)
        tops = {j: self._highest(j) << j for j in range(order, MAX_ORDER + 1) if self.free_lists[j]}
        pieces: list[tuple[int, int]] = []  # (first PFN, blocks), highest first
        remaining = n
        while remaining:
            j = max(tops, key=tops.__getitem__)
            lo, take = self._take_top(order, remaining, (j, tops[j]))
            pieces.append((lo, take))
            remaining -= take
            if not remaining:
                break
            if self.free_lists[j]:
                tops[j] = self._highest(j) << j
            else:
                del tops[j]
        step = 1 << order
        lo, hi = pieces[-1][0], pieces[0][0] + (pieces[0][1] << order)
        if hi - lo == n << order:  # the pieces are one run (split remainders of one block)
            return np.arange(lo, hi, step, dtype=np.int64)
        return np.concatenate([np.arange(p, p + (t << order), step, dtype=np.int64) for p, t in reversed(pieces)])

    def free_blocks(self, starts: I64, order: int) -> None:
        """Return blocks of ``order`` to the buddy lists, merging with free buddies.

        Mirrors: mm/page_alloc.c __free_one_page, for many blocks at once.
        """
        if len(starts) <= 4:  # a few blocks (a page table, one folio): merge one by one
            for b in sorted(int(x) for x in starts):
                self._free_one(b, order)
            return
        starts = np.sort(np.asarray(starts, dtype=np.int64))
        k = order
        while len(starts):
            if k == MAX_ORDER:
                self._add_blocks(starts, k)
                break
            bud = starts ^ (1 << k)
            ok = bud < self.nr_pages
            budc = np.where(ok, bud, 0)
            in_lists = ok & (self.free_order[budc] == k + 1)
            pos = np.minimum(np.searchsorted(starts, budc), len(starts) - 1)
            in_new = ok & (starts[pos] == budc)
            merge = in_lists | in_new
            self._add_blocks(starts[~merge], k)
            pre = budc[in_lists]
            if len(pre):
                self.free_lists[k].difference_update((pre >> k).tolist())
                self._cache_remove(k, int(pre.max()) >> k)
                self.free_order[pre] = 0
                self.nr_free -= len(pre) << k
            starts = np.unique(np.minimum(starts[merge], budc[merge]))
            k += 1

    def _free_one(self, start: int, order: int) -> None:
        """free_blocks for one block, merging with its free buddies in plain Python."""
        fo = self.free_order
        while order < MAX_ORDER:
            bud = start ^ (1 << order)
            if bud >= self.nr_pages or fo[bud] != order + 1:
                break
            self.free_lists[order].discard(bud >> order)
            self._cache_remove(order, bud >> order)
            fo[bud] = 0
            self.nr_free -= 1 << order
            start = min(start, bud)
            order += 1
        self._add_block(start, order)

    def _add_blocks(self, starts: I64, order: int) -> None:
        if len(starts):
            self.free_lists[order].update((starts >> order).tolist())
            self._cache_add(order, int(starts.max()) >> order)
            if order < MAX_ORDER:
                self.free_order[starts] = order + 1
            else:
                self.max_free[starts >> order] = True
            self.nr_free += len(starts) << order
