"""The time a Work takes, per lock section and (lazily) per item.

A runner that keeps one event per lock section needs every section's cost; it needs item
costs only when something interrupts a section (to find the next resched checkpoint).
Section costs are summed straight from the operation counts: a count given for every item
is multiplied by the section lengths, and counts given for sorted items are split at the
section starts with one search per section, so a section costs nothing per item.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mmuemu.mm.progress import RESCHED_PROGRESS, LazyCheckpoints
from mmuemu.mm.work import ALL, Work
from mmuemu.sim.costs import CostModel

__all__ = ["WorkTiming", "ps_table"]

I64 = NDArray[np.int64]


class WorkTiming:
    """Costs (picoseconds) of one Work: ``total``, ``section`` (one per section) and
    ``starts`` (cumulative, so ``starts[s]`` is when section ``s`` begins and
    ``starts[-1] == total``); :meth:`item_start` gives item positions on demand."""

    __slots__ = ("_const", "_ends", "_item_cum", "_line", "_other", "_ranged", "_section", "_starts", "costs",
                 "section_ps", "total", "width", "work")

    def __init__(self, costs: CostModel | Mapping[str, int], work: Work, extra_ps: dict[str, int] | None = None) -> None:
        if isinstance(costs, CostModel):
            costs = ps_table(costs, extra_ps)
        self.costs, self.work = costs, work
        ops = work.ops
        n = ops.n_items
        sections = work.sections
        n_sec = len(sections)
        self._ends: I64 | None = None
        self._section: I64 | None = None
        self._starts: I64 | None = None
        width = _uniform_width(sections, n)
        # counts given for every item as one number cost the same per item, and counts
        # given once per section the same per section: sum each kind once
        const = per_section = 0
        other: list[tuple[int, object, object]] = []
        for name in ops.names():
            p = costs.get(name, 0)
            if not p:
                continue
            for count, items in ops._parts.get(name, ()):
                if isinstance(count, np.ndarray):
                    other.append((p, count, items))
                elif items is ALL:
                    const += p * int(count)  # type: ignore[call-overload]
                elif items is sections:
                    per_section += p * int(count)  # type: ignore[call-overload]
                    other.append((p, count, items))
                else:
                    other.append((p, count, items))
        scalar = width * const + per_section if width else None
        #: the length of every section when they are all alike (else 0)
        self.width = width
        rest = []
        for p, count, items in other:
            if items is sections and not isinstance(count, np.ndarray):
                continue
            if isinstance(items, LazyCheckpoints) and items.sections is sections and scalar is not None:
                k = -(-RESCHED_PROGRESS // items.inc)
                scalar += p * int(count) * max(0, (width - 1) // k)  # type: ignore[call-overload]
                continue
            rest.append((p, count, items))
        self._const, self._other = const, other
        self._ranged: list[tuple[str, Any, Any]] | None = None
        #: every section's cost when they all cost the same (else None); then the
        #: per-section arrays are built only if somebody asks for them
        self.section_ps = scalar if not rest else None
        if self.section_ps is not None:
            self.total = n_sec * self.section_ps
        else:
            lens = self.ends - sections
            sec = np.full(n_sec, scalar, np.int64) if scalar is not None else lens * const + per_section
            for p, count, items in rest:
                sec += p * _section_counts(count, items, sections, lens, n)
            self._section = sec
            starts = np.zeros(len(sec) + 1, np.int64)
            np.cumsum(sec, out=starts[1:])
            self._starts = starts
            self.total = int(starts[-1])
        self._item_cum: I64 | None = None
        self._line: dict[int, tuple[int, int, int] | None] = {}

    @property
    def ends(self) -> I64:
        """Where each section ends (its last item + 1)."""
        if self._ends is None:
            sections = self.work.sections
            ends = np.empty(len(sections), np.int64)
            ends[:-1] = sections[1:]
            ends[-1] = self.work.ops.n_items
            self._ends = ends
        return self._ends

    @property
    def section(self) -> I64:
        """Every section's cost."""
        if self._section is None:
            self._section = np.full(len(self.work.sections), self.section_ps, np.int64)
        return self._section

    @property
    def starts(self) -> I64:
        """When each section begins, and the total last."""
        if self._starts is None:
            self._starts = np.arange(len(self.work.sections) + 1, dtype=np.int64) * int(self.section_ps or 0)
        return self._starts

    def item_start(self, items: I64) -> I64:
        """When each of these items begins (ps from the start of the Work)."""
        items = np.asarray(items, dtype=np.int64)
        if self._item_cum is None and len(items):
            s0 = self.section_of(int(items.min()))
            if s0 == self.section_of(int(items.max())):
                return self._in_section(s0, items)
        return self._all_items(items)

    def item_start_in(self, s: int, items: I64) -> I64:
        """:meth:`item_start` for items known to lie in section ``s``."""
        return self._in_section(s, items) if self._item_cum is None else self._item_cum[items]

    def _in_section(self, s: int, items: I64) -> I64:
        """Starts of items of section ``s``: the uniform cost times the items before, plus
        each sparse count's items before (a search per count, nothing per item)."""
        lo = int(self.work.sections[s])
        out = self.start_of(s) + self._const * (items - lo)
        for kind, a, b in self._ranged_parts():
            if kind == "first":  # counted at each section's first item
                out = out + a * (items > lo)
            elif kind == "lazy":
                out = out + a * np.searchsorted(b.in_section(s), items)
            elif kind == "item0":
                out = out + (a * (items > 0) if lo == 0 else 0)
            elif kind == "cum":
                out = out + (a[items] - a[lo])
            else:
                out = out + (a[np.searchsorted(b, items)] - a[np.searchsorted(b, lo)])
        return out  # type: ignore[no-any-return]

    def item_start_at(self, s: int, x: int) -> int:
        """:meth:`item_start` of one item ``x`` of section ``s``, in plain integers (no
        array calls: for searches that probe a few items)."""
        lo = int(self.work.sections[s])
        out = self.start_of(s) + self._const * (x - lo)
        for kind, a, b in self._ranged_parts():
            if kind == "first":
                out += a if x > lo else 0
            elif kind == "lazy":
                hi = self.end_of(s)
                k = -(-RESCHED_PROGRESS // b.inc)  # checkpoints at lo + k, lo + 2k, ... before hi
                out += a * max(0, min((x - lo - 1) // k, (hi - lo - 1) // k))
            elif kind == "item0":
                out += a if lo == 0 and x > 0 else 0
            elif kind == "cum":
                out += int(a[x] - a[lo])
            else:
                out += int(a[bisect.bisect_left(b, x)] - a[bisect.bisect_left(b, lo)])
        return out

    def checkpoint_line(self, s: int, k: int) -> tuple[int, int] | None:
        """When the checkpoints of section ``s`` every ``k`` items begin, as a line: item
        ``lo + j*k`` (``j >= 1``) starts at ``base + j*step``.  None unless the costs make
        it exact (counts per item alike, per section, at item 0, or lazy checkpoints every
        ``k`` items)."""
        if k not in self._line:
            step, off, off0 = self._const * k, 0, 0
            part: tuple[int, int, int] | None = None
            for kind, a, b in self._ranged_parts():
                if kind == "first":
                    off += a
                elif kind == "item0":
                    off0 += a  # (in the section that starts at item 0 only)
                elif kind == "lazy" and -(-RESCHED_PROGRESS // b.inc) == k:
                    off -= a  # checkpoint j has j - 1 checks before it
                    step += a
                else:
                    break
            else:
                part = (off, off0, step)
            self._line[k] = part
        part = self._line[k]
        if part is None:
            return None
        off, off0, step = part
        base = self.start_of(s) + off + (off0 if int(self.work.sections[s]) == 0 else 0)
        return base, step

    def start_of(self, s: int) -> int:
        """When section ``s`` begins (``start_of(len)`` is the total), as a plain int."""
        return s * self.section_ps if self.section_ps is not None else int(self.starts[s])

    def end_of(self, s: int) -> int:
        """Where section ``s`` ends (its last item + 1), as a plain int."""
        sections = self.work.sections
        return int(sections[s + 1]) if s + 1 < len(sections) else self.work.ops.n_items

    def section_at(self, w: int) -> int:
        """The section running at Work-time ``w`` (-1 before the first, ``len`` after)."""
        if self.section_ps:
            return max(-1, w // self.section_ps) if w < self.total else len(self.work.sections)
        return int(np.searchsorted(self.starts, w, side="right")) - 1

    def _ranged_parts(self) -> list[tuple[str, Any, Any]]:
        """The non-uniform counts, each ready for range queries (built once)."""
        if self._ranged is None:
            secs = self.work.sections
            out: list[tuple[str, Any, Any]] = []
            for p, c, i in self._other:
                if i is secs and not isinstance(c, np.ndarray):
                    out.append(("first", p * int(c), None))  # type: ignore[call-overload]
                elif isinstance(i, LazyCheckpoints) and i.sections is secs:
                    out.append(("lazy", p * int(c), i))  # type: ignore[call-overload]
                elif i is ALL:  # (an array: scalar counts are in the uniform cost)
                    out.append(("cum", np.concatenate([[0], np.cumsum(p * np.asarray(c, np.int64))]), None))
                elif i is None:
                    out.append(("item0", p * int(np.sum(c)), None))  # type: ignore[call-overload]
                else:
                    c2, idx = _sorted_part(c, i)
                    w = p * np.broadcast_to(np.asarray(c2, np.int64), np.shape(idx))
                    out.append(("sparse", np.concatenate([[0], np.cumsum(w)]), idx))
            self._ranged = out
        return self._ranged

    def _all_items(self, items: I64) -> I64:
        if self._item_cum is None:
            ops = self.work.ops
            per = np.zeros(ops.n_items, np.int64)
            for name in ops.names():
                p = self.costs.get(name, 0)
                if p:
                    per += p * ops.per_item(name)
            self._item_cum = np.concatenate([[0], np.cumsum(per)])
            # section sums and item sums agree exactly (integer picoseconds)
            assert int(self._item_cum[-1]) == self.total, "item and section costs disagree"
        return self._item_cum[items]

    def section_of(self, item: int) -> int:
        """The section holding ``item``."""
        if self.width:
            return min(item // self.width, len(self.work.sections) - 1)
        return int(np.searchsorted(self.work.sections, item, side="right") - 1)


def _uniform_width(sections: I64, n: int) -> int:
    """The number of items of every section, when all sections have the same (else 0):
    scalar probes first, one vector test only when they all pass."""
    n_sec = len(sections)
    if n_sec == 1:
        return n if int(sections[0]) == 0 else 0
    width = n // n_sec if n % n_sec == 0 else 0
    if not width or int(sections[1]) != width or int(sections[-1]) != n - width:
        return 0
    if n_sec > 2 and not bool((sections[1:] - sections[:-1] == width).all()):
        return 0
    return width


def ps_table(costs: CostModel, extra: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every operation's cost in picoseconds (``extra`` adds or overrides)."""
    out = {name: costs.ps(name) for name in costs.ns}
    out.update(extra or {})
    return out


def _section_counts(count: object, items: object, sections: I64, lens: I64, n: int) -> I64:
    """Per-section sums of one part of an Ops (``count`` for ``items``); counts of one
    number for every item or every section never get here (WorkTiming sums them apart)."""
    s = len(sections)
    if items is ALL:  # an array of counts, one per item
        return np.add.reduceat(np.asarray(count, np.int64), sections) if n else np.zeros(s, np.int64)
    if isinstance(items, LazyCheckpoints) and items.sections is sections:
        return items.section_counts(lens) * int(count)  # type: ignore[call-overload]
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


def _is_sorted(a: I64) -> bool:
    return bool((a[1:] >= a[:-1]).all())


def _sorted_part(count: object, items: object) -> tuple[object, I64]:
    """A part's items listed and in order (with their counts)."""
    if callable(items):
        items = items()
    idx = np.atleast_1d(np.asarray(items, dtype=np.int64))
    if len(idx) > 1 and not _is_sorted(idx):
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        if isinstance(count, np.ndarray) and count.ndim:
            count = count[order]
    return count, idx
