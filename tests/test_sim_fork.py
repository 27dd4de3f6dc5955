"""The SimPy runner on fork: equal to the instant runner alone, and what contention does
(co-runner latency, rmap walkers on the page-table locks, preemption models)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import ARCHES, platform

import mmuemu
from mmuemu.mm import fork
from mmuemu.sim.timing import WorkTiming

MiB = 1 << 20


def machine(arch: str = "x86_64", size: int = 64 * MiB, order: int = 0, split: bool = False,
            mode: str = "batched", memory: str = "1GiB") -> tuple[mmuemu.Machine, mmuemu.Process, int]:
    m = mmuemu.Machine(memory=memory, fork_mode=mode, **platform(arch))  # type: ignore[arg-type]
    p = m.spawn(name="parent")
    a = p.mmap(size, align=2 * MiB)
    if order:
        p.set_folio_orders([order])
    p.populate(a, size)
    if split:
        p.split_huge_pmd(a, size)
    return m, p, a


def captured_works(m: mmuemu.Machine, p: mmuemu.Process) -> list[mmuemu.mm.Work]:
    """The Works of one fork, driven by hand (the fork happens)."""
    gen = fork.dup_mmap(m.kernel, p.mm)
    works = []
    try:
        w = gen.send(None)
        while True:
            works.append(w)
            w = gen.send(None)
    except StopIteration:
        pass
    return works


def longest_stretch_ns(m: mmuemu.Machine, works: list[mmuemu.mm.Work]) -> float:
    """The longest run of copy_pte_range work between two points where it tests
    need_resched (checkpoints and section ends)."""
    best = 0
    for w in works:
        if w.path != "copy_pte_range":
            continue
        t = WorkTiming(m.costs, w)
        pts = np.union1d(w.checkpoints, np.append(w.sections, w.ops.n_items))
        best = max(best, int(np.diff(t.item_start(pts)).max()))
    return best / 1000


# ---------------------------------------------------------------- section and item times
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize(("order", "split", "pin"), [(0, False, False), (4, False, True), (9, True, False),
                                                     (9, True, True), (0, False, True)])
@pytest.mark.parametrize("mode", ["batched", "legacy"])
def test_item_starts_agree_with_per_item_costs(arch: str, order: int, split: bool, pin: bool, mode: str) -> None:
    """Section sums and item positions found by search equal a plain per-item cumsum."""
    m, p, a = machine(arch, size=8 * MiB, order=order, split=split, mode=mode)
    if pin:  # pinned exclusive pages are copied at fork: items of several kinds
        p.pin(a + 3 * MiB, 300 * 4096, write=True)
        p.munmap(a + 5 * MiB, 64 * 1024)  # and a hole
    for w in captured_works(m, p):
        t = WorkTiming(m.costs, w)
        ref = np.concatenate([[0], np.cumsum(m.costs.item_ps(w.ops))])
        assert t.total == ref[-1] == m.costs.total_ps(w.ops.totals)
        assert (t.starts[:-1] == ref[w.sections]).all()
        for s in range(len(w.sections)):
            items = np.arange(w.sections[s], t.ends[s])
            assert (t.item_start(items) == ref[items]).all(), (w.path, s)
            for x in [*items[:: max(1, len(items) // 7)].tolist(), int(items[-1])]:
                assert t.item_start_at(s, x) == ref[x], (w.path, s, x)
                assert t.section_of(x) == s
            # the closed form of the checkpoint search, where the costs allow one
            for k in (1, 4, 32):
                line = t.checkpoint_line(s, k)
                if line is not None:
                    j = np.arange(1, (len(items) - 1) // k + 1)
                    assert (line[0] + j * line[1] == ref[items[0] + j * k]).all(), (w.path, s, k)
        # section_at agrees with a search of the section starts, on and between them
        probes = np.unique(np.concatenate([t.starts, t.starts + 1, t.starts - 1, [-10**6, t.total + 10**6]]))
        for x in probes.tolist():
            want = min(int(np.searchsorted(t.starts, x, side="right")) - 1, len(w.sections))
            assert t.section_at(x) == want, (w.path, x)


# ---------------------------------------------------------------- no contention
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize(("order", "split"), [(0, False), (4, False), (9, True), (9, False)])
@pytest.mark.parametrize("mode", ["batched", "legacy"])
def test_alone_equals_instant_runner(arch: str, order: int, split: bool, mode: str) -> None:
    m1, p1, _ = machine(arch, order=order, split=split, mode=mode)
    with m1.measure() as t:
        p1.fork()
    m2, p2, _ = machine(arch, order=order, split=split, mode=mode)
    sim = m2.simulation()
    sim.add_task(p2, [mmuemu.Fork(child="stay")], cpu=0, name="forker")
    res = sim.run()
    assert res.task("forker")["fork_ns_mean"] == t.ns
    assert res.end_ns == t.ns
    assert +Counter(res.counters) == +Counter(t.counts)
    # one event per Work, not per section: at most one per PTE table
    tables = (64 * MiB) >> 21
    assert res.events <= tables
    m2.check()


@pytest.mark.parametrize(("mode", "order", "split"), [("batched", 0, False), ("legacy", 0, False),
                                                    ("batched", 4, False), ("batched", 9, True)])
def test_break_points_match_instant_runner(mode: str, order: int, split: bool) -> None:
    """A wakeup at time t breaks the fork at the same item in both runners."""
    m0, p0, _ = machine(size=8 * MiB, order=order, split=split, mode=mode)
    with m0.measure() as whole:
        p0.fork()
    for t in (0.05 * whole.ns + 3.0, 0.41 * whole.ns + 11.0, 0.83 * whole.ns + 7.0):
        m1, p1, _ = machine(size=8 * MiB, order=order, split=split, mode=mode)
        m1.runner.resched_at(m1.runner.now_ns + t)
        p1.fork()
        m2, p2, _ = machine(size=8 * MiB, order=order, split=split, mode=mode)
        sim = m2.simulation()
        sim.add_task(m2.spawn(name="co"), [mmuemu.Sleep(ns=t), mmuemu.Run(ns=1)], cpu=0, name="co")
        sim.add_task(p2, [mmuemu.Fork(child="stay")], cpu=0, name="forker")
        res = sim.run()
        want = [(path, item) for path, item, _ in m1.runner.breaks]
        got = [(path, item) for _, path, item, _ in res.breaks]
        if want and not want[0][0].endswith(":cond_resched"):
            assert got == want, (t, got, want)
        else:  # stopped at a section end: no lock break in either
            assert got == []
        assert res.counters["resched_yields"] == 1


def test_contended_fork_matches_instant_state() -> None:
    """Breaks change time, never the result: the child's tables are those of an instant fork."""
    _, p1, a = machine(size=16 * MiB)
    c1 = p1.fork()
    m2, p2, _ = machine(size=16 * MiB)
    q = m2.spawn(name="co")
    sim = m2.simulation(preempt="full")
    sim.add_task(q, [mmuemu.Loop([mmuemu.Sleep(ns=3_000), mmuemu.Run(ns=500)], times=200)], cpu=0, name="co")
    sim.add_task(p2, [mmuemu.Fork(child="stay")], cpu=0, name="forker")
    res = sim.run()
    assert res.counters["lock_breaks"] > 10
    c2 = sim.tasks[1].children[0]
    assert [c2.pte(a + i * 4096).raw for i in range(0, 4096, 97)] == [c1.pte(a + i * 4096).raw for i in range(0, 4096, 97)]
    m2.check()


# ---------------------------------------------------------------- a co-runner woken on the forking CPU
def corunner(mode: str, preempt: str = "none", wakes: int = 40) -> tuple[mmuemu.Results, float]:
    m, p, _ = machine(size=256 * MiB, order=9, split=True, mode=mode)
    stretch = longest_stretch_ns(m, captured_works(*machine(size=256 * MiB, order=9, split=True, mode=mode)[:2]))
    q = m.spawn(name="co")
    sim = m.simulation(preempt=preempt)
    # sleeps of varied length, so the wakeups land all over the tables' copies
    prog = [a for i in range(wakes) for a in (mmuemu.Sleep(ns=40_000 + 1_777 * i), mmuemu.Run(ns=1_000))]
    sim.add_task(q, prog, cpu=0, name="co")
    sim.add_task(p, [mmuemu.Fork(child="stay")], cpu=0, name="forker")
    res = sim.run()
    m.check()
    return res, stretch


def test_corunner_latency_bounded_by_longest_section() -> None:
    cond_resched = mmuemu.Machine().costs.ns["cond_resched"]
    out = {}
    for mode in ("batched", "legacy"):
        res, stretch = corunner(mode)
        lat = res.latency_ns("co")
        assert len(lat) == 40
        assert lat.max() <= stretch + cond_resched, (mode, lat.max(), stretch)
        out[mode] = (lat.max(), stretch)
    # batched: one 512-PTE batch per check; legacy: a check every 4 PTEs
    assert out["batched"][1] > 20 * out["legacy"][1]
    assert out["batched"][0] > 20 * out["legacy"][0]
    # and the wakeups really land inside the long stretches
    assert out["batched"][0] > 0.5 * out["batched"][1]


@pytest.mark.parametrize("mode", ["batched", "legacy"])
def test_broken_sections_hold_their_parts(mode: str) -> None:
    """A lock break splits a section's hold in two: the holds of the copy add up to the
    sections' costs exactly, one more hold per break."""
    res, _ = corunner(mode, wakes=25)
    m, p, _ = machine(size=256 * MiB, order=9, split=True, mode=mode)
    works = [w for w in captured_works(m, p) if w.path == "copy_pte_range"]
    holds = res.hold_times_ns("ptl", "copy_pte_range")
    breaks = sum(1 for b in res.breaks if b[1] == "copy_pte_range")
    assert breaks > 5 or mode == "batched"  # (batched: one batch per table, no break inside)
    assert len(holds) == sum(len(w.sections) for w in works) + breaks
    assert round(holds.sum() * 1000) == sum(WorkTiming(m.costs, w).total for w in works)


def test_corunner_breaks_fork_and_costs_it_time() -> None:
    res, _ = corunner("legacy")
    assert res.counters["lock_breaks"] > 0
    assert res.counters["resched_yields"] >= 40
    assert len(res.breaks) == res.counters["lock_breaks"]


# ---------------------------------------------------------------- an rmap walker on the table being copied
def walker(preempt: str) -> tuple[mmuemu.Results, float, float]:
    size = 128 * MiB
    m0, p0, _ = machine(size=size)
    sim0 = m0.simulation()
    sim0.add_task(p0, [mmuemu.Fork(child="stay")], cpu=0, name="forker")
    base = sim0.run()
    table_ns = float(np.median(base.hold_times_ns("ptl", "copy_pte_range")))
    m, p, a = machine(size=size)
    stretch = longest_stretch_ns(m0, captured_works(*machine(size=size)[:2]))
    sim = m.simulation(preempt=preempt)
    sim.add_task(p, [mmuemu.Fork(child="stay")], cpu=0, name="forker")
    k = 40  # arrive 30% into the copy of table k
    start = (base.end_ns / (size >> 21)) * (k + 0.3)
    sim.add_task(None, [mmuemu.RmapWalk(p, a + k * 2 * MiB + 5 * 4096, hold_ns=2_000)], cpu=1, name="kswapd",
                 start_ns=start)
    res = sim.run()
    m.check()
    return res, table_ns, stretch


def test_rmap_walker_preempt_full_breaks_fork() -> None:
    res, _, stretch = walker("full")
    assert res.counters["lock_breaks"] == 1
    wait = res.wait_times_ns("ptl", "rmap_reclaim")
    assert len(wait) == 1 and 0 <= wait[0] <= stretch
    # the fork then waits for the walker, and pays for re-taking its locks
    fork_wait = res.wait_times_ns("ptl", "copy_pte_range")
    assert len(fork_wait) == 1 and fork_wait[0] > 1_000


def test_rmap_walker_preempt_none_waits_for_the_table() -> None:
    res, table_ns, _ = walker("none")
    assert res.counters["lock_breaks"] == 0
    wait = res.wait_times_ns("ptl", "rmap_reclaim")
    assert len(wait) == 1
    assert 0.5 * table_ns < wait[0] <= 0.75 * table_ns  # the remaining 70% of the table
    full, _, _ = walker("full")
    assert wait[0] > 10 * full.wait_times_ns("ptl", "rmap_reclaim")[0]


# ---------------------------------------------------------------- preemption models
def kernel_vs_wakeup(preempt: str) -> float:
    """Latency of a wakeup while the CPU runs a long lock-free kernel path (a populate)."""
    m = mmuemu.Machine(memory="1GiB")
    p = m.spawn(name="p")
    q = m.spawn(name="q")
    sim = m.simulation(preempt=preempt, hz=1000)
    sim.add_task(q, [mmuemu.Sleep(ns=100_000), mmuemu.Run(ns=1_000)], cpu=0, name="q")
    sim.add_task(p, [mmuemu.Mmap(64 * MiB, populate=True)], cpu=0, name="populate")
    res = sim.run()
    return float(res.latency_ns("q")[0])


def test_preemption_models_on_lock_free_kernel_work() -> None:
    full = kernel_vs_wakeup("full")
    lazy = kernel_vs_wakeup("lazy")
    none = kernel_vs_wakeup("none")
    assert full == 0.0  # preempted at once
    assert 0 < lazy <= 1_000_000  # at the next tick (HZ=1000)
    assert none > lazy  # only when the path returns to user space


def test_bad_simulation_input() -> None:
    m = mmuemu.Machine(memory="64MiB", cpus=2)
    with pytest.raises(mmuemu.InvalidArgument, match="preemption model 'rt'"):
        m.simulation(preempt="rt")
    sim = m.simulation()
    p = m.spawn()
    with pytest.raises(mmuemu.InvalidArgument, match="cpu 2 does not exist"):
        sim.add_task(p, [mmuemu.Run(ns=1)], cpu=2)
    with pytest.raises(mmuemu.InvalidArgument, match=r"program\[1\] = 'run' is not an action"):
        sim.add_task(p, [mmuemu.Run(ns=1), "run"], name="t")
    with pytest.raises(mmuemu.InvalidArgument, match=r"Sleep\.ns = -1"):
        mmuemu.Sleep(ns=-1)
    with pytest.raises(mmuemu.InvalidArgument, match=r"Access\.pattern = 'spiral'"):
        mmuemu.Access(0, 4096, pattern="spiral")
    m.check()
