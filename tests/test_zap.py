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


def _zap_outcome(chunk: int, mode: str, order: int, thp: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Counts, simulated time, free pages, folio state and page tables after a munmap that
    cuts into its first and last PTE tables, zapped ``chunk`` tables per Work; with ``thp``
    the VMA holds PMD-mapped THPs after 8 MiB of PTE-mapped ones."""
    monkeypatch.setattr(mmuemu.mm.zap, "CHUNK_TABLES", chunk)
    m = mmuemu.Machine(memory="256MiB", fork_mode=mode)
    p = m.spawn()
    p.set_folio_orders([9, order] if thp else [order])
    a = p.mmap(24 * MiB, prot="rw", align=2 * MiB)
    if thp:
        p.madvise(a, 24 * MiB, "hugepage")
    p.populate(a, 24 * MiB, write=True)
    if thp or order == 9:
        p.split_huge_pmd(a, 8 * MiB if thp else 24 * MiB)
    k = m.kernel
    with m.measure() as t:
        p.munmap(a + 12 * 4096, 22 * MiB - 20 * 4096)
    m.check()
    ph = k.phys
    return (dict(t.counts), t.ns, m.free_pages, ph.refcount.tolist(), ph.mapcount.tolist(),
            ph.large_mapcount.tolist(), k.pt.flat[: k.pt.rows_touched * 512].tolist())


@pytest.mark.parametrize("mode", ["batched", "legacy"])
@pytest.mark.parametrize(("order", "thp"), [(0, False), (4, False), (9, False), (0, True)])
def test_zap_in_chunks_equals_zap_at_once(mode: str, order: int, thp: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """zap_range hands over a Work per CHUNK_TABLES tables; how it is cut changes nothing a
    user can see: counts, time, flushes, folios and page tables."""
    at_once = _zap_outcome(10**6, mode, order, thp, monkeypatch)
    assert at_once[0]["pte_clears"] > 0
    assert at_once[0].get("folios_freed_large", 0) > 0 or order == 0
    assert at_once[0].get("pmd_clears", 0) > 0 or not thp
    for chunk in (1, 3):
        assert _zap_outcome(chunk, mode, order, thp, monkeypatch) == at_once
