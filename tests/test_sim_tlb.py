"""The SimPy runner's TLBs: threads writing during fork, shootdowns (x86 IPIs, arm64
broadcast TLBIs) and the reach of contpte entries."""

from __future__ import annotations

import numpy as np
import pytest

import mmuemu

MiB = 1 << 20
PAGE = 4096


def parent(arch: str = "x86_64", size: int = 64 * MiB, order: int = 0, contpte: bool = False,
           memory: str = "1GiB") -> tuple[mmuemu.Machine, mmuemu.Process, int]:
    kw = {"contpte": True} if contpte else {}
    m = mmuemu.Machine(arch=arch, memory=memory, **kw)  # type: ignore[arg-type]
    p = m.spawn(name="parent")
    a = p.mmap(size, align=2 * MiB)
    if order:
        p.set_folio_orders([order])
    p.populate(a, size)
    return m, p, a


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_threads_writing_during_fork(arch: str) -> None:
    m, p, a = parent(arch)
    sim = m.simulation()
    fork_at = 100_000.0
    # a thread warms its TLB with writable entries for pages 0..1023, then writes pages
    # 0..2047 (and 0..1023 again) while the fork runs
    sim.add_task(p, [
        mmuemu.Access(a, 1024 * PAGE, pattern="strided", writes=1.0, count=1024, token=1),
        mmuemu.Sleep(ns=fork_at + 200_000 - 50_000),
        mmuemu.Access(a, 2048 * PAGE, pattern="strided", writes=1.0, count=3072, token=2),
    ], cpu=1, name="writer")
    sim.add_task(p, [mmuemu.Fork(child="stay")], cpu=0, name="forker", start_ns=fork_at)
    res = sim.run()
    m.check()
    fork_end = fork_at + res.task("forker")["fork_ns_mean"]
    writer = res.task("writer")
    assert writer["accesses"] == 1024 + 3072
    # pages 0..1023 went through stale writable entries; every page written after its
    # entry was write-protected faulted once, and copied (the child shares them)
    assert writer["faults"] == 2048
    assert res.counters["cow_copies"] == 2048
    # the first of those faults came during the fork: it waited for the mmap_lock
    waits = res.wait_times_ns("mmap_lock", "fault")
    assert len(waits) == 1 and 0 < waits[0] < res.task("forker")["fork_ns_mean"]
    assert res.counters["vma_lock_fallbacks"] == 1
    child = sim.tasks[1].children[0]
    tokens_child = child.read(a, length=2048 * PAGE)
    tokens_parent = p.read(a, length=2048 * PAGE)
    # the stale-TLB writes landed before the flush: the child sees them too
    assert (tokens_child[:1024] == 2).all()
    assert (tokens_child[1024:] == 0).all()
    assert (tokens_parent == 2).all()
    assert writer["done_ns"] > fork_end


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_shootdown_reaches_the_cpus_the_threads_ran_on(arch: str) -> None:
    m, p, a = parent(arch, size=8 * MiB)
    sim = m.simulation()
    for cpu in (1, 2):
        sim.add_task(p, [mmuemu.Access(a, 8 * MiB, pattern="random", count=20_000, seed=cpu)], cpu=cpu,
                     name=f"t{cpu}")
    sim.add_task(p, [mmuemu.Fork(child="exit")], cpu=0, name="forker", start_ns=5_000)
    res = sim.run()
    m.check()
    if arch == "x86_64":
        assert res.counters["ipis"] == 2  # fork's flush_tlb_mm: one IPI per other CPU
        assert res.counters["ipis_received"] >= 2
    else:
        assert res.counters["ipis"] == 0
        # one broadcast TLBI for the fork (the child's exit flushes its own ASID)
        assert res.counters["tlb_flush_mm"] == 2
        assert res.counters["tlbi_ops"] == 2


def stream_misses(arch: str, contpte: bool, size: int = 128 * MiB, count: int = 200_000) -> tuple[float, float]:
    """L1 and L2 misses of 2 x ``count`` uniform random loads over 64K folios."""
    m, p, a = parent(arch, size=size, order=4, contpte=contpte)
    sim = m.simulation()
    warm = mmuemu.Access(a, size, pattern="random", count=count, seed=1)
    sim.add_task(p, [warm, mmuemu.Access(a, size, pattern="random", count=count, seed=2)], cpu=0, name="t")
    res = sim.run()
    t = res.task("t")
    # over both streams: the first warms the TLB up, its cold misses are a few thousand
    return t["tlb_misses"], t["l2_misses"]


def test_contpte_tlb_reach() -> None:
    size = 128 * MiB
    pages, blocks = size // PAGE, size // (16 * PAGE)
    n = 400_000
    _, walks_cont = stream_misses("arm64", True, size)
    _, walks_plain = stream_misses("arm64", False, size)
    _, walks_x86 = stream_misses("x86_64", False, size)
    assert walks_cont < walks_plain and walks_cont < walks_x86
    # uniform random: a walk whenever the entry is not among the L2's entries, so the hit
    # rate is the reach: entries / distinct tags (16x more with one entry per block)
    l2 = 1280
    hit_cont = 1 - walks_cont / n
    hit_plain = 1 - walks_plain / n
    assert hit_cont == pytest.approx(l2 / blocks, rel=0.2)
    assert hit_plain == pytest.approx(l2 / pages, rel=0.35)
    assert hit_cont / hit_plain == pytest.approx(16, rel=0.4)


def test_sequential_stream_hits_within_pages() -> None:
    m, p, a = parent(size=4 * MiB)
    sim = m.simulation()
    sim.add_task(p, [mmuemu.Access(a, 4 * MiB, pattern="sequential", count=65_536)], cpu=0, name="t")
    res = sim.run()
    t = res.task("t")
    assert t["accesses"] == 65_536
    assert t["tlb_misses"] == 1024  # 64-byte stride: one miss per page
    assert t["faults"] == 0
    assert np.isclose(res.end_ns, 65_536 * 1.0 + 1024 * (3.0 + 30.0))
