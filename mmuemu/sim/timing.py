"""The time a Work takes, per lock section and (lazily) per item.

A runner that keeps one event per lock section needs every section's cost; it needs item
costs only when something interrupts a section (to find the next resched checkpoint).
Section costs are summed straight from the operation counts: a count given for every item
is multiplied by the section lengths, and counts given for sorted items are split at the
section starts with one search per section, so a section costs nothing per item.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from mmuemu.mm.progress import LazyCheckpoints
from mmuemu.mm.work import ALL, Work
from mmuemu.sim.costs import CostModel

__all__ = ["WorkTiming"]

I64 = NDArray[np.int64]


class WorkTiming:
    """Costs (picoseconds) of one Work: ``total``, ``section`` (one per section) and
    ``starts`` (cumulative, so ``starts[s]`` is when section ``s`` begins and
    ``starts[-1] == total``); :meth:`item_start` gives item positions on demand."""

    __slots__ = ("_cache", "_const", "_item_cum", "_other", "costs", "ends", "extra", "section", "starts",
                 "total", "work")

    def __init__(self, costs: CostModel, work: Work, extra_ps: dict[str, int] | None = None) -> None:
        self.costs, self.work, self.extra = costs, work, extra_ps
        ops = work.ops
        n = ops.n_items
        sections = work.sections
        self.ends = np.append(sections[1:], n).astype(np.int64)
        lens = self.ends - sections
        # counts given for every item as one number cost the same per item: sum them once
        const = 0
        other: list[tuple[int, object, object]] = []
        for name in ops.names():
            p = _ps(costs, name, extra_ps)
            if not p:
                continue
            for count, items in ops._parts.get(name, ()):
                if items is ALL and not isinstance(count, np.ndarray):
                    const += p * int(count)  # type: ignore[call-overload]
                else:
                    other.append((p, count, items))
        sec = lens * const
        for p, count, items in other:
            sec += p * _section_counts(count, items, sections, lens, n)
        self._const, self._other = const, other
        self.section = sec
        self.starts = np.concatenate([[0], np.cumsum(sec)])
        self.total = int(self.starts[-1])
        self._item_cum: I64 | None = None
        self._cache: dict[int, I64] = {}

    def item_start(self, items: I64) -> I64:
        """When each of these items begins (ps from the start of the Work)."""
        items = np.asarray(items, dtype=np.int64)
        if self._item_cum is None and len(items):
            s0 = self.section_of(int(items.min()))
            if s0 == self.section_of(int(items.max())):
                return self._in_section(s0, items)
        return self._all_items(items)

    def _in_section(self, s: int, items: I64) -> I64:
        """Item starts computed from one section's items only (a section costs its length)."""
        cum = self._cache.get(s)
        lo = int(self.work.sections[s])
        if cum is None:
            hi = int(self.ends[s])
            per = np.full(hi - lo, self._const, np.int64)
            for i, (p, count, its) in enumerate(self._other):
                if callable(its):  # listed once, kept
                    its = its()
                    self._other[i] = (p, count, its)
                per += p * _range_counts(count, its, lo, hi)
            cum = np.concatenate([[0], np.cumsum(per)]) + self.starts[s]
            self._cache[s] = cum
        return cum[items - lo]

    def _all_items(self, items: I64) -> I64:
        if self._item_cum is None:
            ops = self.work.ops
            per = np.zeros(ops.n_items, np.int64)
            for name in ops.names():
                p = _ps(self.costs, name, self.extra)
                if p:
                    per += p * ops.per_item(name)
            self._item_cum = np.concatenate([[0], np.cumsum(per)])
            # section sums and item sums agree exactly (integer picoseconds)
            assert int(self._item_cum[-1]) == self.total, "item and section costs disagree"
        return self._item_cum[items]

    def section_of(self, item: int) -> int:
        """The section holding ``item``."""
        return int(np.searchsorted(self.work.sections, item, side="right") - 1)


def _ps(costs: CostModel, name: str, extra: dict[str, int] | None) -> int:
    if extra and name in extra:
        return extra[name]
    return costs.ps(name)


def _section_counts(count: object, items: object, sections: I64, lens: I64, n: int) -> I64:
    """Per-section sums of one part of an Ops (``count`` for ``items``)."""
    s = len(sections)
    if items is ALL:
        if isinstance(count, np.ndarray):
            return np.add.reduceat(count.astype(np.int64), sections) if n else np.zeros(s, np.int64)
        return lens * int(count)  # type: ignore[call-overload]
    if isinstance(items, LazyCheckpoints) and items.sections is sections:
        return items.section_counts() * int(count)  # type: ignore[call-overload]
    if callable(items):
        items = items()
    if items is None:
        out = np.zeros(s, np.int64)
        out[0] = int(np.sum(count))  # type: ignore[call-overload]
        return out
    idx = np.atleast_1d(np.asarray(items, dtype=np.int64))
    if not len(idx):
        return np.zeros(s, np.int64)
    if len(idx) > 1 and not bool((idx[1:] >= idx[:-1]).all()):
        sec_of = np.searchsorted(sections, idx, side="right") - 1
        cnt = np.broadcast_to(np.asarray(count, dtype=np.int64), idx.shape)
        return np.bincount(sec_of, weights=cnt, minlength=s).astype(np.int64)
    cut = np.searchsorted(idx, sections, side="left")
    cut = np.append(cut, len(idx))
    if isinstance(count, np.ndarray) and count.ndim:
        cum = np.concatenate([[0], np.cumsum(count.astype(np.int64))])
        return cum[cut[1:]] - cum[cut[:-1]]
    return np.diff(cut) * int(count)  # type: ignore[call-overload]


def _range_counts(count: object, items: object, lo: int, hi: int) -> I64:
    """Per-item counts of one part of an Ops for items ``lo..hi-1``."""
    out = np.zeros(hi - lo, np.int64)
    if items is ALL:
        out += count[lo:hi] if isinstance(count, np.ndarray) else int(count)  # type: ignore[call-overload]
        return out
    if callable(items):
        items = items()
    if items is None:
        if lo == 0:
            out[0] += int(np.sum(count))  # type: ignore[call-overload]
        return out
    idx = np.atleast_1d(np.asarray(items, dtype=np.int64))
    cnt = np.broadcast_to(np.asarray(count, dtype=np.int64), idx.shape)
    if len(idx) > 1 and not bool((idx[1:] >= idx[:-1]).all()):
        keep = (idx >= lo) & (idx < hi)
        idx, cnt = idx[keep], cnt[keep]
    else:
        a, b = np.searchsorted(idx, [lo, hi])
        idx, cnt = idx[a:b], cnt[a:b]
    np.add.at(out, idx - lo, cnt)
    return out
