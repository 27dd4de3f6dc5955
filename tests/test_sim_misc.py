"""The SimPy runner's programs, timelines, coalescing TLBs, errors and CPU placement."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import mmuemu
from mmuemu.sim.costs import default_costs

MiB = 1 << 20


def test_trace_has_cpu_and_lock_tracks(tmp_path: Path) -> None:
    m = mmuemu.Machine(memory="512MiB")
    p = m.spawn(name="parent")
    a = p.mmap(8 * MiB)
    p.populate(a, 8 * MiB)
    sim = m.simulation(preempt="full")
    sim.add_task(m.spawn(name="co"), [mmuemu.Sleep(ns=20_000), mmuemu.Run(ns=5_000)], cpu=0, name="co")
    sim.add_task(p, [mmuemu.Fork(child="exit")], cpu=0, name="forker")
    sim.add_task(None, [mmuemu.RmapWalk(p, a, pages=4, stride=2 * MiB)], cpu=1, name="kswapd", start_ns=10_000)
    res = sim.run()
    out = res.write_trace(tmp_path / "t.json")
    data = json.loads(out.read_text())
    ev = data["traceEvents"]
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"cpu0", "cpu1"} <= names
    assert any(n.startswith("ptl ") for n in names)
    spans = [e for e in ev if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert {"copy_pte_range", "rmap_reclaim", "co", "forker"} <= {e["name"] for e in spans}
    # every hold of a lock instance is on its own track and they never overlap
    by_tid: dict[int, list[tuple[float, float]]] = {}
    for e in spans:
        if e["pid"] == 2:
            by_tid.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for holds in by_tid.values():
        holds.sort()
        assert all(b[0] >= a[1] - 1e-6 for a, b in itertools.pairwise(holds))
    assert any(e["name"].startswith("lock break") for e in ev if e["ph"] == "i")
    with pytest.raises(ValueError, match="no timeline"):
        mmuemu.Machine(memory="64MiB").simulation(trace=False).run().write_trace(tmp_path / "x.json")


def test_x86_coalescing_quarters_the_misses() -> None:
    base = default_costs("x86_64")
    coalescing = mmuemu.CostModel(base.name + "-c4", "x86_64", base.ns, sim={**base.sim, "coalesce4": 1})
    misses = {}
    for name, costs in (("plain", base), ("c4", coalescing)):
        m = mmuemu.Machine(memory="512MiB", costs=costs)
        p = m.spawn()
        a = p.mmap(64 * MiB, align=2 * MiB)
        p.set_folio_orders([2])  # 16K folios: every group of 4 pages is aligned in both spaces
        p.populate(a, 64 * MiB)
        sim = m.simulation()
        sim.add_task(p, [mmuemu.Access(a, 64 * MiB, pattern="strided", count=16384)], cpu=0, name="t")
        misses[name] = sim.run().task("t")["tlb_misses"]
    assert misses["plain"] == 16384
    assert misses["c4"] == 16384 // 4


def test_program_maps_by_name_and_records_errors() -> None:
    m = mmuemu.Machine(memory="256MiB")
    p = m.spawn(name="p")
    sim = m.simulation()
    sim.add_task(p, [
        mmuemu.Mmap(4 * MiB, name="buf", populate=True),
        mmuemu.Access("buf", pattern="strided", writes=1.0, count=1024, token=5),
        mmuemu.Mprotect(0, 4096, "r"),  # fails: nothing mapped at 0
        mmuemu.Access("nope", count=1),  # fails: no such mapping
        mmuemu.Munmap(name="buf"),
    ], cpu=0, name="t")
    res = sim.run()
    assert res.task("t")["accesses"] == 1024
    assert res.task("t")["faults"] == 0  # populated for writing first
    assert len(res.errors) == 2
    assert "no mapping called 'nope'" in res.errors[1][1]
    assert p.vmas == []
    m.check()


def test_access_beyond_the_mapping_is_a_recorded_segfault() -> None:
    m = mmuemu.Machine(memory="256MiB")
    p = m.spawn(name="p")
    a = p.mmap(MiB, prot="r")
    p.populate(a, MiB, write=False)
    sim = m.simulation()
    sim.add_task(p, [mmuemu.Access(a, MiB, writes=1.0, count=10), mmuemu.Run(ns=10)], cpu=0, name="t")
    res = sim.run()
    assert len(res.errors) == 1 and "access at" in res.errors[0][1]
    assert res.task("t")["done_ns"] is not None  # the program went on
    m.check()


def test_migratable_tasks_spread_over_idle_cpus() -> None:
    m = mmuemu.Machine(memory="256MiB", cpus=4)
    sim = m.simulation()
    for i in range(4):
        sim.add_task(m.spawn(), [mmuemu.Run(ns=100_000)], name=f"t{i}")
    res = sim.run()
    assert sorted(res.task(f"t{i}")["cpu"] for i in range(4)) == [0, 1, 2, 3]
    assert res.end_ns == 100_000  # all ran at once


def test_fork_in_a_loop_with_child_programs() -> None:
    m = mmuemu.Machine(memory="512MiB")
    p = m.spawn(name="p")
    a = p.mmap(4 * MiB)
    p.populate(a, 4 * MiB)
    child = [mmuemu.Access(a, 4 * MiB, pattern="strided", writes=1.0, count=16, token=9), mmuemu.Exit()]
    sim = m.simulation()
    sim.add_task(p, [mmuemu.Loop([mmuemu.Fork(child=child), mmuemu.Sleep(ns=50_000)], times=3)], cpu=0, name="p")
    res = sim.run()
    assert res.task("p")["forks"] == 3
    assert res.counters["cow_copies"] == 3 * 16  # each child copies the 16 pages it writes
    assert (p.read(a, length=16 * 4096) == 0).all()
    assert list(m.kernel.mms) == [p.mm.id]  # the children exited
    m.check()


def test_tick_ends_time_slices() -> None:
    m = mmuemu.Machine(memory="64MiB", cpus=1)
    sim = m.simulation(hz=1000, slice_ns=3_000_000)
    for i in range(2):
        sim.add_task(m.spawn(), [mmuemu.Run(ns=10_000_000)], cpu=0, name=f"t{i}")
    res = sim.run()
    # round robin: both finish near 20 ms, the first one a slice earlier at most
    done = sorted(res.task(f"t{i}")["done_ns"] for i in range(2))
    assert done[1] == 20_000_000
    assert 20_000_000 - 4_000_000 <= done[0] < 20_000_000
    assert np.isfinite(done).all()


def test_lock_histograms() -> None:
    m = mmuemu.Machine(memory="512MiB")
    p = m.spawn(name="parent")
    a = p.mmap(16 * MiB)
    p.populate(a, 16 * MiB)
    sim = m.simulation()
    sim.add_task(p, [mmuemu.Fork(child="exit")], cpu=0, name="forker")
    res = sim.run()
    counts, edges = res.lock_histogram("ptl", "copy_pte_range", bins=4)
    assert counts.sum() == 8  # one hold per PTE table copied
    assert edges[0] <= res.hold_times_ns("ptl", "copy_pte_range").min()
    with pytest.raises(ValueError, match="no waits of lock 'ptl'"):
        res.lock_histogram("ptl", waits=True)



@pytest.mark.parametrize(("items", "a"), [(1, 1.2), (10, 1.5), (64, 1.1), (65, 3.0), (1000, 1.2), (5000, 2.0)])
def test_zipf_ranks_follow_the_law(items: int, a: float) -> None:
    from mmuemu.sim.access import zipf_ranks

    r = zipf_ranks(np.random.default_rng(7), 200_000, items, a)
    assert r.min() >= 0 and r.max() < items
    got = np.bincount(r, minlength=items) / len(r)
    k = np.arange(1, items + 1, dtype=float)
    want = k**-a / (k**-a).sum()
    assert abs(got[0] - want[0]) < 0.01  # the hottest page, exactly from the alias table
    assert 0.5 * np.abs(got - want).sum() < 0.03  # total variation (sampling noise included)


def test_run_until_stops_early_or_when_done() -> None:
    m = mmuemu.Machine(memory="64MiB", cpus=1)
    sim = m.simulation()
    sim.add_task(m.spawn(), [mmuemu.Run(ns=1_000_000)], cpu=0, name="t")
    assert sim.run(until_ns=10_000_000).end_ns == 1_000_000  # done before the limit
    sim = m.simulation()
    sim.add_task(m.spawn(), [mmuemu.Run(ns=1_000_000)], cpu=0, name="t")
    res = sim.run(until_ns=250_000)
    assert res.end_ns == 250_000 and res.task("t")["done_ns"] is None



def test_programs_unroll_in_order_flat_or_lazily() -> None:
    """A short program is unrolled into one tuple, a long one lazily; both give the actions
    in the order nested loops run them."""
    from mmuemu.sim.tasks import FLAT_ACTIONS, _flat, _unrolled, _unrolling

    a, b, c, d = (mmuemu.Run(ns=i + 1) for i in range(4))
    prog = (a, mmuemu.Loop([b, mmuemu.Loop([c], times=2)], times=3), d)
    expect = [a, b, c, c, b, c, c, b, c, c, d]
    assert list(_unrolled(prog)) == list(_flat(prog)) == list(_unrolling(prog)) == expect
    assert isinstance(_unrolled(prog), tuple)
    huge = (mmuemu.Loop([b, c], times=10**12), d)  # too long to list: unrolled as it runs
    lazy = _unrolled(huge)
    assert not isinstance(lazy, tuple)
    assert list(itertools.islice(lazy, 5)) == [b, c, b, c, b]
    edge = (mmuemu.Loop([b], times=FLAT_ACTIONS),)
    assert isinstance(_unrolled(edge), tuple) and not isinstance(_unrolled((*edge, d)), tuple)


# ---------------------------------------------------------------- pokes: re-armed timeouts or SimPy interrupts
def _contended(kind: str) -> mmuemu.Results:
    m = mmuemu.Machine(memory="1GiB")
    p = m.spawn(name="p")
    a = p.mmap(64 * MiB, align=2 * MiB)
    p.populate(a, 64 * MiB)
    if kind == "corunner":  # wakeups on the forking CPU: lock breaks, preemption, ticks
        sim = m.simulation(preempt="none")
        q = m.spawn(name="co")
        sim.add_task(q, [x for i in range(30) for x in (mmuemu.Sleep(ns=20_000 + 1_777 * i), mmuemu.Run(ns=3_000))],
                     cpu=0, name="co")
        sim.add_task(p, [mmuemu.Fork(child="stay")], cpu=0, name="forker")
    elif kind == "walker":  # a spinning waiter under PREEMPT_FULL: needbreak
        p.fork().exit()  # (the first fork costs more: it clears AnonExclusive)
        with m.measure() as t:
            c = p.fork()
        c.exit()
        sim = m.simulation(preempt="full")
        sim.add_task(p, [mmuemu.Fork(child="stay")], cpu=0, name="forker")
        sim.add_task(None, [mmuemu.RmapWalk(p, a + 9 * 2 * MiB + 5 * 4096, hold_ns=2_000)], cpu=1, name="kswapd",
                     start_ns=t.ns / 32 * 9.3)  # (30% into table 9's copy)
    else:  # threads of the parent running during its fork: shootdown IPIs move their activities
        sim = m.simulation(preempt="lazy", hz=1000)
        for c in (1, 2):
            sim.add_task(p, [mmuemu.Run(ns=400_000), mmuemu.Access(a, 8 * MiB, pattern="random", writes=0.5,
                                                                    count=300, seed=c)], cpu=c, name=f"t{c}")
        sim.add_task(p, [mmuemu.Sleep(ns=10_000), mmuemu.Fork(child="stay")], cpu=0, name="forker")
    res = sim.run()
    m.check()
    return res


@pytest.mark.parametrize("kind", ["corunner", "walker", "threads"])
def test_pokes_rearm_timeouts_as_interrupts_would(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A poke that moves a running activity's end re-arms its process's wait on a new
    timeout (SimPy's own interrupt, minus its event and exception); the run must come out
    exactly as with Process.interrupt."""
    from mmuemu.sim import tasks

    assert tasks.retarget_ok()  # (this SimPy keeps its process state as expected)
    fast = _contended(kind)
    monkeypatch.setattr(tasks, "RETARGET", False)
    slow = _contended(kind)
    assert fast.counters == slow.counters
    assert fast.breaks == slow.breaks and fast.latencies == slow.latencies
    assert fast.end_ns == slow.end_ns and fast.records == slow.records
    assert np.array_equal(fast.hold_times_ns("ptl"), slow.hold_times_ns("ptl"))
    moved = {"corunner": "lock_breaks", "walker": "lock_breaks", "threads": "ipis_received"}[kind]
    assert fast.counters[moved] > 0  # (the scenario does poke)
