"""Memory access streams: CPU loads and stores through the TLB model, faulting into the
mm core.

A stream runs in batches of accesses.  Each batch is translated at once: the region's
entries come from a cached page-table walk (patched when a path changes the tables), every
access gets its TLB tag (a 4K page, a contpte block on arm64, a PMD leaf, or an AMD-style
coalesced 16K group on x86 when the cost model enables it), and the CPU's TLB model looks
the whole batch up.  The batch ends before the first access that must fault (a walk that
finds no entry, or a store through a read-only entry); the fault runs as a kernel path
under the VMA lock or mmap_lock, and the stream resumes at that access.  A batch that is
preempted or hit by a TLB invalidation commits the accesses made before it, and the rest
is looked up again afterwards.

Deliberate simplifications: walks do not set the accessed/dirty bits, and a batch sees the
page tables as they were when it started (batches are short: ``BATCH`` accesses).
"""

from __future__ import annotations

import functools
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from mmuemu.errors import MmuEmuError
from mmuemu.mm import fault
from mmuemu.mm.gup import follow_range
from mmuemu.mm.work import TlbFlush
from mmuemu.sim.kpath import Busy, run_path
from mmuemu.sim.program import Access
from mmuemu.sim.tlb import make_tags

if TYPE_CHECKING:
    from mmuemu.sim.simulation import Simulation
    from mmuemu.sim.tasks import Task

__all__ = ["BATCH", "run_access"]

#: accesses translated and timed together
BATCH = 8192
I64 = NDArray[np.int64]


class _Batch(Busy):
    """A batch of user-mode accesses: preempted or cut by a TLB invalidation, it commits
    the accesses made so far at once (before the invalidation applies)."""

    def __init__(self, sim: Simulation, task: Task, cum: I64, commit: Any) -> None:
        super().__init__(sim, task, int(cum[-1]) if len(cum) else 0, "user")
        self.cum, self.commit = cum, commit
        self.done: int | None = None
        self.cut_ps = 0

    def on(self, cause: tuple[Any, ...], now: int) -> bool:
        if cause[0] == "ipi":  # the handler's time is paid once the batch has stopped
            self.cut_ps += cause[1]
        if now >= self.end:
            return False
        if cause[0] in ("ipi", "pt"):  # a TLB invalidation, or the page tables changed
            self._stop(now)
            return True
        if super().on(cause, now):
            self._stop(now)
            return True
        return False

    def _stop(self, now: int) -> None:
        self.done = int(np.searchsorted(self.cum, now - self.start, side="right"))
        self.commit(self.done)
        self.end = self.start + (int(self.cum[self.done - 1]) if self.done else 0)
        self.end = max(self.end, now)


class _Region:
    """The cached translation of an access region: entry per page, TLB tag shift per page."""

    def __init__(self, sim: Simulation, mm: Any, start: int, end: int) -> None:
        self.sim, self.mm, self.start, self.end = sim, mm, start, end
        self.epoch = -1
        self.seen = 0
        self.refresh()

    def refresh(self) -> None:
        sim, mm = self.sim, self.mm
        epoch = sim.mm_epoch.get(mm.id, 0)
        patches = sim.mm_patches.setdefault(mm.id, [])
        if epoch != self.epoch:
            self._walk(self.start, self.end)
            self.epoch, self.seen = epoch, len(patches)
            return
        for lo, hi in patches[self.seen :]:
            lo, hi = max(lo, self.start), min(hi, self.end)
            if lo < hi:
                self._walk(lo, hi)
        self.seen = len(patches)

    def _walk(self, lo: int, hi: int) -> None:
        k = self.sim.kernel
        a = k.arch
        pfn, present, vals = follow_range(k, self.mm, lo, hi)
        shift = np.full(len(vals), 12, np.int64)
        slots = k.pt.pmd_slots(self.mm.pgd_row, lo, hi)
        if len(slots.flat):
            leaf = a.pmd_leaf(k.pt.flat[slots.flat])
            for va in slots.va[leaf].tolist():
                s, e = max(va, lo), min(va + (1 << a.pmd_shift), hi)
                shift[(s - lo) >> 12 : (e - lo) >> 12] = a.pmd_shift
        if self.sim.tlb_cont:
            shift[(shift == 12) & a.pte_cont(vals) & present] = 16
        if self.sim.tlb_coalesce4:
            shift = _coalesce4(lo, pfn, present, a.pte_write(vals), shift)
        i0, i1 = (lo - self.start) >> 12, (hi - self.start) >> 12
        if self.epoch == -1 or (lo, hi) == (self.start, self.end):
            n = (self.end - self.start) >> 12
            self.pfn, self.present = np.zeros(n, np.int64), np.zeros(n, bool)
            self.writable, self.shift = np.zeros(n, bool), np.full(n, 12, np.int64)
        self.pfn[i0:i1], self.present[i0:i1] = pfn, present
        self.writable[i0:i1] = present & a.pte_write(vals)
        self.shift[i0:i1] = shift


def _coalesce4(lo: int, pfn: I64, present: NDArray[np.bool_], write: NDArray[np.bool_], shift: I64) -> I64:
    """AMD-style coalescing: an aligned group of 4 present 4K pages with consecutive PFNs
    and equal permissions is cached as one entry."""
    n = len(pfn)
    first = (-(lo >> 12)) % 4
    m = (n - first) // 4
    if m <= 0:
        return shift
    sl = slice(first, first + 4 * m)
    p = pfn[sl].reshape(m, 4)
    ok = (present[sl].reshape(m, 4).all(1) & (write[sl].reshape(m, 4) == write[sl].reshape(m, 4)[:, :1]).all(1)
          & (np.diff(p, axis=1) == 1).all(1) & (p[:, 0] % 4 == 0) & (shift[sl].reshape(m, 4) == 12).all(1))
    out = shift.copy()
    out[sl].reshape(m, 4)[ok] = 14
    return out


def _addresses(act: Access, base: int, length: int, pos: int, n: int, rng: np.random.Generator) -> I64:
    if act.pattern in ("sequential", "strided"):
        stride = act.stride or (64 if act.pattern == "sequential" else 4096)
        off = ((pos + np.arange(n, dtype=np.int64)) * stride) % length
    elif act.pattern == "random":
        off = rng.integers(0, length, n, dtype=np.int64) & ~7
    else:
        rank = zipf_ranks(rng, n, max(length >> 12, 1), act.zipf_a)
        off = rank * 4096 + (rng.integers(0, 512, n) * 8)
    return base + off


def zipf_ranks(rng: np.random.Generator, n: int, items: int, a: float) -> I64:
    """``n`` ranks in [0, items) with P(rank k-1) ~ k^-a (bounded Zipf, the first hottest):
    the most likely ranks exactly (an alias table), the others by the continuous inverse
    CDF of x^-a around them; vectorised (numpy's zipf is unbounded and slow)."""
    prob, alias, p_head, lo, hi = _zipf_table(items, float(a))
    h = len(prob)
    u = rng.random(n)
    pick = rng.integers(0, h, n)
    rank = np.where(rng.random(n) < prob[pick], pick, alias[pick])
    far = np.flatnonzero(u >= p_head)
    if len(far):
        e = 1.0 - a
        x = (lo + (u[far] - p_head) / (1.0 - p_head) * (hi - lo)) ** (1.0 / e)
        rank[far] = np.clip(np.floor(x + 0.5).astype(np.int64) - 1, h, items - 1)
    return rank


@functools.lru_cache(maxsize=64)
def _zipf_table(items: int, a: float, head: int = 64) -> tuple[I64, I64, float, float, float]:
    """Vose's alias table of the ``head`` most likely ranks, their total probability, and
    the bounds of the continuous tail."""
    h = min(items, head)
    e = 1.0 - a
    weights = np.arange(1, h + 1, dtype=float) ** -a
    lo, hi = (h + 0.5) ** e, (items + 0.5) ** e
    tail = (hi - lo) / e if items > h else 0.0
    p_head = float(weights.sum() / (weights.sum() + tail))
    scaled = (weights / weights.sum() * h).tolist()
    prob, alias = [1.0] * h, list(range(h))
    small = [i for i, x in enumerate(scaled) if x < 1.0]
    large = [i for i, x in enumerate(scaled) if x >= 1.0]
    while small and large:
        s_, l_ = small.pop(), large[-1]
        prob[s_], alias[s_] = scaled[s_], l_
        scaled[l_] -= 1.0 - scaled[s_]
        if scaled[l_] < 1.0:
            small.append(large.pop())
    return np.array(prob), np.array(alias, np.int64), p_head, lo, hi


def run_access(sim: Simulation, task: Task, act: Access) -> Generator[Any, Any, None]:
    """Run an Access action on ``task``."""
    p = task.process
    if p is None or p.mm.dead:
        raise MmuEmuError(f"task {task.name!r}: Access needs a live process")
    mm = p.mm
    base, length = act.addr, act.length
    if isinstance(base, str):
        if base not in task.mappings:
            raise MmuEmuError(f"task {task.name!r}: no mapping called {base!r}; known: {sorted(task.mappings)}")
        base, whole = task.mappings[base]
        length = length or whole
    start, end = base & ~4095, (base + length + 4095) & ~4095
    region = _Region(sim, mm, start, end)
    seed = act.seed if act.seed is not None else sim.seed
    rng = np.random.default_rng([seed, sim.tasks.index(task)])
    ns_ps = round(act.ns_per_access * 1000)
    level_ps = np.array([0, sim.l2_hit_ps, sim.l2_hit_ps + sim.walk_ps], np.int64)
    done = 0
    pending: I64 | None = None
    pending_w: NDArray[np.bool_] | None = None
    # after a fault, accesses go one at a time while faults keep coming (COW after a fork),
    # then batches grow back
    size, retry = BATCH, False
    while done < act.count:
        if pending is None:  # the next BATCH accesses of the stream
            m = min(BATCH, act.count - done)
            pending = _addresses(act, base, length, done, m, rng)
            pending_w = rng.random(m) < act.writes if act.writes > 0 else np.zeros(m, bool)
        n = min(size, len(pending))
        addrs, is_w = pending[:n], pending_w[:n]  # type: ignore[index]
        region.refresh()
        tlb = sim.tlbs[task.cpu]
        if size == 1:  # right after a fault: probe the next access alone
            first = int(addrs[0])
            i0 = (first - start) >> 12
            tag = int(make_tags(mm.id, addrs[:1], int(region.shift[i0]))[0])
            if _faults(region, tlb.probe(tag), i0, bool(is_w[0])):
                ok = yield from _fault(sim, task, first, bool(is_w[0]))
                if not ok:
                    return
                retry = True
                continue
            # it goes through: one access, one lookup (fault-dense streams stay cheap)
            level, _ = tlb.access_one(tag, bool(region.writable[i0]))
            _account(sim, task, act, region, _page_of(addrs[:1], start), is_w[:1], np.array([level], np.int8))
            yield from sim.busy(task, ns_ps + int(level_ps[level]), "user", "access")
            done += 1
            pending, pending_w = pending[1:], pending_w[1:]  # type: ignore[index]
            if not len(pending):
                pending = pending_w = None
            size = 1 if retry else 64  # the retried access passed; the next may fault too
            retry = False
            continue
        page = (addrs - start) >> 12
        shift = region.shift[page]
        tags = make_tags(mm.id, addrs, shift)
        pte_w = region.writable[page]
        look, after1, after2 = tlb.peek(tags, pte_w)
        walk = look.level == 2
        bad = (walk & ~region.present[page]) | (is_w & ~look.writable)
        f = int(np.argmax(bad)) if bad.any() else n
        cost = ns_ps + level_ps[look.level[:f]]
        cum = np.cumsum(cost)

        def commit(k: int, tags: I64 = tags, pte_w: Any = pte_w, is_w: Any = is_w, page: I64 = page,
                   look: Any = look, tlb: Any = tlb, after: Any = (after1, after2)) -> None:
            if not k:
                return
            if k == len(tags):  # the whole batch: the looked-up states are the new ones
                tlb.state1, tlb.state2 = after
            else:
                tlb.lookup(tags[:k], pte_w[:k])
            _account(sim, task, act, region, page[:k], is_w[:k], look.level[:k])

        batch = _Batch(sim, task, cum, commit)
        yield from task.wait_activity(batch)
        if batch.done is None:  # ran to its end
            k = f
            commit(k)
        else:
            k = batch.done
        if sim.trace is not None and batch.end > batch.start:
            sim.trace.span(task, "access", batch.start, batch.end, "user")
        done += k
        pending, pending_w = pending[k:], pending_w[k:]  # type: ignore[index]
        if not len(pending):
            pending = pending_w = None
        if batch.cut_ps:
            yield from sim.busy(task, batch.cut_ps, "atomic", "tlb shootdown IPI")
        if batch.preempted:
            yield from sim.sched.preempt(task)
            continue
        if batch.done is None and f < n:
            size, retry = 1, True
            ok = yield from _fault(sim, task, int(addrs[f]), bool(is_w[f]))
            if not ok:
                return
        else:
            size = min(2 * size, BATCH)
    yield from task.return_to_user()


def _page_of(addrs: I64, start: int) -> I64:
    return (addrs - start) >> 12


def _faults(region: _Region, probed: tuple[int, bool], i: int, write: bool) -> bool:
    """Whether an access to page ``i`` must fault, given where the TLB has it: a cached
    entry serves it unless it is a store through a read-only entry; a walk needs the page
    tables to allow it."""
    level, cached_w = probed
    if level < 2:
        return write and not cached_w
    return not region.present[i] or (write and not region.writable[i])


def _account(sim: Simulation, task: Task, act: Access, region: _Region, page: I64, is_w: Any,
              level: NDArray[np.int8]) -> None:
    n = len(page)
    l1 = int((level > 0).sum())
    l2 = int((level == 2).sum())
    task.counts["accesses"] += n
    task.counts["tlb_misses"] += l1
    task.counts["l2_misses"] += l2
    sim.stats["accesses"] += n
    sim.stats["tlb_l1_misses"] += l1
    sim.stats["tlb_walks"] += l2
    if act.token is not None and is_w.any():
        sim.kernel.phys.token[region.pfn[page[is_w]]] = act.token


def _fault(sim: Simulation, task: Task, addr: int, write: bool) -> Generator[Any, Any, bool]:
    """Mirrors: do_user_addr_fault / do_page_fault: lock_vma_under_rcu, falling back to the
    mmap_lock when the VMA is write-locked (a fork in progress); then handle_mm_fault."""
    p = task.process
    assert p is not None
    mm = p.mm
    page = addr & ~4095
    sem = sim.mmap_lock(p)
    locked = mm.id in sim.vma_write_locked or sem.writer is not None
    if locked:
        sim.stats["vma_lock_fallbacks"] += 1
        yield from sim.down(task, sem, "read", "fault")
    task.counts["faults"] += 1
    try:
        yield from run_path(sim, task, fault.fault_range(sim.kernel, mm, page, page + 4096, write=write))
    except MmuEmuError as e:
        sim.errors.append((task.name, f"access at {addr:#x}: {e}"))
        return False
    finally:
        if locked:
            sim.release_rwsem(task, sem)
    sim.pt_changed(mm.id, page, page + 4096)
    sim.flush_tlbs(task, TlbFlush(mm.id, page, page + 4096))
    yield from task.return_to_user()
    return True
