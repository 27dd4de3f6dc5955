"""Physical memory: the buddy allocator and folio set-up, below the public API."""

from __future__ import annotations

import numpy as np
import pytest

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
