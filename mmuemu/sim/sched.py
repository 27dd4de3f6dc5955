"""The scheduler: per-CPU run queues, need_resched, the tick and the preemption models.

Mirrors the parts of kernel/sched/core.c an mm developer meets around fork():
``resched_curr`` on wakeup preemption, ``scheduler_tick`` (time slices, and promoting a lazy
resched request under PREEMPT_LAZY), ``cond_resched`` and the preemption models:

- ``none`` and ``voluntary``: kernel code is preempted only where it calls
  ``cond_resched()`` (or returns to user space); ``spin_needbreak()`` is false.
- ``full``: kernel code is preempted as soon as it holds no spinlock (when the last one is
  released); ``cond_resched()`` is a no-op; ``spin_needbreak()`` reports lock waiters.
- ``lazy``: like ``full``, but a wakeup of a normal task only sets NEED_RESCHED_LAZY, which
  the kernel acts on at the next tick (when it becomes NEED_RESCHED) or on return to user.

The scheduler does not model fairness beyond round-robin slices.  A woken task is queued
ahead of the tasks that were preempted (behind earlier wakeups): a task that slept has lag
to spend, so EEVDF picks it before the CPU hogs; with ``wakeup_preempt`` it asks the
running task to yield.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import simpy
from attrs import define, field

from mmuemu.errors import InvalidArgument

if TYPE_CHECKING:
    from mmuemu.sim.tasks import Task

__all__ = ["PREEMPT_MODELS", "Cpu", "Scheduler"]

PREEMPT_MODELS = ("none", "voluntary", "full", "lazy")


@define(eq=False)
class Cpu:
    """One CPU: its current task, run queue and resched flags."""

    index: int
    current: Task | None = None
    rq: deque[Task] = field(factory=deque)
    need_resched: bool = False
    need_resched_lazy: bool = False
    #: when the current task started its time slice (ps)
    slice_start: int = 0
    #: whether a tick is scheduled (NO_HZ: only while something on the CPU needs one)
    tick_pending: bool = False


class Scheduler:
    """Run queues and preemption for ``ncpus`` CPUs of a SimPy environment (time in ps)."""

    def __init__(self, env: simpy.Environment, ncpus: int, model: str, hz: int,
                 slice_ns: float = 3_000_000.0, wakeup_preempt: bool = True) -> None:
        if model not in PREEMPT_MODELS:
            raise InvalidArgument(f"preemption model {model!r}; allowed: {', '.join(PREEMPT_MODELS)}")
        if not isinstance(hz, int) or not 1 <= hz <= 10_000:
            raise InvalidArgument(f"hz {hz!r} must be an integer in 1..10000 (Linux uses 100, 250, 300 or 1000)")
        self.env = env
        self.model = model
        self.hz = hz
        self.tick_ps = 10**12 // hz
        self.slice_ps = round(slice_ns * 1000)
        self.wakeup_preempt = wakeup_preempt
        self.cpus = [Cpu(i) for i in range(ncpus)]
        #: (task name, cpu, woken at ps, ran at ps) of every wakeup
        self.latencies: list[tuple[str, int, int, int]] = []
        self.trace: Any = None

    @property
    def now(self) -> int:
        return int(self.env.now)

    # ------------------------------------------------------------ model queries
    @property
    def preemptible(self) -> bool:
        """Kernel code can be preempted outside spinlocks (full, lazy)."""
        return self.model in ("full", "lazy")

    def spin_needbreak(self) -> bool:
        """Mirrors: spin_needbreak: waiters make a holder break only under preemptible models."""
        return self.preemptible

    # ------------------------------------------------------------ CPU ownership
    def pick_cpu(self, task: Task) -> Cpu:
        """The pinned CPU, else an idle one (the last one used first), else the least loaded."""
        if task.pin is not None:
            return self.cpus[task.pin]
        last = self.cpus[task.cpu] if task.cpu is not None else None
        if last is not None and last.current is None and not last.rq:
            return last
        idle = [c for c in self.cpus if c.current is None and not c.rq]
        if idle:
            return idle[0]
        return min(self.cpus, key=lambda c: (len(c.rq), c.index))

    def acquire(self, task: Task, woken: bool = False) -> Any:
        """Get a CPU for ``task`` (a SimPy sub-generator); a ``woken`` task's scheduling
        latency is recorded when it runs."""
        turn = self.request(task, woken)
        if turn is not None:
            yield turn

    def request(self, task: Task, woken: bool = False) -> simpy.Event | None:
        """:meth:`acquire` as one call: None when ``task`` runs at once, else the event
        of its turn."""
        cpu = self.cpus[task.pin] if task.pin is not None else self.pick_cpu(task)
        task.woken_at = self.env.now if woken else None  # type: ignore[assignment]  # (integer ps)
        if cpu.current is None and not cpu.rq:
            self._run(cpu, task)
            return None
        ev = self.env.event()
        task.turn = ev
        if woken:  # behind earlier wakeups, ahead of the preempted tasks
            cpu.rq.insert(sum(1 for t in cpu.rq if t.woken_at is not None), task)
        else:
            cpu.rq.append(task)
        self.wake_tick(cpu)
        if woken and self.wakeup_preempt and cpu.current is not None:
            self.resched_curr(cpu, lazy=self.model == "lazy")
        return ev

    def release(self, task: Task) -> None:
        """``task`` stops running (sleeps, blocks or exits): the next runnable task runs."""
        cpu = self.cpus[task.cpu]
        assert cpu.current is task, f"{task.name} does not own cpu {cpu.index}"
        cpu.current = None
        cpu.need_resched = cpu.need_resched_lazy = False
        if self.trace is not None:
            self.trace.cpu_end(cpu.index, task, self.now)
        if cpu.rq:
            self._dispatch(cpu)

    def preempt(self, task: Task) -> Any:
        """``task`` yields the CPU to the next runnable task and queues behind it (schedule()
        from cond_resched or preemption); a no-op when nothing else is runnable."""
        cpu = self.cpus[task.cpu]
        cpu.need_resched = cpu.need_resched_lazy = False
        if not cpu.rq:
            return
        self.release(task)
        ev = self.env.event()
        task.turn = ev
        task.woken_at = None
        cpu.rq.append(task)
        self.wake_tick(cpu)
        yield ev

    def _dispatch(self, cpu: Cpu) -> None:
        if cpu.current is None and cpu.rq:
            nxt = cpu.rq.popleft()
            self._run(cpu, nxt)
            assert nxt.turn is not None
            nxt.turn.succeed()

    def _run(self, cpu: Cpu, task: Task) -> None:
        now: int = self.env.now  # type: ignore[assignment]  # (SimPy's clock holds integer ps)
        cpu.current = task
        cpu.slice_start = now
        task.cpu = cpu.index
        task.on_cpu(cpu.index)
        if task.woken_at is not None:
            self.latencies.append((task.name, cpu.index, task.woken_at, now))
            task.woken_at = None
        if self.trace is not None:
            self.trace.cpu_begin(cpu.index, task, now)

    # ------------------------------------------------------------ resched requests
    def resched_curr(self, cpu: Cpu, lazy: bool = False) -> None:
        """Mirrors: resched_curr / resched_curr_lazy: ask the CPU's task to reschedule."""
        if lazy:
            cpu.need_resched_lazy = True
            self.wake_tick(cpu)
        else:
            cpu.need_resched = True
        if cpu.current is not None:
            cpu.current.poke(("resched",))

    def wants_switch(self, task: Task, user: bool = False) -> bool:
        """Whether ``task`` should schedule now at a preemption point: NEED_RESCHED, or (on
        return to user space) NEED_RESCHED_LAZY, with somebody else runnable."""
        cpu = self.cpus[task.cpu]
        flag = cpu.need_resched or (user and cpu.need_resched_lazy)
        if flag and not cpu.rq:
            cpu.need_resched = cpu.need_resched_lazy = False
            return False
        return flag

    def wake_tick(self, cpu: Cpu) -> None:
        """Restart a stopped tick, on the tick grid: somebody waits on the CPU, or a lazy
        request is pending."""
        if cpu.tick_pending:
            return
        cpu.tick_pending = True
        tick = self.env.timeout(self.tick_ps - self.now % self.tick_ps)
        tick.callbacks.append(lambda _ev: self._tick(cpu))

    def _tick(self, cpu: Cpu) -> None:
        """Mirrors: scheduler_tick: end the time slice when others wait; under PREEMPT_LAZY
        promote a lazy request to NEED_RESCHED.  Like NO_HZ, the tick stops while nothing
        on the CPU needs it (no task waiting, no lazy request).  A tick is a timeout with
        this callback, not a process: it costs one event and no process switch."""
        cpu.tick_pending = False
        if cpu.current is not None:
            if cpu.need_resched_lazy and not cpu.need_resched:
                self.resched_curr(cpu)
            elif cpu.rq and self.now - cpu.slice_start >= self.slice_ps:
                self.resched_curr(cpu)
        if cpu.rq or cpu.need_resched_lazy:
            self.wake_tick(cpu)
