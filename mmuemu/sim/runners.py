"""Runners execute the mm core's kernel paths and own simulated time.

The instant runner is for library use: one CPU, no contention, a virtual clock.  It runs a
path's generator to the end, charging each :class:`~mmuemu.mm.work.Work` by the cost model.
It can be told to raise ``need_resched`` at given simulated times; a section running then
stops at its next resched checkpoint (a lock break), exactly as the kernel would.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Generator
from typing import Any, TypeVar

import numpy as np
from attrs import define, field

from mmuemu.mm.work import Break, Work
from mmuemu.sim.costs import CostModel

__all__ = ["InstantRunner"]

T = TypeVar("T")


@define(eq=False)
class InstantRunner:
    """Runs kernel paths serially on a virtual clock (picoseconds)."""

    costs: CostModel
    stats: Counter[str] = field(factory=Counter)
    clock_ps: int = 0
    #: simulated times (ns) at which need_resched is set on the running CPU
    need_resched_at: list[float] = field(factory=list)
    #: (work path, item, time ns) of every lock break taken
    breaks: list[tuple[str, int, float]] = field(factory=list)
    _taps: list[Counter[str]] = field(factory=list)

    @property
    def now_ns(self) -> float:
        return self.clock_ps / 1000

    def resched_at(self, *times_ns: float) -> None:
        """Set need_resched at these simulated times (ns)."""
        for t in times_ns:
            bisect.insort(self.need_resched_at, float(t))

    def run(self, gen: Generator[Work, Any, T]) -> T:
        """Drive a kernel path to completion; return what it returns."""
        reply: Break | None = None
        try:
            work = gen.send(None)
            while True:
                reply = self.execute(work)
                work = gen.send(reply)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def execute(self, work: Work) -> Break | None:
        """Charge one Work; return a Break if a pending need_resched stopped a section."""
        totals = dict(work.ops.totals)
        cost = self.costs.total_ps(totals)
        reply: Break | None = None
        end = self.clock_ps + cost
        pending = [t for t in self.need_resched_at if t * 1000 < end]
        if pending and (work.cond_resched or len(work.checkpoints)):
            reply, extra, handled = self._reschedule(work, pending)
            for name, c in extra.items():
                totals[name] = totals.get(name, 0) + c
            cost = self.costs.total_ps(totals)
            self.need_resched_at = [t for t in self.need_resched_at if t not in handled]
        self.clock_ps += cost
        self.stats.update(totals)
        for tap in self._taps:
            tap.update(totals)
        return reply

    def _reschedule(self, work: Work, pending: list[float]) -> tuple[Break | None, dict[str, int], set[float]]:
        """Honour need_resched at the first point the path checks it after it was set: a
        checkpoint inside a section (the lock is dropped: a lock break) or the
        cond_resched() that ends a section."""
        item_ps = self.costs.item_ps(work.ops)
        start = self.clock_ps + np.concatenate([[0], np.cumsum(item_ps)])
        cps = work.checkpoints
        ends = np.append(work.sections[1:], work.ops.n_items) if work.cond_resched else np.zeros(0, np.int64)
        extra: Counter[str] = Counter()
        first: Break | None = None
        handled: set[float] = set()
        for t in pending:
            tp = round(t * 1000)
            j = np.searchsorted(start[cps], tp, side="left")
            cp_item = int(cps[j]) if j < len(cps) else None
            e = np.searchsorted(start[ends], tp, side="left")
            end_item = int(ends[e]) if e < len(ends) else None
            if cp_item is None and end_item is None:
                continue  # not checked in this work: stays pending
            handled.add(t)
            if end_item is not None and (cp_item is None or end_item <= cp_item):
                extra["resched_yields"] += 1
                self.breaks.append((work.path + ":cond_resched", end_item, float(start[end_item]) / 1000))
                continue
            assert cp_item is not None
            extra["lock_breaks"] += 1
            extra["ptl_locks"] += len(work.locks)
            extra["cond_resched"] += 1
            extra["resched_yields"] += 1
            self.breaks.append((work.path, cp_item, float(start[cp_item]) / 1000))
            first = first or Break(cp_item)
        return first, dict(extra), handled

    def tap(self) -> Counter[str]:
        """A counter that sees every operation from now until :meth:`untap`."""
        c: Counter[str] = Counter()
        self._taps.append(c)
        return c

    def untap(self, c: Counter[str]) -> None:
        self._taps.remove(c)
