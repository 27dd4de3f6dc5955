"""Kernel paths on simulated CPUs: lock sections as timed segments that contention cuts.

A Work's lock sections run as *segments*: one SimPy timeout covers every section up to the
first one whose lock somebody else holds, so an uncontended fork costs one event per Work.
Contention reshapes a running segment (:meth:`Segment.on`):

- ``resched`` (NEED_RESCHED set on the CPU): stop at the first resched checkpoint or
  section end after now, where copy_pte_range tests ``need_resched()`` (a lock break), then
  schedule;
- ``needbreak`` (a task spins on a lock of the running section): under preemptible models
  (``spin_needbreak()``) stop at the next checkpoint, else at the end of the section, and
  hand the lock over;
- ``claim`` (a task took a lock a later section needs): stop before that section;
- ``ipi`` (a TLB shootdown interrupts the CPU): everything after now moves later.

After a break the path restarts at the item it stopped before (copy_pte_range's
``again:``), re-taking its locks; the checkpoints stay where they were, since a break
happens where ``progress`` was reset anyway.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from mmuemu.mm.progress import RESCHED_PROGRESS, LazyCheckpoints
from mmuemu.mm.work import Break, Work
from mmuemu.sim.timing import WorkTiming

if TYPE_CHECKING:
    from mmuemu.sim.simulation import Simulation
    from mmuemu.sim.tasks import Task

__all__ = ["Busy", "Segment", "run_path", "sections_holding"]

Key = tuple[str, int]


class Busy:
    """A timed activity of a task: runs until ``end`` (ps) unless a poke moves it.

    ``mode`` is ``"user"`` (preempted by any resched request), ``"kernel"`` (preempted
    only under preemptible models, by NEED_RESCHED) or ``"atomic"`` (spinlock held: never).
    """

    __slots__ = ("end", "mode", "planned", "preempted", "sim", "start", "task")

    def __init__(self, sim: Simulation, task: Task, ps: int, mode: str) -> None:
        self.sim, self.task, self.mode = sim, task, mode
        self.start = sim.now_ps
        self.planned = self.start + ps
        self.end = self.planned
        self.preempted = False

    def on(self, cause: tuple[Any, ...], now: int) -> bool:
        if cause[0] == "ipi":
            self.end += cause[1]
            self.planned += cause[1]
            return bool(cause[1])
        if cause[0] != "resched" or self.mode == "atomic" or now >= self.end:
            return False
        cpu = self.sim.sched.cpus[self.task.cpu]
        if self.mode == "user":
            go = cpu.need_resched or cpu.need_resched_lazy
        else:
            go = self.sim.sched.preemptible and cpu.need_resched
        if go and cpu.rq:
            self.end = now
            self.preempted = True
            return True
        return False

    @property
    def remaining(self) -> int:
        return self.planned - self.end


class Segment:
    """Consecutive lock sections of one Work, from item ``item`` of section ``sec`` up to
    (not including) section ``stop``, as one timed activity."""

    __slots__ = ("brk", "brk_w", "delay", "end", "item", "resched", "sec", "sim", "stop", "t0", "task", "timing",
                 "w0", "work")

    def __init__(self, sim: Simulation, task: Task, work: Work, timing: WorkTiming, sec: int,
                 item: int, stop: int, w0: int | None = None, lead: int = 0) -> None:
        self.sim, self.task, self.work, self.timing = sim, task, work, timing
        self.sec, self.item, self.stop = sec, item, stop
        self.t0 = sim.now_ps + lead  # ``lead``: work done first (re-taking the locks after a break)
        #: where the segment starts in the Work's own time (ps)
        self.w0 = timing.start_of(sec) if w0 is None else w0
        self.delay = 0
        self.brk: int | None = None
        self.brk_w = 0  # the break item's start in the Work's time
        self.resched = False
        self.end = self.real(timing.start_of(stop))

    def real(self, w: int) -> int:
        return self.t0 + (w - self.w0) + self.delay

    def current_section(self, now: int) -> int:
        s = self.timing.section_at(now - self.t0 - self.delay + self.w0)
        return min(max(s, self.sec), self.stop - 1)

    def keys(self, s: int) -> list[Key]:
        """The locks section ``s`` holds, as (class, id)."""
        return _section_keys(self.work, s)

    def find(self, key: Key, now: int) -> tuple[int, bool] | None:
        """The section of this segment that holds ``key`` now or will take it: (section,
        held now)."""
        if key[0] not in self.work.locks:
            return None
        cur = self.current_section(now)
        hit = sections_holding(self.work, key, cur, self.stop)
        if not len(hit):
            return None
        s = cur + int(hit[0])
        return s, s == cur and now < self.end

    # ------------------------------------------------------------ contention
    def on(self, cause: tuple[Any, ...], now: int) -> bool:
        kind = cause[0]
        if kind == "ipi":  # (arm64's broadcast invalidations cost the CPU nothing)
            self.delay += cause[1]
            self.end += cause[1]
            return bool(cause[1])
        if now >= self.end:
            return False
        if kind == "claim":
            c = int(cause[1])
            if c >= self.stop:
                return False
            self.stop = c
            new = self.real(self.timing.start_of(c))
            if new < self.end:
                self.end, self.brk = new, None
            return True
        sched = self.sim.sched
        if kind == "resched":
            cpu = sched.cpus[self.task.cpu]
            if not cpu.need_resched:  # need_resched() ignores a lazy request
                return False
            self.resched = True
            switch_at_end = self.work.cond_resched or sched.preemptible
            return self._stop_early(now, checkpoints=True, at_section_end=switch_at_end)
        if kind == "needbreak":
            return self._stop_early(now, checkpoints=sched.spin_needbreak(), at_section_end=True)
        return False

    def _next_checkpoint(self, s: int, w: int) -> tuple[int, int] | None:
        """The first checkpoint of section ``s`` (after a restart point) that starts at or
        after Work-time ``w``: (item, its start)."""
        lazy = self.work.checkpoint_rule
        t = self.timing
        if isinstance(lazy, LazyCheckpoints) and lazy.sections is self.work.sections:
            # checkpoints every k items: search them with scalar probes
            lo, hi = int(self.work.sections[s]), t.end_of(s)
            k = -(-RESCHED_PROGRESS // lazy.inc)
            first = 1 if s != self.sec else (self.item - lo) // k + 1
            last = (hi - lo - 1) // k
            line = t.checkpoint_line(s, k)
            if line is not None:  # starts grow by the same step: solve for the first
                base, step = line
                j = first if step <= 0 else max(first, -(-(w - base) // step))
                if j > last or base + j * step < w:
                    return None
                return lo + j * k, base + j * step
            a, b = first, last + 1
            if a < b:  # checkpoint starts grow almost linearly in j: guess, then check
                s_a = t.item_start_at(s, lo + a * k)
                if s_a >= w:
                    return lo + a * k, s_a
                step = t.item_start_at(s, lo + (a + 1) * k) - s_a if a < last else 0
                if step > 0:
                    g = min(last, a + 1 + (w - s_a - 1) // step)
                    s_g = t.item_start_at(s, lo + g * k)
                    if s_g >= w and t.item_start_at(s, lo + (g - 1) * k) < w:
                        return lo + g * k, s_g
                a += 1
            while a < b:  # first j with start(lo + j*k) >= w
                mid = (a + b) // 2
                if t.item_start_at(s, lo + mid * k) >= w:
                    b = mid
                else:
                    a = mid + 1
            if a > last:
                return None
            return lo + a * k, t.item_start_at(s, lo + a * k)
        cand = self.work.section_checkpoints(s)
        if s == self.sec:  # a restarted section: only the checkpoints after its restart
            cand = cand[cand > self.item]
        if not len(cand):
            return None
        times = t.item_start_in(s, cand)
        j = int(np.searchsorted(times, w, side="left"))
        return (int(cand[j]), int(times[j])) if j < len(cand) else None

    def _stop_early(self, now: int, checkpoints: bool, at_section_end: bool) -> bool:
        """End the segment at the first checkpoint (if ``checkpoints``) or section end (if
        ``at_section_end``) after now."""
        s = self.current_section(now)
        w = now - self.t0 - self.delay + self.w0
        best: tuple[int, int | None, int, int] | None = None  # (time, break item, stop, work time)
        if checkpoints:
            found = self._next_checkpoint(s, w)
            if found is not None:
                best = (self.real(found[1]), found[0], s + 1, found[1])
        if best is None and at_section_end:
            best = (self.real(self.timing.start_of(s + 1)), None, s + 1, 0)
        if best is None or best[0] > self.end:
            return False
        self.end, self.brk, self.stop, self.brk_w = best[0], best[1], min(self.stop, best[2]), best[3]
        return True


def run_path(sim: Simulation, task: Task, gen: Generator[Work, Any, Any],
             mm_id: int | None = None) -> Generator[Any, Any, Any]:
    """Drive a kernel path on ``task``'s CPU; return what the path returns.  A path that
    changes the page tables of mm ``mm_id`` reports it as each of its Works is written."""
    reply: Break | None = None
    while True:
        sim.kernel.cpu = task.cpu or 0
        try:
            work = gen.send(reply)
        except StopIteration as stop:
            return stop.value
        finally:
            if mm_id is not None:
                sim.pt_changed(mm_id, by=task)
        reply = yield from execute(sim, task, work)


def execute(sim: Simulation, task: Task, work: Work) -> Generator[Any, Any, Break | None]:
    """Run one Work: a plain timed activity, or its lock sections as segments."""
    totals = dict(work.ops.totals)
    if not work.locks and len(work.sections) == 1 and not work.cond_resched:
        ps = sim.total_ps(totals)
        yield from sim.busy(task, ps, "kernel", work.path)
        sim.account(task, work, totals)
        return None
    reply: Break | None = None
    timing = WorkTiming(sim.ps, work)
    n_sec = len(work.sections)
    classes = sorted(set(work.locks))
    s, item = 0, 0
    w0: int | None = None  # the restart point's start in the Work's time, after a break
    lead = 0  # the cost of restarting after a break, paid before the next segment
    while s < n_sec:
        others = bool(sim.locks.locks or sim.segments)  # somebody else may hold a lock
        if others:
            for key in _section_keys(work, s):
                yield from sim.spin_lock(task, key, work.path)
        stop = sim.first_conflict(task, work, s + 1, n_sec) if others else n_sec
        seg = Segment(sim, task, work, timing, s, item, stop, w0, lead)
        lead = 0
        yield from sim.run_segment(task, seg)
        last = timing.section_of(seg.brk) if seg.brk is not None else seg.stop - 1
        _record_holds(sim, seg, classes, last)
        if sim.locks.locks:  # only materialised (contended) locks need releasing: every one
            # this segment's sections took (a lock claimed for its first section included)
            for key in [k for k, lk in sim.locks.locks.items() if lk.holder is task and k[0] in classes]:
                sim.locks.release(key, task)
        switch = seg.resched and sim.sched.wants_switch(task)
        if seg.brk is not None:
            extra = {"lock_breaks": 1, "ptl_locks": len(work.locks), "cond_resched": 1}
            if switch:
                extra["resched_yields"] = 1
            reply = reply or Break(seg.brk)
            for name, c in extra.items():
                totals[name] = totals.get(name, 0) + c
            sim.note_break(task, work, seg.brk)
            if switch:
                yield from sim.sched.preempt(task)
            s, item, w0, lead = last, seg.brk, seg.brk_w, sim.total_ps(extra)
            continue
        if switch:  # at a section end: cond_resched(), or preemption at the unlock
            totals["resched_yields"] = totals.get("resched_yields", 0) + 1
            yield from sim.sched.preempt(task)
        s, w0 = seg.stop, None
        item = int(work.sections[s]) if s < n_sec else work.ops.n_items
    sim.account(task, work, totals)
    return reply


def sections_holding(work: Work, key: Key, lo: int, hi: int) -> NDArray[np.intp]:
    """Which of sections ``lo..hi-1`` hold lock ``key`` (positions from ``lo``)."""
    cls, ident = key
    ids = work.lock_ids[lo:hi]
    if ids.ndim == 1:
        return np.flatnonzero(ids == ident)
    cols = [j for j, c in enumerate(work.locks) if c == cls]
    return np.flatnonzero((ids[:, cols] == ident).any(axis=1))


def _section_keys(work: Work, s: int) -> list[Key]:
    if not work.locks:
        return []
    row = work.lock_ids[s]
    if np.ndim(row) == 0:
        return [(work.locks[0], int(row))]
    seen: list[Key] = []
    for cls, i in zip(work.locks, row.tolist(), strict=True):
        if (cls, int(i)) not in seen:
            seen.append((cls, int(i)))
    return seen


def _record_holds(sim: Simulation, seg: Segment, classes: list[str], last: int) -> None:
    """Hold times of sections ``seg.sec..last`` (a broken section counts its part)."""
    if not classes:
        return
    t = seg.timing
    whole = (seg.w0 == t.start_of(seg.sec) and not seg.delay and seg.brk is None
             and seg.end - seg.t0 + seg.w0 == t.start_of(last + 1))
    if whole and sim.trace is None:  # whole sections, nothing moved them: their costs
        if t.section_ps is not None:  # (all alike: kept as one number and a count)
            for cls in classes:
                sim.book.holds_alike(cls, seg.work.path, t.section_ps, last + 1 - seg.sec)
            return
        dur = t.section[seg.sec : last + 1]
        for cls in classes:
            sim.book.holds(cls, seg.work.path, dur)
        return
    # the sections' costs, less what ran before the restart point and after the stop
    w_end = seg.end - seg.t0 - seg.delay + seg.w0
    head = seg.w0 - t.start_of(seg.sec)
    tail = seg.delay - max(0, t.start_of(last + 1) - w_end)
    for cls in classes:
        sim.book.holds_cut(cls, seg.work.path, t.section, seg.sec, last + 1, head, tail)
    if sim.trace is not None:
        lo = t.starts[seg.sec : last + 1].copy()
        hi = t.starts[seg.sec + 1 : last + 2].copy()
        lo[0] = seg.w0
        hi[-1] = min(int(hi[-1]), w_end)
        sim.trace.holds(seg, lo, hi, last)
