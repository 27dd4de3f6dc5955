"""Locks: spinlocks (split page-table locks, PMD locks), rwsems (mmap_lock) and their
hold and wait statistics.

A lock section of a kernel path holds its locks *virtually* while it runs without
contention: nothing is recorded per lock until another task asks for one of them
(:class:`LockTable` then materialises a :class:`SpinLock` with the section's task as its
holder).  That keeps an uncontended fork at one event per lock section.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import TYPE_CHECKING

import numpy as np
import simpy
from attrs import define, field, frozen

if TYPE_CHECKING:
    from mmuemu.sim.tasks import Task

__all__ = ["LockBook", "LockStat", "LockTable", "RwSem", "SpinLock", "quantile"]

Key = tuple[str, int]


@frozen
class LockStat:
    """Hold and wait times (ns) of one lock class on one path."""

    lock: str
    path: str
    holds: int
    hold_mean_ns: float
    hold_p50_ns: float
    hold_p99_ns: float
    hold_max_ns: float
    waits: int
    wait_mean_ns: float
    wait_max_ns: float
    wait_total_ns: float


class LockBook:
    """Hold and wait durations per (lock class, path)."""

    def __init__(self) -> None:
        self._holds: dict[tuple[str, str], list[np.ndarray | tuple[int, int]]] = defaultdict(list)
        self._waits: dict[tuple[str, str], list[float]] = defaultdict(list)
        self._cut: list[tuple[str, str, np.ndarray, int, int, int, int]] = []
        self._alike = False  # some holds are kept as (duration, count)

    def holds(self, lock: str, path: str, durations_ps: np.ndarray) -> None:
        if len(durations_ps):
            self._holds[(lock, path)].append(np.asarray(durations_ps, dtype=np.int64))

    def holds_alike(self, lock: str, path: str, ps: int, count: int) -> None:
        """``count`` holds of ``ps`` each (kept as given, listed when the holds are read)."""
        if count > 0:
            self._holds[(lock, path)].append((ps, count))
            self._alike = True

    def holds_cut(self, lock: str, path: str, section_ps: np.ndarray, lo: int, hi: int, head_ps: int,
                  tail_ps: int) -> None:
        """Holds of sections ``lo..hi-1`` costing ``section_ps``, less ``head_ps`` at the
        first and with ``tail_ps`` added to the last (a segment that began or stopped
        inside a section): kept as given, worked out when the holds are read."""
        if hi > lo:
            self._cut.append((lock, path, section_ps, lo, hi, head_ps, tail_ps))

    def _settle(self) -> None:
        for lock, path, sec, lo, hi, head, tail in self._cut:
            dur = sec[lo:hi].copy()
            dur[0] -= head
            dur[-1] += tail
            self._holds[(lock, path)].append(dur)
        self._cut.clear()
        if self._alike:
            for v in self._holds.values():
                v[:] = [np.full(a[1], a[0], np.int64) if isinstance(a, tuple) else a for a in v]
            self._alike = False

    def wait(self, lock: str, path: str, ps: int) -> None:
        self._waits[(lock, path)].append(ps / 1000)

    def hold_times_ns(self, lock: str, path: str | None = None) -> np.ndarray:
        """Every hold of ``lock`` (on ``path``, or on any), in ns."""
        self._settle()
        parts = [a for (lk, p), v in self._holds.items() if lk == lock and path in (None, p) for a in v]
        return np.concatenate(parts) / 1000 if parts else np.zeros(0)

    def wait_times_ns(self, lock: str, path: str | None = None) -> np.ndarray:
        vals = [w for (lk, p), v in self._waits.items() if lk == lock and path in (None, p) for w in v]
        return np.asarray(vals, dtype=float)

    def stats(self) -> list[LockStat]:
        self._settle()
        out = []
        for key in sorted(set(self._holds) | set(self._waits)):
            h = np.sort(np.concatenate(self._holds[key])) / 1000 if self._holds.get(key) else np.zeros(0)
            w = np.asarray(self._waits.get(key, []), dtype=float)
            out.append(LockStat(
                key[0], key[1], len(h),
                float(h.mean()) if len(h) else 0.0, quantile(h, 0.5), quantile(h, 0.99),
                float(h[-1]) if len(h) else 0.0,
                len(w), float(w.mean()) if len(w) else 0.0, float(w.max()) if len(w) else 0.0,
                float(w.sum()),
            ))
        return out


def quantile(sorted_values: np.ndarray, q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly (numpy's default)."""
    n = len(sorted_values)
    if not n:
        return 0.0
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


@define(eq=False)
class SpinLock:
    """A contended spinlock: its holder and the tasks spinning on it, in arrival order."""

    key: Key
    holder: Task | None = None
    waiters: deque[tuple[Task, simpy.Event]] = field(factory=deque)


class LockTable:
    """Materialised spinlocks by (class, id)."""

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self.locks: dict[Key, SpinLock] = {}

    def holder(self, key: Key) -> Task | None:
        lk = self.locks.get(key)
        return lk.holder if lk is not None else None

    def take(self, key: Key, task: Task) -> None:
        lk = self.locks.setdefault(key, SpinLock(key))
        assert lk.holder is None or lk.holder is task, f"{key} is held by {lk.holder}"
        lk.holder = task

    def wait(self, key: Key, task: Task, holder: Task) -> simpy.Event:
        """Queue ``task`` on a lock ``holder`` holds; the event fires when it is handed over."""
        lk = self.locks.setdefault(key, SpinLock(key))
        if lk.holder is None:
            lk.holder = holder
        ev = self.env.event()
        lk.waiters.append((task, ev))
        return ev

    def release(self, key: Key, task: Task) -> bool:
        """Release ``key`` if ``task`` holds it materially; hand it to the first waiter.
        Returns whether there was a waiter."""
        lk = self.locks.get(key)
        if lk is None or lk.holder is not task:
            return False
        if lk.waiters:
            nxt, ev = lk.waiters.popleft()
            lk.holder = nxt
            ev.succeed()
            return True
        del self.locks[key]
        return False


@define(eq=False)
class RwSem:
    """Mirrors: a read-write semaphore (mmap_lock): readers share, a writer excludes; a
    queued writer holds back later readers (FIFO hand-off); waiters sleep."""

    name: str
    readers: set[Task] = field(factory=set)
    writer: Task | None = None
    queue: deque[tuple[Task, str, simpy.Event]] = field(factory=deque)

    def try_acquire(self, task: Task, mode: str) -> bool:
        if mode == "read":
            if self.writer is None and not self.queue:
                self.readers.add(task)
                return True
            return False
        if self.writer is None and not self.readers and not self.queue:
            self.writer = task
            return True
        return False

    def enqueue(self, env: simpy.Environment, task: Task, mode: str) -> simpy.Event:
        ev = env.event()
        self.queue.append((task, mode, ev))
        return ev

    def release(self, task: Task) -> list[Task]:
        """Release ``task``'s hold; grant the queue's head (all leading readers, or one
        writer). Returns the tasks granted."""
        if self.writer is task:
            self.writer = None
        else:
            self.readers.discard(task)
        granted: list[Task] = []
        while self.queue:
            t, mode, ev = self.queue[0]
            if mode == "write":
                if self.writer is None and not self.readers:
                    self.writer = t
                    self.queue.popleft()
                    ev.succeed()
                    granted.append(t)
                break
            if self.writer is not None:
                break
            self.readers.add(t)
            self.queue.popleft()
            ev.succeed()
            granted.append(t)
        return granted
