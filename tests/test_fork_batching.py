"""Batching is visible in the counters, and both fork modes leave the same state."""

from __future__ import annotations

import numpy as np
import pytest

import mmuemu
from mmuemu.workload import populated

GiB = 1 << 30
MiB = 1 << 20


def _state(m: mmuemu.Machine, procs: list[mmuemu.Process], a: int, n: int) -> dict[str, np.ndarray]:
    """Page-table contents (as entries) and folio accounting of the range, for comparison."""
    from mmuemu.mm.gup import follow_range

    k = m.kernel
    out: dict[str, np.ndarray] = {}
    for i, p in enumerate(procs):
        pfn, present, vals = follow_range(k, p.mm, a, a + n)
        out[f"vals{i}"] = vals
        heads = k.phys.head[pfn[present]]
        out[f"ref{i}"] = k.phys.refcount[heads]
        out[f"map{i}"] = k.phys.mapcount[pfn[present]]
        out[f"large{i}"] = k.phys.large_mapcount[heads]
        out[f"ae{i}"] = k.phys.anon_exclusive[pfn[present]]
    return out


def _forked(mode: str, order: int, size: int) -> tuple[mmuemu.Machine, mmuemu.Measurement, dict]:
    m = mmuemu.Machine(arch="x86_64", memory=f"{2 * size // MiB + 64}MiB", fork_mode=mode)
    p, a = populated(m, size, order)
    with m.measure() as t:
        c = p.fork()
    return m, t, _state(m, [p, c], a, size)


def test_1gib_64k_folios_counts() -> None:
    """16384 folio_ref_ops batched (one per folio), 262144 legacy, identical state."""
    mb, tb, sb = _forked("batched", 4, GiB)
    ml, tl, sl = _forked("legacy", 4, GiB)
    assert tb.counts["folio_ref_ops"] == 16384
    assert tl.counts["folio_ref_ops"] == 262144
    assert tb.counts["fork_batches"] == 16384 and tl.counts["fork_batches"] == 262144
    assert tb.counts["mapcount_ops"] == tl.counts["mapcount_ops"] == 262144
    assert tb.counts["ptes_wrprotected"] == tl.counts["ptes_wrprotected"] == 262144
    assert tb.counts["pte_writes"] == 262144  # the child stores
    assert tb.counts["pte_atomics"] == 262144  # the parent cmpxchg wrprotects
    assert tb.counts["tlb_flush_mm"] == 1 == tl.counts["tlb_flush_mm"]
    # legacy checks every 4 PTEs; batched once per 16-PTE batch (progress 128 >= 32)
    assert tl.counts["resched_checks"] == 512 * (511 // 4)
    assert tb.counts["resched_checks"] == 512 * 31
    for key in sb:
        # pfns differ between machines only if allocation differed: they must not
        assert np.array_equal(sb[key], sl[key]), key
    mb.check()
    ml.check()
    assert tb.ns < tl.ns


@pytest.mark.parametrize("order", [0, 2, 4, 9])
def test_modes_equivalent(order: int) -> None:
    sb = _forked("batched", order, 8 * MiB)[2]
    sl = _forked("legacy", order, 8 * MiB)[2]
    for key in sb:
        assert np.array_equal(sb[key], sl[key]), key


@pytest.mark.parametrize("mode", ["batched", "legacy"])
@pytest.mark.parametrize("order", [0, 4, 9])
def test_first_fork_clears_every_anon_exclusive(mode: str, order: int) -> None:
    """The first fork clears AnonExclusive on every page and counts each clear once; a
    second fork finds none left to clear."""
    m = mmuemu.Machine(arch="x86_64", memory="256MiB", fork_mode=mode)
    p, _ = populated(m, 8 * MiB, order)
    with m.measure() as first:
        p.fork()
    with m.measure() as second:
        p.fork()
    assert first.counts["anon_exclusive_clears"] == 2048
    assert second.counts["anon_exclusive_clears"] == 0
    assert not m.kernel.phys.anon_exclusive.any()
    m.check()


def test_pte_reads_batched_exact() -> None:
    """One read per PTE, plus the read that ends each batch inside a table."""
    _, t, _ = _forked("batched", 4, 2 * MiB)
    # 32 batches of 16: the loop reads 1 + folio_pte_batch 15 + 1 mismatch read (31 batches)
    assert t.counts["pte_reads"] == 32 * 16 + 31


def test_mixed_table_checkpoints() -> None:
    """A table with holes: none entries add 1, order-0 entries 8; checks where progress >= 32."""
    m = mmuemu.Machine(memory="64MiB")
    p = m.spawn()
    a = p.mmap(2 * MiB, align=2 * MiB)
    p.write(a, 1, length=4096 * 3)  # 3 present, then 509 none
    with m.measure() as t:
        p.fork()
    # items: 3 present (+8 each) -> progress 24; none entries +1: check before the item where
    # progress reaches 32 (item 11), then every 32 items: 11, 43, ..., up to 511
    expected = len(range(11, 512, 32))
    assert t.counts["resched_checks"] == expected


@pytest.mark.parametrize("mode", ["batched", "legacy"])
def test_pinned_thp_fork_counts(mode: str) -> None:
    """A pinned PMD THP is split at fork and every (exclusive) page is copied, one
    -EAGAIN / prealloc / retry per page: 1 + 512 passes over the table."""
    m = mmuemu.Machine(memory="64MiB", fork_mode=mode)
    p, a = populated(m, 2 * MiB, 9, pte_mapped=False)
    p.write(a, 3, length=2 * MiB)
    pin = p.pin(a, 2 * MiB, write=True)
    with m.measure() as t:
        c = p.fork()
    assert t.counts["thp_splits"] == 1
    assert t.counts["fork_page_copies"] == 512 == t.counts["prealloc_retries"]
    assert t.counts["copy_pte_range"] == 513
    assert t.counts["fork_batched_ptes"] == 0
    assert (c.read(a, length=2 * MiB) == 3).all() and c.folio(a).order == 0
    assert p.pte(a).write and p.folio(a).order == 9
    pin.release()
    m.check()
