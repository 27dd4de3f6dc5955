"""Physical memory: the buddy allocator and folio set-up, below the public API."""

from __future__ import annotations

import numpy as np
import pytest

import mmuemu
from mmuemu.errors import OutOfMemory
from mmuemu.mm.physmem import F_ALLOC, F_ANON, MAX_ORDER, PhysMem


def test_out_of_order_blocks_are_set_up() -> None:
    ph = PhysMem(1024)
    got = ph.new_folios(0, ph.nr_free, F_ANON)
    a = int(got[(got % 4 == 0) & (got > 16)][0])
    ph.ref_sub_and_free(np.array([a, a + 2, a + 3, a + 100]), 1)  # a + 1 stays allocated
    heads = ph.new_folios(0, 4, F_ANON)
    assert sorted(heads.tolist()) == [a, a + 2, a + 3, a + 100]
    assert (ph.flags[heads] & F_ALLOC).all() and (ph.refcount[heads] == 1).all()
    assert ph.flags[a + 1] & F_ALLOC  # its neighbour untouched


@pytest.mark.parametrize("order", [0, 3, 9])
def test_free_merges_back_to_max_order(order: int) -> None:
    ph = PhysMem(1 << 14)
    before = [len(s) for s in ph.free_lists]
    heads = ph.new_folios(order, ph.nr_free >> order if order == 0 else 20, F_ANON)
    assert (ph.order[heads] == order).all()
    ph.ref_sub_and_free(heads[::-1], 1)
    assert [len(s) for s in ph.free_lists] == before
    assert ph.nr_free == (1 << 14) - 1


def test_oom_changes_nothing() -> None:
    ph = PhysMem(1 << 12)
    free = ph.nr_free
    with pytest.raises(OutOfMemory):
        ph.new_folios(MAX_ORDER, 4, F_ANON)  # 4 MiB blocks in 16 MiB minus the zero page
    assert ph.nr_free == free


def test_scatter_add_with_repeats() -> None:
    ph = PhysMem(64)
    arr = np.zeros(64, np.int32)
    idx = np.array([5, 5, 5, 9, 3, 9, 5])
    ph.scatter_add(arr, idx, 2)
    assert arr[5] == 8 and arr[9] == 4 and arr[3] == 2 and arr.sum() == 14


@pytest.mark.parametrize("memory", ["512MiB", "20GiB"])  # (20 GiB: over 4096 free 4 MiB blocks)
def test_bulk_allocations_are_contiguous_and_tables_come_from_the_top(memory: str) -> None:
    """A big populate gets one physical run, even on a reused machine; page tables sit at
    the top of memory, away from it."""
    import mmuemu
    from mmuemu.mm.gup import follow_range

    m = mmuemu.Machine(arch="x86_64", memory=memory)
    for _ in range(2):
        p = m.spawn()
        a = p.mmap(256 << 20, prot="rw", align=2 << 20)
        p.populate(a, 256 << 20)
        pfn, present, _ = follow_range(m.kernel, p.mm, a, a + (256 << 20))
        assert present.all() and (np.diff(pfn) == 1).all()
        pt = m.kernel.pt
        tables = pt.row_pfn[pt.row_level >= 0]
        assert tables.min() > pfn.max()
        p.fork().exit()
        p.exit()
        m.check()


def test_alloc_top_and_low_give_back_the_rest() -> None:
    ph = PhysMem(1 << 14)
    free = ph.nr_free
    low = ph.alloc(0, 100)
    top = ph.alloc(0, 3, top=True)
    assert (np.diff(low) == 1).all() and low[0] == 1
    assert list(top) == [(1 << 14) - 3, (1 << 14) - 2, (1 << 14) - 1]
    assert ph.nr_free == free - 103
    ph.free_blocks(low, 0)
    ph.free_blocks(top, 0)
    assert ph.nr_free == free
    assert [len(s) for s in ph.free_lists][MAX_ORDER] == (1 << 14) // (1 << MAX_ORDER) - 1


def test_order_one_folios_are_refused() -> None:
    ph = PhysMem(1 << 12)
    with pytest.raises(ValueError, match="order-1"):
        ph.new_folios(1, 1, F_ANON)


def test_check_finds_a_free_table_with_entries() -> None:
    import mmuemu

    m = mmuemu.Machine(arch="x86_64", memory="64MiB")
    p = m.spawn()
    a = p.mmap(4 << 20, prot="rw")
    p.populate(a, 4 << 20)
    p.munmap(a, 4 << 20)
    m.check()
    pt = m.kernel.pt
    free = np.flatnonzero(pt.row_level[: pt.rows_touched] < 0)
    assert len(free)
    pt.entries[free[0], 7] = 1
    with pytest.raises(mmuemu.InvariantError, match="free but holds entries"):
        m.check()


def test_expand_runs_with_empty_runs() -> None:
    """Runs of length 0 among longer ones: the lengths sum to the number of runs, which must
    not be mistaken for runs of one each."""
    from mmuemu.runs import expand_runs

    idx, off = expand_runs(np.array([0, 10]), np.array([0, 2]))
    assert idx.tolist() == [10, 11] and off.tolist() == [0, 1]


def test_check_catches_a_stale_highest_block_cache() -> None:
    m = mmuemu.Machine(memory="64MiB")
    p = m.spawn()
    a = p.mmap(4 << 20)
    p.populate(a, 4 << 20)
    p.fork().exit()  # tables come from the top and go back: the cache is filled and kept
    m.check()
    ph = m.kernel.phys
    order = next(o for o in range(11) if ph.highest_cached(o) is not None)
    ph._max_cache[order] += 1
    with pytest.raises(mmuemu.InvariantError, match="cached highest free block"):
        m.check()


def test_max_order_bitmap_follows_the_list_and_finds_the_highest() -> None:
    """The bitmap of free MAX_ORDER blocks changes with every way blocks join or leave the
    list (bulk and single allocations from both ends, frees that merge up to MAX_ORDER), the
    highest block read from it is the list's maximum, and check() notices a wrong bit."""
    from mmuemu.mm.physmem import MAX_ORDER

    m = mmuemu.Machine(memory="256MiB")
    ph = m.kernel.phys

    def agrees() -> None:
        listed = sorted(ph.free_lists[MAX_ORDER])
        assert ph.max_free.nonzero()[0].tolist() == listed
        ph._max_cache.pop(MAX_ORDER, None)
        assert ph._highest(MAX_ORDER) == max(listed)

    agrees()
    low = ph.alloc(MAX_ORDER, 3)  # from the bottom, whole blocks
    top = ph.alloc(0, 5, top=True)  # splits the highest block
    agrees()
    one = ph.new_page_top(0)
    agrees()
    bulk = ph.alloc(0, 3000)  # the low bulk path
    agrees()
    ph.ref_sub_and_free(np.array([one]), 1)  # a page-table page's way back
    agrees()
    for blocks, order in ((bulk, 0), (top, 0), (low, MAX_ORDER)):
        ph.free_blocks(blocks, order)
        agrees()
    m.check()
    ph.max_free[ph.max_free.nonzero()[0][0]] = False
    with pytest.raises(mmuemu.InvariantError, match="bitmap of free order-10 blocks"):
        m.check()


def _free_pages(ph: PhysMem) -> set[int]:
    return {p for j, blocks in enumerate(ph.free_lists) for b in blocks for p in range(b << j, (b + 1) << j)}


@pytest.mark.parametrize("seed", range(8))
def test_bulk_top_allocation_takes_the_top_of_the_highest_block_that_fits(seed: int) -> None:
    """A bulk alloc from the top takes the top of the highest free block that holds it all
    (best fit from the top); when no block is that big, the pages that many single allocs
    from the top take.  On fragmented memory, leaving the buddy lists consistent."""
    import copy

    rng = np.random.default_rng(seed)
    ph = PhysMem(1 << 13)
    held = [(int(o), ph.alloc(int(o), int(rng.integers(1, 40)), top=bool(rng.integers(2))))
            for o in rng.choice([0, 0, 2, 4], size=30)]
    for i in rng.permutation(len(held))[:20]:  # free most of them again, out of order
        ph.free_blocks(held[i][1], held[i][0])
    order = int(rng.choice([0, 2, 4]))
    n = int(rng.integers(2, 60)) if seed % 4 else 300 >> order << 2  # (some too big to fit)
    fit = order + (n - 1).bit_length()
    holders = [(b << j, j) for j in range(fit, MAX_ORDER + 1) for b in ph.free_lists[j]]
    single = copy.deepcopy(ph)
    pages = copy.deepcopy(ph)
    before = _free_pages(ph)
    bulk = ph.alloc(order, n, top=True)
    if seed % 4:  # small requests: a block holds them
        assert holders
        start, j = max(holders)
        end = start + (1 << j)
        assert bulk.tolist() == list(range(end - (n << order), end, 1 << order))
    else:  # too big for any block: piece by piece from the top
        assert not holders
        steps = np.concatenate([single.alloc(order, 1, top=True) for _ in range(n)])
        assert sorted(bulk.tolist()) == sorted(steps.tolist())
    taken = {int(p) + i for p in bulk for i in range(1 << order)}
    assert taken <= before and _free_pages(ph) == before - taken
    assert ph.nr_free == len(before) - len(taken)
    # page-table pages one at a time take what single order-0 allocs from the top take
    zero = copy.deepcopy(pages)
    want = [int(zero.alloc(0, 1, top=True)[0]) for _ in range(n)]
    assert [pages.new_page_top(0) for _ in range(n)] == want
    assert _free_pages(pages) == _free_pages(zero)
    for j in range(MAX_ORDER):
        marked = set(np.flatnonzero(ph.free_order == j + 1).tolist())
        assert marked == {b << j for b in ph.free_lists[j]}
    for j in range(MAX_ORDER + 1):
        cached = ph.highest_cached(j)
        assert cached is None or cached == max(ph.free_lists[j])
    assert ph.max_free.nonzero()[0].tolist() == sorted(ph.free_lists[MAX_ORDER])
