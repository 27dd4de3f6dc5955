"""zap_range's fast pass (chunks mapping only normal pages) against its general pass.

A scenario runs on two identical machines; the second is made to zap every chunk on the
general pass.  After each step both must hold the same page tables, folios, free lists,
RSS and clock, and have handed the runner the same Works.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import mmuemu
from mmuemu.mm import mmap as mm_mmap
from mmuemu.mm import zap as mm_zap
from mmuemu.mm.work import Ops, Work
from mmuemu.sim.timing import WorkTiming

MiB = 1 << 20


def _per_item(ops: Ops, name: str) -> object:
    try:
        return ops.per_item(name).tolist()
    except ValueError as e:  # Ops.merge keeps array counts of item 0 that per_item rejects
        return repr(e)


def _timing(costs: object, w: Work) -> object:
    """What the SimPy runner times: section costs, and every item's start."""
    t = WorkTiming(costs, w)  # type: ignore[arg-type]
    try:
        items = t.item_start(np.arange(w.ops.n_items)).tolist()
    except ValueError as e:  # (as _per_item)
        items = repr(e)
    return t.total, t.section.tolist(), t.starts.tolist(), items


def _work_digest(w: Work, costs: object) -> tuple:
    ops = w.ops
    return (w.path, ops.n_items, list(ops.totals.items()), _timing(costs, w),
            {name: _per_item(ops, name) for name in ops.totals},
            np.asarray(w.sections).tolist(), w.locks, np.asarray(w.lock_ids).tolist(), w.cond_resched,
            np.asarray(w.checkpoints).tolist(), [(f.start, f.end) for f in ops.flushes])


def _state(m: mmuemu.Machine) -> dict[str, object]:
    k = m.kernel
    ph, pt = k.phys, k.pt
    arrays = {name: getattr(ph, name).copy() for name in (
        "refcount", "mapcount", "large_mapcount", "entire_mapcount", "pincount", "anon_exclusive",
        "head", "order", "flags", "token", "free_order")}
    return {
        **arrays,
        "pt": pt.flat[: pt.rows_touched * k.arch.ptrs_per_table].copy(),
        "free_lists": [list(s) for s in ph.free_lists],
        "nr_free": ph.nr_free,
        "free_rows": pt.free_rows[: pt.nr_free_rows].tolist(),
        "rss": [mm.rss.tolist() for mm in k.mms.values()],
        "deposit": [dict(mm.deposit) for mm in k.mms.values()],
        "stats": dict(m.runner.stats),
        "clock": m.runner.clock_ps,
    }


def _assert_same_state(got: dict[str, object], want: dict[str, object], where: str) -> None:
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        if isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray)
            bad = np.flatnonzero(g != w) if g.shape == w.shape else None
            assert bad is not None and not len(bad), f"{where}: {key} differs at {bad[:10] if bad is not None else g.shape}"
        else:
            assert g == w, f"{where}: {key} differs"


def _zap_scenario(name: str, m: mmuemu.Machine):  # type: ignore[no-untyped-def]
    """Operations on ``m`` for scenario ``name``, yielding a label after each one."""
    big = 9 if m.arch.pmd_order == 9 else m.arch.pmd_order
    p = m.spawn(name="p")
    if name in ("order0", "order4", "order9pte", "mixed"):
        orders = {"order0": [0], "order4": [4], "order9pte": [big], "mixed": [big, 4, 2]}[name]
        p.set_folio_orders(orders)
        # a VMA starting and ending mid-table and mid-folio
        a = p.mmap(22 * MiB + 5 * 4096, prot="rw", addr=0x40000000 + 3 * 4096)
        p.populate(a, 22 * MiB + 5 * 4096, write=True)
        if name == "order9pte":
            p.split_huge_pmd(a, 22 * MiB)
        yield "populate"
        c = p.fork()
        yield "fork"
        c.write(a + 7 * 4096, 3, length=5 * 4096)  # COW in the child breaks its progression
        yield "cow"
        c.exit()
        yield "child exit"
        c2 = p.fork()
        c2.munmap(a + 2 * MiB + 9 * 4096, 5 * MiB + 3 * 4096)
        yield "child munmap"
        c2.madvise(a + 8 * MiB + 4096, 4 * MiB - 2 * 4096, "dontneed")
        yield "child dontneed"
        p.munmap(a + 13 * 4096, 3 * 4096)  # inside one 64K folio
        yield "parent munmap in folio"
        c2.exit()
        yield "child2 exit"
        p.madvise(a + 1 * MiB, 6 * MiB, "dontneed")
        yield "parent dontneed"
        p.populate(a, 13 * 4096, write=False)
        p.populate(a + 16 * 4096, 22 * MiB - 11 * 4096, write=False)  # zero page entries and fresh folios
        p.write(a + 3 * MiB + 4096, 7, length=MiB)
        yield "refault"
        p.exit()
        yield "parent exit"
    elif name == "thp":
        p.set_folio_orders([big])
        a = p.mmap(16 * MiB, prot="rw", align=2 * MiB)
        p.madvise(a, 16 * MiB, "hugepage")
        p.populate(a, 16 * MiB, write=True)
        p.split_huge_pmd(a + 4 * MiB, 4 * MiB)
        yield "populate"
        c = p.fork()
        yield "fork"
        c.munmap(a + 2 * MiB + 5 * 4096, 3 * MiB)  # splits a PMD, zaps PTE tables and a leaf
        yield "child munmap"
        c.exit()
        yield "child exit"
        p.madvise(a + 8 * MiB, 4 * MiB, "dontneed")  # PMD leaves only
        yield "parent dontneed"
        p.exit()
        yield "parent exit"
    elif name == "files":
        f = m.file("data", 8 * MiB)
        s = m.file("shm", 4 * MiB, shmem=True)
        a = p.mmap(8 * MiB, prot="rw", shared=True, file=f)
        b = p.mmap(8 * MiB, prot="r", file=f)  # the same pages mapped again
        c_ = p.mmap(4 * MiB, prot="rw", shared=True, file=s)
        d = p.mmap(4 * MiB, prot="rw", file=f, offset=2 * MiB)  # private file: COW on write
        e = p.mmap(6 * MiB, prot="rw", shared=True)  # shared anonymous (shmem)
        p.populate(a, 8 * MiB, write=True)
        p.populate(b, 8 * MiB, write=False)
        p.populate(c_, 4 * MiB, write=True)
        p.populate(d, 4 * MiB, write=False)
        p.write(d + MiB, 5, length=MiB)
        p.populate(e, 6 * MiB, write=True)
        yield "populate"
        c = p.fork()
        yield "fork"
        c.munmap(b + 3 * 4096, 5 * MiB)
        yield "child munmap"
        c.exit()
        yield "child exit"
        p.madvise(a + 4096, 2 * MiB, "dontneed")
        yield "dontneed"
        p.exit()
        yield "parent exit"
    elif name == "fragmented":
        p.set_folio_orders([4, 0])
        a = p.mmap(12 * MiB, prot="rw")
        p.populate(a, 12 * MiB, write=True)
        for off in range(0, 12 * MiB, 128 * 1024):  # holes everywhere
            p.munmap(a + off + 4096, 64 * 1024)
        yield "holes"
        b = p.mmap(8 * MiB, prot="rw")
        p.populate(b, 8 * MiB, write=True)  # scattered pages
        yield "populate scattered"
        h = p.pin(b + MiB, 64 * 1024, write=True)
        c = p.fork()
        yield "fork with pins"
        c.exit()
        yield "child exit"
        p.mprotect(b, MiB, "none")
        p.madvise(b + 2 * MiB, MiB, "dontneed")
        yield "dontneed"
        p.munmap(b, 4 * MiB)
        yield "munmap pinned"
        h.release()
        p.exit()
        yield "parent exit"
    elif name == "mremap":
        # folios straddling table boundaries (moved by a few pages), one progression of entries
        p.set_folio_orders([4] if m.arch.cont_ptes == 1 else [4, 0])
        a = p.mmap(12 * MiB, prot="rw", align=2 * MiB)
        p.populate(a, 12 * MiB, write=True)
        b = p.mremap(a, 12 * MiB, 12 * MiB, new_addr=0x80000000 + 8 * 4096)
        p.set_folio_orders([big])
        c_ = p.mmap(8 * MiB, prot="rw", align=2 * MiB)
        p.populate(c_, 8 * MiB, write=True)
        p.split_huge_pmd(c_, 8 * MiB)
        d = p.mremap(c_, 8 * MiB, 8 * MiB, new_addr=0xC0000000 + 200 * 4096)
        yield "mremap"
        c = p.fork()
        yield "fork"
        c.exit()
        yield "child exit"
        p.madvise(b + 3 * 4096, 5 * MiB, "dontneed")
        yield "dontneed"
        p.munmap(d + MiB, 4 * MiB)
        yield "munmap"
        p.exit()
        yield "exit"
    elif name == "interleaved":
        # tables in rows just freed (taken in stack order: descending) over contiguous pages
        for orders in ([0], [4]):
            p.set_folio_orders(orders)
            x, y = p.mmap(8 * MiB, prot="rw", align=2 * MiB), p.mmap(8 * MiB, prot="rw", align=2 * MiB)
            p.populate(x, 8 * MiB, write=True)
            p.populate(y, 8 * MiB, write=True)
            p.munmap(x, 8 * MiB)
            e = p.mmap(8 * MiB, prot="rw", align=2 * MiB)
            p.populate(e, 8 * MiB, write=True)
            yield "populate in freed rows"
            p.madvise(e + 2 * MiB, 6 * MiB, "dontneed")
            yield "dontneed in freed rows"
        # tables of two VMAs allocated in turn: whole tables in rows that are not consecutive
        vmas = []
        for orders in ([4], [0]):
            p.set_folio_orders(orders)
            a, b = p.mmap(8 * MiB, prot="rw", align=2 * MiB), p.mmap(8 * MiB, prot="rw", align=2 * MiB)
            for off in range(0, 8 * MiB, 2 * MiB):
                p.populate(a + off, 2 * MiB, write=True)
                p.populate(b + off, 2 * MiB, write=True)
            vmas += [a, b]
        yield "populate"
        p.munmap(vmas[0], 8 * MiB)
        yield "munmap whole tables"
        e = p.mmap(8 * MiB, prot="rw", align=2 * MiB)
        p.populate(e, 8 * MiB, write=True)
        yield "populate again"
        c = p.fork()
        c.exit()
        yield "fork and child exit"
        p.munmap(e, 8 * MiB)
        yield "munmap freed rows"
        p.madvise(vmas[2], 6 * MiB, "dontneed")
        yield "dontneed whole tables"
        p.munmap(vmas[1] + 2 * MiB, 4 * MiB)
        yield "munmap middle tables"
        p.exit()
        yield "exit"
    else:
        raise AssertionError(name)


ZAP_SCENARIOS = ("order0", "order4", "order9pte", "mixed", "thp", "files", "fragmented", "interleaved", "mremap")
ZAP_PLATFORMS = ("x86_64", "arm64", "arm64-contpte", "arm64-contpte-basic", "arm64-contpte-fold")


def _platform_kwargs(name: str) -> dict[str, object]:
    return {
        "x86_64": {"arch": "x86_64"},
        "arm64": {"arch": "arm64"},
        "arm64-contpte": {"arch": "arm64", "contpte": True},
        "arm64-contpte-basic": {"arch": "arm64", "contpte": True, "contpte_batch_apis": False},
        "arm64-contpte-fold": {"arch": "arm64", "contpte": True, "contpte_fold": True},
    }[name]


def _run_both(scenario: str, platform_: str, mode: str, monkeypatch: pytest.MonkeyPatch,
              memory: str = "128MiB", steps_of: Any = None) -> tuple[int, int]:
    """Run the scenario on two identical machines, one zapping as it does and one made to
    take the general pass for every chunk; every Work and the whole state must match after
    each step.  Returns the number of zap Works compared and of chunks the first machine
    zapped on the fast pass."""
    logs: dict[int, list[tuple]] = {}
    reference: set[int] = set()
    current, fast = mm_zap.zap_range, mm_zap._normal_pages
    fast_chunks = [0]

    def normal_pages(a, vals):  # type: ignore[no-untyped-def]
        pages = fast(a, vals)
        fast_chunks[0] += pages is not None
        return pages

    def zap_range(k, mm, start, end, **kw):  # type: ignore[no-untyped-def]
        gen = current(k, mm, start, end, **kw)
        log = logs.setdefault(id(k), [])
        reply = None
        while True:
            # the generator runs only inside send: the reference takes the general pass
            mm_zap._normal_pages = (lambda a, vals: None) if id(k) in reference else normal_pages
            try:
                work = gen.send(reply)
            except StopIteration as stop:
                return stop.value
            finally:
                mm_zap._normal_pages = fast
            log.append(_work_digest(work, costs[id(k)]))
            reply = yield work

    monkeypatch.setattr(mm_mmap, "zap_range", zap_range)
    kw = _platform_kwargs(platform_)
    new = mmuemu.Machine(memory=memory, fork_mode=mode, **kw)  # type: ignore[arg-type]
    ref = mmuemu.Machine(memory=memory, fork_mode=mode, **kw)  # type: ignore[arg-type]
    reference.add(id(ref.kernel))
    costs = {id(new.kernel): new.costs, id(ref.kernel): ref.costs}
    steps_of = steps_of or _zap_scenario
    for label_new, label_ref in zip(steps_of(scenario, new), steps_of(scenario, ref), strict=True):
        assert label_new == label_ref
        new.check()
        ref.check()
        where = f"{scenario}/{platform_}/{mode} after {label_new}"
        got, want = logs.get(id(new.kernel), []), logs.get(id(ref.kernel), [])
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"{where}: work {i} differs"
        _assert_same_state(_state(new), _state(ref), where)
    return len(logs.get(id(new.kernel), [])), fast_chunks[0]


@pytest.mark.parametrize("mode", ["batched", "legacy"])
@pytest.mark.parametrize("platform_", ZAP_PLATFORMS)
@pytest.mark.parametrize("scenario", ZAP_SCENARIOS)
def test_fast_zap_matches_general_zap(scenario: str, platform_: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast pass changes page tables, folios, RSS, counters and the Works it hands the
    runner (counts per item, sections, locks, flushes) exactly as the general pass does."""
    monkeypatch.setattr(mm_zap, "CHUNK_TABLES", 3)  # several chunks, some of partial tables
    works, fast = _run_both(scenario, platform_, mode, monkeypatch)
    assert works > 0 and fast > 0


@pytest.mark.parametrize("order", [0, 4])
def test_fast_zap_matches_general_zap_big_chunks(order: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the real chunk size, over more than one chunk."""
    def scenario(name: str, m: mmuemu.Machine):  # type: ignore[no-untyped-def]
        p = m.spawn(name="p")
        p.set_folio_orders([order])
        a = p.mmap(300 * MiB, prot="rw")
        p.populate(a, 300 * MiB, write=True)
        yield "populate"
        c = p.fork()
        c.munmap(a + 4096, 2 * MiB)
        yield "munmap"
        c.exit()
        yield "child exit"
        p.exit()
        yield "parent exit"

    works, fast = _run_both("big", "x86_64", "batched", monkeypatch, memory="1GiB", steps_of=scenario)
    assert works > 2 and fast > 2
