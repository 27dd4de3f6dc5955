"""munmap / exit / MADV_DONTNEED: batched and legacy zap, page tables and folios freed."""

from __future__ import annotations

import pytest

import mmuemu
from mmuemu.workload import populated

MiB = 1 << 20


def _populated(mode: str, order: int, size: int = 64 * MiB) -> tuple[mmuemu.Machine, mmuemu.Process, int]:
    m = mmuemu.Machine(memory="256MiB", fork_mode=mode)
    return (m, *populated(m, size, order))


@pytest.mark.parametrize(("mode", "refs"), [("batched", 1024), ("legacy", 16384)])
def test_munmap_64k_counts(mode: str, refs: int) -> None:
    m, p, a = _populated(mode, 4)
    free = m.free_pages
    with m.measure() as t:
        p.munmap(a, 64 * MiB)
    assert t.counts["folio_ref_ops"] == refs  # one reference drop per batch
    assert t.counts["zap_items"] == refs
    assert t.counts["mapcount_ops"] == 16384
    assert t.counts["folios_freed"] == 1024 and t.counts["folios_freed_large"] == 1024
    assert t.counts["pte_clears"] == 16384
    assert p.rss["anon"] == 0
    # data pages and the 32 PTE tables, the PMD table and the PUD table come back
    assert m.free_pages == free + 16384 + 32 + 2
    m.check()


def test_batched_munmap_faster_for_large_folios() -> None:
    times = {}
    for mode in ("batched", "legacy"):
        m, p, a = _populated(mode, 9)
        with m.measure() as t:
            p.munmap(a, 64 * MiB)
        times[mode] = t.ns
    assert times["legacy"] > 2 * times["batched"]


def test_partial_munmap_of_large_folio_keeps_it() -> None:
    m, p, a = _populated("batched", 4, 2 * MiB)
    p.write(a, 5, length=2 * MiB)
    p.munmap(a + 4096, 8192)  # two pages out of the first 64K folio
    f = p.folio(a)
    assert f.order == 4 and f.refcount == 14 and f.large_mapcount == 14
    assert p.read(a) == 5 and p.read(a + 3 * 4096) == 5
    with pytest.raises(mmuemu.SegmentationFault):
        p.read(a + 4096)
    m.check()


def test_dontneed_refaults_zero() -> None:
    m, p, a = _populated("batched", 0, 2 * MiB)
    p.write(a, 9, length=2 * MiB)
    p.madvise(a, MiB, "dontneed")
    assert p.rss["anon"] == 256
    assert p.read(a) == 0 and p.read(a + MiB) == 9
    m.check()


def test_munmap_pmd_thp_frees_deposit() -> None:
    m = mmuemu.Machine(memory="64MiB")
    p = m.spawn()
    p.set_folio_orders([9])
    a = p.mmap(4 * MiB, align=2 * MiB)
    free = m.free_pages
    p.populate(a, 4 * MiB)
    assert free - m.free_pages == 1024 + 2 + 2  # two THPs, two deposited tables, PUD+PMD tables
    p.munmap(a, 4 * MiB)
    assert m.free_pages == free
    m.check()
