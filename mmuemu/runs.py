"""Runs of consecutive entries, the unit the vectorised helpers work on.

A run is ``(start, nr)``: ``nr`` consecutive flat indices from ``start``.  Kernel helpers take
one run (``set_ptes(..., ptep, pte, nr)``); mmuemu passes many runs at once as two arrays.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["Rows", "Sel", "as_span", "expand_runs", "flat_index", "run_offsets", "sel_clear", "sel_take", "sel_view"]


def expand_runs(start: NDArray[np.int64], nr: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Flat indices of every entry of the runs, and each entry's offset inside its run."""
    nr = np.asarray(nr, dtype=np.int64)
    total = int(nr.sum())
    if total == len(nr) and bool((nr == 1).all()):  # all runs of length 1: the order-0 case
        return np.asarray(start, dtype=np.int64).copy(), np.zeros(total, dtype=np.int64)
    offset = run_offsets(nr, total)
    return np.repeat(np.asarray(start, dtype=np.int64), nr) + offset, offset


def run_offsets(nr: NDArray[np.int64], total: int | None = None) -> NDArray[np.int64]:
    """Each entry's offset inside its run, for runs of ``nr`` entries laid end to end
    (``total``: their sum, when the caller has it)."""
    total = int(nr.sum()) if total is None else total
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(nr) - nr, nr)


def as_span(idx: NDArray[np.integer]) -> slice | None:
    """``idx`` as a slice when it is one run of consecutive indices, else None.

    A slice reads and writes the state arrays as views, with no gather or scatter: physical
    memory handed out in bulk is contiguous, so this is the common case on the hot paths.
    """
    m = len(idx)
    if not m:
        return None
    lo = int(idx[0])
    if int(idx[-1]) - lo != m - 1:
        return None
    if m > 2 and not (idx[1:] - idx[:-1] == 1).all():
        return None
    return slice(lo, lo + m)


class Rows:
    """Every entry of some whole table rows, in order: a cheaper stand-in for their flat
    indices (row gathers and scatters copy 4 KiB at a time)."""

    __slots__ = ("rows", "width")

    def __init__(self, rows: NDArray[np.int64], width: int) -> None:
        self.rows, self.width = rows, width

    def __len__(self) -> int:
        return len(self.rows) * self.width

    def get(self, store: NDArray[np.uint64]) -> NDArray[np.uint64]:
        return store.reshape(-1, self.width)[self.rows].ravel()

    def put(self, store: NDArray[np.uint64], vals: NDArray[np.uint64]) -> None:
        store.reshape(-1, self.width)[self.rows] = vals.reshape(len(self.rows), self.width)

    def at(self, pos: NDArray[np.int64]) -> NDArray[np.int64]:
        """Flat indices of the entries at these positions of the selection."""
        return self.rows[pos // self.width] * self.width + pos % self.width

    def flat(self) -> NDArray[np.int64]:
        """The flat indices themselves."""
        return (self.rows[:, None] * self.width + np.arange(self.width, dtype=np.int64)[None, :]).ravel()


#: entries of the flat store, in order: flat indices, whole table rows, or one slice
Sel = NDArray[np.int64] | Rows | slice


def flat_index(sel: Sel, pos: NDArray[np.int64] | None = None) -> NDArray[np.int64]:
    """Flat indices of a selection given any way (of its entries at ``pos`` only)."""
    if isinstance(sel, Rows):
        return sel.flat() if pos is None else sel.at(pos)
    if isinstance(sel, slice):
        return np.arange(sel.start, sel.stop, dtype=np.int64) if pos is None else sel.start + pos
    return sel if pos is None else sel[pos]


def sel_view(store: NDArray[np.uint64], sel: Sel) -> NDArray[np.uint64]:
    """The selected entries, as a view where the selection allows (a slice): read only."""
    return sel.get(store) if isinstance(sel, Rows) else store[sel]


def sel_take(store: NDArray[np.uint64], sel: Sel) -> NDArray[np.uint64]:
    """A copy of the selected entries (a slice is copied as one block, rows row by row)."""
    if isinstance(sel, Rows):
        return sel.get(store)
    return store[sel].copy() if isinstance(sel, slice) else store[sel]


def sel_clear(store: NDArray[np.uint64], sel: Sel) -> None:
    """Zero the selected entries."""
    if isinstance(sel, Rows):
        store.reshape(-1, sel.width)[sel.rows] = 0
    else:
        store[sel] = 0
