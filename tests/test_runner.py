"""The instant runner: simulated time from the cost model, and need_resched lock breaks."""

from __future__ import annotations

import pytest

import mmuemu
from mmuemu.sim.costs import CostModel
from mmuemu.workload import populated

MiB = 1 << 20


def _parent(mode: str, order: int, size: int = 8 * MiB) -> tuple[mmuemu.Machine, mmuemu.Process]:
    m = mmuemu.Machine(memory="128MiB", fork_mode=mode)
    return m, populated(m, size, order)[0]


def test_time_is_counts_times_costs() -> None:
    m, p = _parent("batched", 0)
    with m.measure() as t:
        p.fork()
    expect = sum(m.costs.ns.get(k, 0.0) * v for k, v in t.counts.items())
    assert t.ns == pytest.approx(expect, rel=1e-9)


def test_custom_cost_model() -> None:
    costs = CostModel("unit", "x86_64", {"pte_reads": 1.0})
    m = mmuemu.Machine(memory="64MiB", costs=costs)
    p = m.spawn()
    a = p.mmap(2 * MiB)
    p.populate(a, 2 * MiB)
    with m.measure() as t:
        p.fork()
    assert t.ns == t.counts["pte_reads"] == 512


@pytest.mark.parametrize(("mode", "order"), [("batched", 0), ("legacy", 9), ("batched", 9)])
def test_need_resched_breaks_at_next_checkpoint(mode: str, order: int) -> None:
    """A need_resched raised mid-copy stops the section at the first checkpoint after it."""
    m, p = _parent(mode, order)
    start = m.now_ns
    with m.measure() as t0:
        p.fork()
    total = t0.ns
    m2, p2 = _parent(mode, order)
    at = m2.now_ns + total * 0.37
    m2.runner.resched_at(at)
    with m2.measure() as t:
        p2.fork()
    assert t.counts["resched_yields"] == 1
    path, _item, when = m2.runner.breaks[0]
    assert when >= at
    if (mode, order) == ("batched", 9):
        # one 512-PTE batch per table: no checkpoint inside a table, so the CPU is given up
        # only at the cond_resched() after the table, without a lock break
        assert t.counts["lock_breaks"] == 0 and path == "copy_pte_range:cond_resched"
        assert t.counts["ptl_locks"] == t0.counts["ptl_locks"]
        return
    assert t.counts["lock_breaks"] == 1 and path == "copy_pte_range"
    # the break costs a relock and a cond_resched more than the plain fork
    assert t.ns > total
    assert t.counts["ptl_locks"] == t0.counts["ptl_locks"] + 2
    # the break waits at most one section between checkpoints: a whole batch in batched mode
    gap = when - at
    per_pte = total / (8 * MiB // 4096)
    assert gap <= per_pte * 4 * 3
    assert start >= 0


def test_batched_worst_case_gap_larger_than_legacy() -> None:
    """Legacy fork checks every 4 PTEs; batched fork of PMD-size folios once per 512."""
    gaps = {}
    for mode in ("legacy", "batched"):
        m, p = _parent(mode, 9)
        costs = m.costs
        with m.measure():
            c = p.fork()
        work_gaps = []
        from mmuemu.mm import fork as fork_mod

        m2, p2 = _parent(mode, 9)
        gen = fork_mod.dup_mmap(m2.kernel, p2.mm)
        for work in gen:
            if work.path != "copy_pte_range":
                continue
            item_ps = costs.item_ps(work.ops)
            import numpy as np

            starts = np.concatenate([[0], np.cumsum(item_ps)])
            cps = np.concatenate([[0], work.checkpoints, [work.ops.n_items]])
            work_gaps.append(int(np.diff(starts[cps]).max()))
        gaps[mode] = max(work_gaps) / 1000
        c.exit()
    assert gaps["batched"] > 20 * gaps["legacy"]


def test_per_item_counts_of_every_shape() -> None:
    """Counts given per run without items belong to item 0; ALL spreads over every item."""
    import numpy as np

    from mmuemu.mm.work import ALL, Ops

    ops = Ops(4)
    ops.add("pte_writes", np.array([3, 5]))  # per run, no items: item 0
    ops.add("pte_writes", 1, ALL)
    ops.add("pte_writes", np.array([2, 2]), np.array([1, 3]))
    ops.add("pte_writes", np.broadcast_to(np.int64(1), (2,)), np.array([2, 3]))
    assert ops.per_item("pte_writes").tolist() == [9, 3, 2, 4]
    assert ops.totals["pte_writes"] == 18


def test_a_fault_can_be_timed_item_by_item() -> None:
    """handle_mm_fault's Work (set_ptes counts per run, no items) answers per-item costs."""
    from mmuemu.sim.runners import InstantRunner

    m = mmuemu.Machine(arch="arm64", memory="64MiB")
    p = m.spawn()
    p.set_folio_orders([4])
    a = p.mmap(1 << 20)
    works = list(_works(m, p, a))
    assert works and all(m.costs.item_ps(w.ops).sum() >= 0 for w in works)
    assert isinstance(m.runner, InstantRunner)


def _works(m: mmuemu.Machine, p: mmuemu.Process, a: int):  # type: ignore[no-untyped-def]
    from mmuemu.mm.fault import fault_range

    gen = fault_range(m.kernel, p.mm, a, a + (1 << 20), write=True)
    try:
        while True:
            yield gen.send(None)
    except StopIteration:
        return
