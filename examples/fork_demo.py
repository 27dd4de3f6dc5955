"""Fork a process with 1 GiB of 64 KiB folios in both fork modes and compare the counters.

Run: python examples/fork_demo.py
"""

from __future__ import annotations

import mmuemu

GiB = 1 << 30


def fork_once(mode: str) -> mmuemu.Measurement:
    m = mmuemu.Machine(arch="x86_64", memory="2GiB", fork_mode=mode)
    p = m.spawn(name="parent")
    p.set_folio_orders([4])  # 64 KiB anon folios
    a = p.mmap(GiB, prot="rw", align=2 << 20)
    p.populate(a, GiB, write=True)
    p.write(a, 0xC0FFEE)
    with m.measure() as t:
        c = p.fork()
    c.write(a, 7)  # COW: the child gets its own copy of that page
    assert p.read(a) == 0xC0FFEE and c.read(a) == 7
    m.check()
    return t


def main() -> None:
    rows = {mode: fork_once(mode) for mode in ("batched", "legacy")}
    print(f"fork of 1 GiB of 64K folios on x86_64 ({mmuemu.Machine().costs.name})")
    print(f"{'mode':<8} {'sim ms':>8} {'folio_ref_ops':>14} {'mapcount_ops':>13} {'fork_batches':>13}")
    for mode, t in rows.items():
        c = t.counts
        print(f"{mode:<8} {t.ns / 1e6:>8.3f} {c['folio_ref_ops']:>14} {c['mapcount_ops']:>13} "
              f"{c['fork_batches']:>13}")
    speedup = rows["legacy"].ns / rows["batched"].ns
    print(f"batched/legacy speedup: {speedup:.2f}x")


if __name__ == "__main__":
    main()
