"""Synthetic regions: private anonymous memory populated with folios of one size."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmuemu.machine import Machine
    from mmuemu.process import Process

__all__ = ["populated"]

PMD_SIZE = 2 << 20


def populated(m: Machine, size: int, order: int, *, pte_mapped: bool = True,
              name: str = "parent") -> tuple[Process, int]:
    """A new process with ``size`` bytes of private anonymous memory, every page written,
    in folios of ``order`` (PMD order: PTE-mapped THP unless ``pte_mapped`` is False, the
    setup of the fork-batching measurements).  Returns the process and the address."""
    p = m.spawn(name=name)
    p.set_folio_orders([order])
    a = p.mmap(size, prot="rw", align=PMD_SIZE)
    p.populate(a, size, write=True)
    if order == m.arch.pmd_order and pte_mapped:
        p.split_huge_pmd(a, size)
    return p, a
