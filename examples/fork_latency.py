"""A task woken on the forking CPU while fork() copies 1 GiB of PTE-mapped 2M folios: its
scheduling latency under batched (v6.9) and legacy fork.  Then a reclaim thread taking the
page-table lock of the table being copied, under two preemption models.

Run: python examples/fork_latency.py
"""

from __future__ import annotations

import mmuemu

GiB, MiB = 1 << 30, 1 << 20


def forking_machine(mode: str, order: int = 9) -> tuple[mmuemu.Machine, mmuemu.Process, int]:
    m = mmuemu.Machine(arch="x86_64", memory="2GiB", fork_mode=mode)
    p = m.spawn(name="parent")
    a = p.mmap(GiB, align=2 * MiB)
    p.set_folio_orders([order])
    p.populate(a, GiB)
    if order == 9:
        p.split_huge_pmd(a, GiB)  # PTE-mapped 2M folios: one 512-entry batch per table
    return m, p, a


def corunner(mode: str) -> mmuemu.Results:
    """A task on CPU 0 wakes 40 times (sleeps of varied length) while CPU 0 forks."""
    m, p, _ = forking_machine(mode)
    sim = m.simulation(preempt="none", hz=250)
    prog = [x for i in range(40) for x in (mmuemu.Sleep(ns=100_000 + 7_919 * i), mmuemu.Run(ns=2_000))]
    sim.add_task(m.spawn(name="co"), prog, cpu=0, name="co-runner")
    sim.add_task(p, [mmuemu.Fork(child="exit")], cpu=0, name="forker")
    res = sim.run()
    m.check()
    return res


def reclaim(preempt: str) -> mmuemu.Results:
    """kswapd on CPU 1 visits one page per table from the start of the region, 1 ms into
    the fork of 1 GiB of 4K pages: it passes the tables already copied and runs into the one
    being copied (and then, faster than the fork, gets ahead of it)."""
    m, p, a = forking_machine("batched", order=0)
    sim = m.simulation(preempt=preempt)
    sim.add_task(p, [mmuemu.Fork(child="exit")], cpu=0, name="forker")
    walk = mmuemu.RmapWalk(p, a, pages=512, stride=2 * MiB, hold_ns=2_000)
    sim.add_task(None, [walk], cpu=1, name="kswapd", start_ns=1_000_000)
    res = sim.run()
    m.check()
    return res


def main() -> None:
    print("co-runner woken on the forking CPU, PREEMPT_NONE, 1 GiB of PTE-mapped 2M folios")
    print(f"{'fork mode':10} {'fork (us)':>10} {'max latency (us)':>17} {'mean (us)':>10} {'lock breaks':>12}")
    for mode in ("batched", "legacy"):
        res = corunner(mode)
        lat = res.latency_ns("co-runner") / 1000
        fork_us = res.task("forker")["fork_ns_mean"] / 1000
        print(f"{mode:10} {fork_us:10.1f} {lat.max():17.2f} {lat.mean():10.2f} {res.counters['lock_breaks']:12}")
    print()
    print("kswapd takes the PTE-table lock fork holds (batched fork of 4K pages)")
    print(f"{'preempt':10} {'kswapd wait (us)':>17} {'fork waits (us)':>16} {'lock breaks':>12}")
    for model in ("none", "full"):
        res = reclaim(model)
        walker = res.wait_times_ns("ptl", "rmap_reclaim").sum() / 1000
        forker = res.wait_times_ns("ptl", "copy_pte_range").sum() / 1000
        print(f"{model:10} {walker:17.2f} {forker:16.2f} {res.counters['lock_breaks']:12}")
    print("(PREEMPT_NONE: spin_needbreak() is false, so kswapd waits for each whole table and then")
    print(" trails the fork table by table; PREEMPT_FULL: fork breaks at its next checkpoint)")


if __name__ == "__main__":
    main()
