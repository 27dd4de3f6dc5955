"""Resched checkpoints of copy_pte_range's loop, computed for whole ranges at once.

Mirrors: the ``progress`` accounting of mm/memory.c copy_pte_range: every iteration adds to
``progress`` (1 for a none entry, 8 for a non-present one, 8 * nr for a batch of nr present
entries; 8 per present entry before v6.9) and, at the top of the next iteration, a value of
at least 32 resets it and checks ``need_resched()`` / ``spin_needbreak()``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from mmuemu.runs import run_offsets

__all__ = ["RESCHED_PROGRESS", "LazyCheckpoints", "checkpoint_count", "checkpoints"]

RESCHED_PROGRESS = 32
I64 = NDArray[np.int64]


def checkpoint_count(inc: I64 | int, sections: I64, n: int) -> int | None:
    """How many checkpoints, when every item adds the same ``inc`` (else None)."""
    if not isinstance(inc, int):
        return None
    return int(LazyCheckpoints(inc, sections, n).section_counts().sum())


class LazyCheckpoints:
    """The checkpoints of sections whose items all add ``inc``, listed only when called;
    :meth:`section_counts` says how many fall in each section without listing them."""

    __slots__ = ("_cps", "inc", "n", "sections")

    def __init__(self, inc: int, sections: I64, n: int) -> None:
        self.inc, self.sections, self.n = inc, sections, n
        self._cps: I64 | None = None

    def __call__(self) -> I64:
        if self._cps is None:
            self._cps = checkpoints(self.inc, self.sections, self.n)
        return self._cps

    def in_section(self, s: int) -> I64:
        """The checkpoints of section ``s`` (closed form)."""
        k = -(-RESCHED_PROGRESS // self.inc)
        lo = int(self.sections[s])
        hi = int(self.sections[s + 1]) if s + 1 < len(self.sections) else self.n
        return lo + k * np.arange(1, (hi - lo - 1) // k + 1, dtype=np.int64) if hi - lo > 1 else np.zeros(0, np.int64)

    def section_counts(self, lens: I64 | None = None) -> I64:
        """How many checkpoints each section has (``lens``: the section lengths, if known)."""
        k = -(-RESCHED_PROGRESS // self.inc)
        if lens is None:
            s = self.sections
            lens = np.empty(len(s), np.int64)
            lens[:-1] = s[1:] - s[:-1]
            lens[-1:] = self.n - s[-1:]
        return np.maximum(0, (lens - 1) // k)


def checkpoints(inc: I64 | int, sections: I64, n: int | None = None) -> I64:
    """Items before which the loop checks for rescheduling.

    ``inc[i]`` is what item ``i`` adds to progress; ``sections`` holds the first item of each
    lock section (progress restarts at 0 there).  Sections whose items all add the same
    amount take a closed form; the others advance one checkpoint per round, all sections
    at once.
    """
    if isinstance(inc, int):
        assert n is not None
        inc = np.full(n, inc, dtype=np.int64)
    n = len(inc)
    if n == 0:
        return np.zeros(0, np.int64)
    bounds = np.append(sections, n)
    lens = np.diff(bounds)
    first = inc[bounds[:-1]]
    uniform = np.ones(len(lens), bool)
    lo, hi = inc.min(), inc.max()
    change = np.flatnonzero(np.diff(inc) != 0) + 1 if lo != hi else np.zeros(0, np.int64)
    if len(change):
        sec_of = np.searchsorted(bounds, change, side="right") - 1
        inner = change > bounds[sec_of]
        uniform[np.unique(sec_of[inner])] = False
    out: list[I64] = []
    # closed form: a check every k items, k = ceil(32 / inc)
    u = np.flatnonzero(uniform & (lens > 1))
    if len(u):
        k = -(-RESCHED_PROGRESS // first[u])
        counts = (lens[u] - 1) // k
        sec = np.repeat(np.arange(len(u)), counts)
        nth = run_offsets(counts) + 1
        out.append(bounds[u][sec] + nth * k[sec])
    m = np.flatnonzero(~uniform)
    if len(m):
        out.append(_general(inc, bounds, m))
    if not out:
        return np.zeros(0, np.int64)
    if len(out) == 1 and not len(m):
        return out[0]  # closed form only: already in order
    return np.sort(np.concatenate(out))


def _general(inc: I64, bounds: I64, secs: I64) -> I64:
    """Checkpoints of mixed sections: search the next one from each, all sections per round."""
    cum = np.concatenate([[0], np.cumsum(inc)])  # progress before item i, since the start
    pos = bounds[secs].copy()
    ends = bounds[secs + 1]
    found: list[I64] = []
    while len(pos):
        target = cum[pos] + RESCHED_PROGRESS
        nxt = np.searchsorted(cum, target, side="left")
        ok = nxt < ends
        found.append(nxt[ok])
        pos, ends = nxt[ok], ends[ok]
    return np.concatenate(found) if found else np.zeros(0, np.int64)
