"""Out of memory: injected at any allocation, a failed operation leaves the machine as it was."""

from __future__ import annotations

import numpy as np
import pytest

import mmuemu
from mmuemu.mm.gup import follow_range

MiB = 1 << 20


def snapshot(m: mmuemu.Machine, p: mmuemu.Process, a: int, n: int) -> dict[str, object]:
    k = m.kernel
    pfn, present, vals = follow_range(k, p.mm, a, a + n)
    heads = k.phys.head[pfn[present]]
    return {
        "vals": vals.copy(),
        "ref": k.phys.refcount[heads].copy(),
        "map": k.phys.mapcount[pfn[present]].copy(),
        "ae": k.phys.anon_exclusive[pfn[present]].copy(),
        "tok": k.phys.token[pfn[present]].copy(),
        "free": m.free_pages,
        "rss": dict(p.rss),
        "mms": len(k.mms),
    }


def same(x: dict[str, object], y: dict[str, object]) -> bool:
    return all(np.array_equal(x[k], y[k]) if isinstance(x[k], np.ndarray) else x[k] == y[k] for k in x)


@pytest.mark.parametrize("mode", ["batched", "legacy"])
def test_fork_failure_at_every_allocation(mode: str) -> None:
    m = mmuemu.Machine(memory="64MiB", fork_mode=mode)
    p = m.spawn()
    p.set_folio_orders([9, 4, 0])
    n = 8 * MiB
    a = p.mmap(n, align=2 * MiB)
    p.populate(a, n)
    p.write(a + 2 * MiB, 5, length=2 * MiB)
    p.split_huge_pmd(a + 4 * MiB, 2 * MiB)
    b = p.mmap(MiB)
    p.write(b, 3, length=MiB)
    pin = p.pin(b, 64 * 1024, write=True)  # pinned exclusive pages: copied at fork
    before = snapshot(m, p, a, n), snapshot(m, p, b, MiB)
    failures = 0
    for nth in range(100):
        m.inject_alloc_failure(after=nth)
        try:
            c = p.fork()
        except mmuemu.OutOfMemory:
            failures += 1
            assert same(snapshot(m, p, a, n), before[0]), nth
            assert same(snapshot(m, p, b, MiB), before[1]), nth
            m.check()
            continue
        m.inject_alloc_failure(after=10**9)
        break
    else:
        pytest.fail("fork never succeeded")
    assert failures >= 3  # pgd, upper tables, PTE tables, deposits, pinned copies
    assert (c.read(b, length=64 * 1024) == 3).all()
    assert c.folio(b).pfn != p.folio(b).pfn  # the pinned page was copied
    assert p.pte(b).write  # the parent keeps its writable, pinned page
    pin.release()
    m.check()


def test_populate_oom_rolls_back() -> None:
    m = mmuemu.Machine(memory="8MiB")
    p = m.spawn()
    a = p.mmap(16 * MiB)
    free = m.free_pages
    with pytest.raises(mmuemu.OutOfMemory):
        p.populate(a, 16 * MiB)
    assert m.free_pages == free and p.rss["anon"] == 0
    m.check()


def test_large_order_falls_back_when_injected() -> None:
    m = mmuemu.Machine(memory="64MiB")
    p = m.spawn()
    p.set_folio_orders([4])
    a = p.mmap(MiB)
    m.inject_alloc_failure(after=3)  # PUD, PMD and PTE tables first, then the 64K folios fail
    p.populate(a, MiB)
    m.check()
    assert p.rss["anon"] == 256
    assert p.folio(a).order == 0  # fell back to order 0, as alloc_anon_folio does
