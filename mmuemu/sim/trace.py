"""Timelines: Chrome trace-event JSON (opens in Perfetto and chrome://tracing).

One track per CPU (what ran there: tasks, user work, kernel paths, lock waits, IPIs,
breaks) and one per lock instance (every hold, named by the path that held it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mmuemu.sim.kpath import Segment
    from mmuemu.sim.tasks import Task

__all__ = ["Trace"]

_CPUS, _LOCKS = 1, 2


def _us(ps: int | float) -> float:
    return ps / 1e6


class Trace:
    """Trace events collected during a simulation (times in ps, written in µs)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._cpu_since: dict[int, tuple[int, str]] = {}
        self._lock_tids: dict[tuple[str, int], int] = {}
        self._holds: list[tuple[str, str, tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]] = []

    # ------------------------------------------------------------ CPUs
    def cpu_begin(self, cpu: int, task: Task, now: int) -> None:
        self._cpu_since[cpu] = (now, task.name)

    def cpu_end(self, cpu: int, task: Task, now: int) -> None:
        since = self._cpu_since.pop(cpu, None)
        if since is not None and now > since[0]:
            self.events.append({"name": since[1], "cat": "task", "ph": "X", "pid": _CPUS, "tid": cpu,
                                "ts": _us(since[0]), "dur": _us(now - since[0])})

    def span(self, task: Task, name: str, start: int, end: int, cat: str) -> None:
        self.events.append({"name": name, "cat": cat, "ph": "X", "pid": _CPUS, "tid": task.cpu or 0,
                            "ts": _us(start), "dur": _us(end - start), "args": {"task": task.name}})

    def instant(self, task: Task, name: str, now: int) -> None:
        self.cpu_instant(task.cpu or 0, name, now, task.name)

    def cpu_instant(self, cpu: int, name: str, now: int, task: str | None = None) -> None:
        ev: dict[str, Any] = {"name": name, "ph": "i", "s": "t", "pid": _CPUS, "tid": cpu, "ts": _us(now)}
        if task:
            ev["args"] = {"task": task}
        self.events.append(ev)

    # ------------------------------------------------------------ locks
    def holds(self, seg: Segment, lo: np.ndarray, hi: np.ndarray, last: int) -> None:
        """Holds of sections ``seg.sec..last`` (work-time bounds ``lo``, ``hi``); kept as
        arrays, expanded into events when the trace is written."""
        starts = seg.t0 + (lo - seg.w0) + seg.delay
        ends = np.minimum(seg.t0 + (hi - seg.w0) + seg.delay, seg.end)
        ids = seg.work.lock_ids[seg.sec : last + 1]
        self._holds.append((seg.work.path, seg.task.name, seg.work.locks, ids, starts, ends))

    def _hold_events(self) -> list[dict[str, Any]]:
        out = []
        for path, task, locks, ids, starts, ends in self._holds:
            ids2 = ids.reshape(len(ids), -1)
            for row, s, e in zip(ids2.tolist(), starts.tolist(), ends.tolist(), strict=True):
                for key in dict.fromkeys(zip(locks, row, strict=False)):
                    tid = self._lock_tids.setdefault(key, len(self._lock_tids))
                    out.append({"name": path, "cat": "lock", "ph": "X", "pid": _LOCKS, "tid": tid,
                                "ts": _us(s), "dur": _us(max(0, e - s)), "args": {"task": task}})
        return out

    # ------------------------------------------------------------ output
    def to_json(self, ncpus: int) -> dict[str, Any]:
        holds = self._hold_events()
        meta: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": _CPUS, "args": {"name": "CPUs"}},
            {"name": "process_name", "ph": "M", "pid": _LOCKS, "args": {"name": "locks"}},
        ]
        meta += [{"name": "thread_name", "ph": "M", "pid": _CPUS, "tid": c, "args": {"name": f"cpu{c}"}}
                 for c in range(ncpus)]
        meta += [{"name": "thread_name", "ph": "M", "pid": _LOCKS, "tid": tid, "args": {"name": f"{k[0]} {k[1]}"}}
                 for k, tid in self._lock_tids.items()]
        return {"traceEvents": meta + self.events + holds, "displayTimeUnit": "ns"}

    def write(self, path: str | Path, ncpus: int) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_json(ncpus)))
        return p
