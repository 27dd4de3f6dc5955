"""Work as data: what a kernel path did, item by item, and where it held which locks.

Kernel paths in the mm core are generators.  Each ``yield`` hands the runner a :class:`Work`:
the operation counts of the path (per item of work, so a runner can find out how far a
section got by a given time), the lock sections the items fall into, and the items before
which the kernel checks for rescheduling (``progress >= 32`` in ``copy_pte_range``).  The
runner answers with ``None``, or with a :class:`Break` when it made a section stop early.

The core does not know what an operation costs; the runners do (``sim.costs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from attrs import define, frozen
from numpy.typing import NDArray

__all__ = ["ALL", "Break", "Ops", "TlbFlush", "Work"]


_ALL = object()
#: items marker for :meth:`Ops.add`: every item of the Ops, in order
ALL = _ALL


class Ops:
    """Operation counts attributable to items of work.

    ``add(name, count, items)`` records ``count`` operations called ``name``; ``items`` says
    which item each count belongs to (``None``: item 0).  Totals are kept eagerly; per-item
    arrays are built only when a runner asks, so the fast path pays one sum per call.
    """

    __slots__ = ("_parts", "flushes", "n_items", "totals")

    def __init__(self, n_items: int = 1) -> None:
        self.n_items = max(int(n_items), 1)
        self.totals: dict[str, int] = {}
        self._parts: dict[str, list[tuple[object, object]]] = {}
        #: TLB invalidations the path issued (a runner with TLBs applies them)
        self.flushes: list[TlbFlush] = []

    def add_each(self, name: str, count: int = 1) -> None:
        """Count ``count`` operations ``name`` for every item."""
        if count and self.n_items:
            self.totals[name] = self.totals.get(name, 0) + int(count) * self.n_items
            self._parts.setdefault(name, []).append((count, _ALL))

    def add(self, name: str, count: object, items: object = None) -> None:
        """Count ``count`` (an int or an array matching ``items``) operations ``name``;
        ``items`` may be :data:`ALL`."""
        if isinstance(count, np.ndarray) and count.ndim == 1 and count.strides[0] == 0 and len(count):
            count = int(count[0])  # a broadcast scalar: keep no array
        if isinstance(count, np.ndarray):
            total = int(count.sum())
        else:
            total = int(count)  # type: ignore[call-overload]
            if items is _ALL:
                total *= self.n_items
            elif items is not None and not isinstance(items, int | np.integer):
                total *= len(items)  # type: ignore[arg-type]
        if total == 0:
            return
        self.totals[name] = self.totals.get(name, 0) + total
        self._parts.setdefault(name, []).append((count, items))

    def add_lazy(self, name: str, total: int, items: Callable[[], NDArray[np.int64]]) -> None:
        """Count ``total`` operations, one per item that ``items()`` lists when asked."""
        if total:
            self.totals[name] = self.totals.get(name, 0) + int(total)
            self._parts.setdefault(name, []).append((1, items))

    def merge(self, other: Ops, item_offset: int = 0) -> None:
        """Add every count of ``other``, its items shifted by ``item_offset``."""
        self.flushes.extend(other.flushes)
        for name, parts in other._parts.items():
            for count, items in parts:
                if items is _ALL:
                    items = np.arange(other.n_items)
                if callable(items):
                    items = items()
                if items is None:
                    items = item_offset
                else:
                    items = np.asarray(items) + item_offset
                self.add(name, count, items)

    def per_item(self, name: str) -> NDArray[np.int64]:
        """The count of ``name`` for every item."""
        out = np.zeros(self.n_items, dtype=np.int64)
        for count, items in self._parts.get(name, ()):
            if items is _ALL:
                out += count if isinstance(count, np.ndarray) else int(count)  # type: ignore[call-overload]
                continue
            if callable(items):
                items = items()
            if items is None:  # all of it belongs to item 0
                out[0] += int(np.sum(count))  # type: ignore[call-overload]
                continue
            idx = items
            idx_arr = np.atleast_1d(np.asarray(idx, dtype=np.int64))
            cnt = np.broadcast_to(np.asarray(count, dtype=np.int64), idx_arr.shape)
            out += np.bincount(idx_arr, weights=cnt, minlength=self.n_items).astype(np.int64)
        return out

    def names(self) -> Iterable[str]:
        return self.totals.keys()


@frozen
class TlbFlush:
    """A TLB invalidation issued by a path: the entries of mm ``mm`` in [start, end) (the
    whole address space when ``end`` is None), on every CPU that may cache them."""

    mm: int
    start: int = 0
    end: int | None = None


def _frozen(a: NDArray[np.int64]) -> NDArray[np.int64]:
    a.flags.writeable = False
    return a


#: the defaults every Work shares (read-only): one section from item 0, no locks, no checkpoints
_ONE_SECTION = _frozen(np.zeros(1, dtype=np.int64))
_NONE = _frozen(np.zeros(0, dtype=np.int64))


@define
class Work:
    """One yield of a kernel path: items of work in lock sections.

    ``sections`` holds the first item of every lock section (sorted, starting at 0);
    ``locks`` names the lock classes held in each section (empty: no lock) and ``lock_ids``
    identifies the lock instances per section (the page-table page for split ptlocks): one
    id per section, or a row of one id per lock class.
    ``checkpoints`` lists the items before which the path tests ``need_resched()`` and
    ``spin_needbreak()``; a runner may stop the section there.
    """

    path: str
    ops: Ops
    sections: NDArray[np.int64] = _ONE_SECTION
    locks: tuple[str, ...] = ()
    lock_ids: NDArray[np.int64] = _NONE
    _checkpoints: NDArray[np.int64] | Callable[[], NDArray[np.int64]] = _NONE
    #: each section ends with a cond_resched() (copy_pte_range does, once per table pass)
    cond_resched: bool = False

    @property
    def checkpoints(self) -> NDArray[np.int64]:
        """Items before which a resched check happens (computed on first use)."""
        if callable(self._checkpoints):
            self._checkpoints = self._checkpoints()
        return self._checkpoints

    @property
    def checkpoint_rule(self) -> object | None:
        """The closed form the checkpoints follow (an object with ``in_section``), while
        they have not been listed; None otherwise."""
        cps = self._checkpoints
        return cps if hasattr(cps, "in_section") else None

    def section_checkpoints(self, s: int) -> NDArray[np.int64]:
        """The checkpoints inside section ``s``."""
        cps = self._checkpoints
        in_section = getattr(cps, "in_section", None)
        if in_section is not None:
            return in_section(s)  # type: ignore[no-any-return]
        cps = self.checkpoints
        lo = self.sections[s]
        hi = self.sections[s + 1] if s + 1 < len(self.sections) else self.ops.n_items
        a, b = np.searchsorted(cps, [lo, hi])
        return cps[a:b]

    @property
    def totals(self) -> Mapping[str, int]:
        return self.ops.totals


@frozen
class Break:
    """A runner's answer: the section holding ``item`` stopped before it (a lock break)."""

    item: int
