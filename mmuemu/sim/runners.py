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
        if pending and len(work.checkpoints):
            reply, extra = self._breaks(work, pending)
            for name, c in extra.items():
                totals[name] = totals.get(name, 0) + c
            cost = self.costs.total_ps(totals)
        self.need_resched_at = [t for t in self.need_resched_at if t * 1000 >= end]
        self.clock_ps += cost
        self.stats.update(totals)
        for tap in self._taps:
            tap.update(totals)
        return reply

    def _breaks(self, work: Work, pending: list[float]) -> tuple[Break | None, dict[str, int]]:
        """Stop sections at the first checkpoint at or after each need_resched time."""
        item_ps = self.costs.item_ps(work.ops)
        start = self.clock_ps + np.concatenate([[0], np.cumsum(item_ps)[:-1]])
        cps = work.checkpoints
        extra: Counter[str] = Counter()
        first: Break | None = None
        used: set[int] = set()
        for t in pending:
            j = np.searchsorted(start[cps], round(t * 1000), side="left")
            if j >= len(cps) or int(cps[j]) in used:
                continue
            item = int(cps[j])
            used.add(item)
            extra["lock_breaks"] += 1
            extra["ptl_locks"] += len(work.locks)
            extra["cond_resched"] += 1
            self.breaks.append((work.path, item, float(start[item]) / 1000))
            first = first or Break(item)
        return first, dict(extra)

    def tap(self) -> Counter[str]:
        """A counter that sees every operation from now until :meth:`untap`."""
        c: Counter[str] = Counter()
        self._taps.append(c)
        return c

    def untap(self, c: Counter[str]) -> None:
        self._taps.remove(c)
