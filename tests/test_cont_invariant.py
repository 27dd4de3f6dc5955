"""m.check() on arm64 verifies every CONT block: 16 valid entries of one folio, aligned,
with equal attributes (young and dirty aside)."""

from __future__ import annotations

import numpy as np
import pytest

import mmuemu
from mmuemu.mm.gup import follow_range

CONT = np.uint64(1 << 52)
AF = np.uint64(1 << 10)
PAGE = 4096


def _machine_with_64k_folios() -> tuple[mmuemu.Machine, np.ndarray]:
    """A 64K-folio range on plain arm64; returns the flat indices of its entries."""
    m = mmuemu.Machine(arch="arm64", memory="64MiB")
    p = m.spawn()
    p.set_folio_orders([4])
    a = p.mmap(2 << 20, prot="rw", align=2 << 20)
    p.populate(a, 2 << 20)
    slots = m.kernel.pt.pmd_slots(p.mm.pgd_row, a, a + (2 << 20))
    row = m.kernel.pt.rows_of(m.kernel.pt.flat[slots.flat])[0]
    pfn, present, _ = follow_range(m.kernel, p.mm, a, a + (2 << 20))
    assert present.all() and pfn[0] % 16 == 0
    return m, row * 512 + np.arange(512)


def test_a_whole_block_may_be_cont_with_mixed_young_bits() -> None:
    m, idx = _machine_with_64k_folios()
    flat = m.kernel.pt.flat
    flat[idx[:16]] |= CONT
    flat[idx[3]] &= ~AF  # young/dirty may differ inside a block
    m.check()


@pytest.mark.parametrize("damage", ["one entry", "misaligned", "other attrs"])
def test_broken_blocks_are_found(damage: str) -> None:
    m, idx = _machine_with_64k_folios()
    flat = m.kernel.pt.flat
    if damage == "one entry":
        flat[idx[5]] |= CONT
    elif damage == "misaligned":  # a block made of the halves of two folios
        flat[idx[16:32]] |= CONT
        flat[idx[16:24]] = m.kernel.arch.pte_advance_pfn(flat[idx[16:24]], 16)
    else:
        flat[idx[:16]] |= CONT
        flat[idx[7]] |= np.uint64(1 << 2)  # another AttrIndx (memory type) on one entry only
    with pytest.raises(mmuemu.InvariantError, match="contiguous block"):
        m.check()
