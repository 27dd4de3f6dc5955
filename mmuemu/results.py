"""Results of a run: tidy records (pandas-ready dicts), counters, lock and latency
statistics, and the timeline."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from attrs import asdict, define, field

from mmuemu.sim.locks import LockBook, LockStat, quantile

if TYPE_CHECKING:
    from mmuemu.sim.simulation import Simulation
    from mmuemu.sim.trace import Trace

__all__ = ["Results"]


@define(eq=False)
class Results:
    """What a run produced.

    ``records`` are tidy rows (a list of dicts, one per task, lock class and path, and
    latency summary; units in the column names); ``counters`` are the operation counts;
    ``latencies`` hold every wakeup as (task, cpu, woken_ns, ran_ns).
    """

    counters: Counter[str] = field(factory=Counter)
    latencies: list[tuple[str, int, float, float]] = field(factory=list)
    #: (task, path, item, time ns) of every lock break
    breaks: list[tuple[str, str, int, float]] = field(factory=list)
    errors: list[tuple[str, str]] = field(factory=list)
    end_ns: float = 0.0
    events: int = 0
    ncpus: int = 1
    _task_rows: list[dict[str, Any]] = field(factory=list)
    _book: LockBook | None = None
    _trace: Trace | None = None
    _records: list[dict[str, Any]] | None = None
    _locks: list[LockStat] | None = None
    #: the resolved config of an experiment (mmuemu.run), its points' parameters, and the
    #: SimPy results of each point's first repetition, by label
    config: Any = None
    points: list[dict[str, Any]] = field(factory=list)
    sims: dict[str, Results] = field(factory=dict)

    @classmethod
    def from_simulation(cls, sim: Simulation) -> Results:
        lat = [(name, cpu, w / 1000, r / 1000) for name, cpu, w, r in sim.sched.latencies]
        rows = []
        for t in sim.tasks:
            row: dict[str, Any] = {"kind": "task", "task": t.name, "cpu": t.cpu,
                                   "done_ns": None if t.done_ps is None else t.done_ps / 1000}
            row.update(t.counts)
            row["fork_ns_mean"] = math.fsum(t.fork_ns) / len(t.fork_ns) if t.fork_ns else None
            rows.append(row)
        return cls(counters=Counter(sim.stats), latencies=lat,
                   breaks=[(t, p, i, ps / 1000) for t, p, i, ps in sim.breaks], errors=list(sim.errors),
                   end_ns=sim.env.now / 1000, events=sim.events, ncpus=len(sim.sched.cpus),
                   task_rows=rows, book=sim.book, trace=sim.trace)

    @property
    def locks(self) -> list[LockStat]:
        """Hold and wait statistics per lock class and path (computed on first use)."""
        if self._locks is None:
            self._locks = self._book.stats() if self._book else []
        return self._locks

    @property
    def records(self) -> list[dict[str, Any]]:
        """Tidy rows: one per task, per lock class and path, and per task that woke up."""
        if self._records is None:
            out = list(self._task_rows)
            out += [{"kind": "lock", **asdict(s)} for s in self.locks]
            for name in sorted({x[0] for x in self.latencies}):
                v = np.sort(self.latency_ns(name))
                out.append({"kind": "latency", "task": name, "wakeups": len(v),
                            "latency_mean_ns": float(v.mean()), "latency_p50_ns": quantile(v, 0.5),
                            "latency_p99_ns": quantile(v, 0.99), "latency_max_ns": float(v[-1])})
            self._records = out
        return self._records

    def latency_ns(self, task: str | None = None) -> np.ndarray:
        """Scheduling latency (ns) of every wakeup (of ``task``)."""
        return np.array([r - w for name, _, w, r in self.latencies if task in (None, name)], dtype=float)

    def hold_times_ns(self, lock: str, path: str | None = None) -> np.ndarray:
        """Every hold of a lock class (on one path), in ns."""
        return self._book.hold_times_ns(lock, path) if self._book else np.zeros(0)

    def wait_times_ns(self, lock: str, path: str | None = None) -> np.ndarray:
        """Every wait for a lock class (on one path), in ns."""
        return self._book.wait_times_ns(lock, path) if self._book else np.zeros(0)

    def lock_histogram(self, lock: str, path: str | None = None, *, waits: bool = False,
                       bins: int | np.ndarray = 20) -> tuple[np.ndarray, np.ndarray]:
        """A histogram of the hold (or, with ``waits``, wait) times of a lock class, as
        numpy.histogram returns it: (counts, bin edges in ns)."""
        values = self.wait_times_ns(lock, path) if waits else self.hold_times_ns(lock, path)
        if not len(values):
            raise ValueError(f"no {'waits' if waits else 'holds'} of lock {lock!r}"
                             f"{'' if path is None else f' on path {path!r}'} in this run")
        return np.histogram(values, bins=bins)

    def task(self, name: str) -> dict[str, Any]:
        """The record of one task."""
        for r in self._task_rows:
            if r["task"] == name:
                return r
        raise KeyError(f"no task {name!r}; tasks: {[r['task'] for r in self._task_rows]}")

    @property
    def has_trace(self) -> bool:
        """Whether this run kept a timeline."""
        return self._trace is not None

    def trace_events(self) -> list[dict[str, Any]]:
        """The timeline's Chrome trace events (CPU tracks, then lock-instance tracks)."""
        if self._trace is None:
            raise ValueError("this run kept no timeline (Machine.simulation(trace=False))")
        events: list[dict[str, Any]] = self._trace.to_json(self.ncpus)["traceEvents"]
        return events

    def write_trace(self, path: str | Path) -> Path:
        """Write the Chrome trace-event timeline (open it in https://ui.perfetto.dev)."""
        if self._trace is None:
            raise ValueError("this run kept no timeline (Machine.simulation(trace=False))")
        return self._trace.write(path, self.ncpus)
