"""The SimPy runner: a machine's CPUs, scheduler, locks and TLBs running tasks.

``Machine.simulation()`` makes one; ``add_task`` gives it tasks (threads of processes, or
kernel threads) with programs of actions; ``run()`` returns :class:`~mmuemu.results.Results`.
Simulated time is kept in integer picoseconds, so an uncontended kernel path takes exactly
the time the instant runner charges for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import simpy

from mmuemu.errors import InvalidArgument, InvariantError
from mmuemu.mm.work import TlbFlush, Work
from mmuemu.sim.kpath import Busy, Segment, sections_holding
from mmuemu.sim.locks import LockBook, LockTable, RwSem
from mmuemu.sim.program import check_program
from mmuemu.sim.sched import Scheduler
from mmuemu.sim.tasks import Task
from mmuemu.sim.timing import ps_table
from mmuemu.sim.tlb import Tlb, TlbGeometry
from mmuemu.sim.trace import Trace

if TYPE_CHECKING:
    from mmuemu.machine import Machine
    from mmuemu.process import Process
    from mmuemu.results import Results

__all__ = ["Simulation"]

Key = tuple[str, int]


class Simulation:
    """A discrete-event run of tasks on ``machine`` (see ``Machine.simulation``)."""

    def __init__(self, machine: Machine, preempt: str = "none", hz: int = 250, *,
                 slice_ns: float = 3_000_000.0, wakeup_preempt: bool = True, trace: bool = True,
                 seed: int = 0) -> None:
        self.machine = machine
        self.kernel = machine.kernel
        self.costs = machine.costs
        self.env = simpy.Environment()
        self.sched = Scheduler(self.env, machine.cpus, preempt, hz, slice_ns, wakeup_preempt)
        self.locks = LockTable(self.env)
        self.book = LockBook()
        self.trace: Trace | None = Trace() if trace else None
        self.sched.trace = self.trace
        self.stats: Counter[str] = Counter()
        #: picoseconds per operation (``busy_ns`` counts nanoseconds of plain work)
        self.ps = ps_table(self.costs, {"busy_ns": 1000})
        self.tasks: list[Task] = []
        self.segments: list[Segment] = []
        self.mmap_locks: dict[int, RwSem] = {}
        #: mms whose VMAs a fork holds write-locked (vma_start_write)
        self.vma_write_locked: set[int] = set()
        self.seed = seed
        c = self.costs
        geo1 = TlbGeometry(int(c.param("l1_entries", 64)), int(c.param("l1_ways", 4)))
        geo2 = TlbGeometry(int(c.param("l2_entries", 1536)), int(c.param("l2_ways", 12)))
        self.tlbs = [Tlb(geo1, geo2) for _ in range(machine.cpus)]
        self.ipi_ps = round(c.param("ipi_handler_ns", 1000.0) * 1000)
        self.l2_hit_ps = round(c.param("l2_hit_ns", 3.0) * 1000)
        self.walk_ps = round(c.param("walk_ns", 30.0) * 1000)
        #: the TLB caches a contpte block as one entry; x86 coalesces 4 contiguous pages
        self.tlb_cont = bool(getattr(machine.arch, "contpte", False) or machine.arch.name.startswith("arm64"))
        self.tlb_coalesce4 = bool(c.param("coalesce4", 0))
        #: page-table change tracking for the access streams' cached walks
        self.mm_epoch: dict[int, int] = {}
        self.mm_patches: dict[int, list[tuple[int, int]]] = {}
        self.breaks: list[tuple[str, str, int, int]] = []
        self.errors: list[tuple[str, str]] = []
        self.events = 0
        self.live = 0
        self._all_done = self.env.event()
        self._ran = False

    def __repr__(self) -> str:
        return f"<Simulation {len(self.tasks)} tasks preempt={self.sched.model} hz={self.sched.hz}>"

    # ------------------------------------------------------------ set-up
    def add_task(self, process: Process | None, program: Sequence[Any] | Any = (), *, cpu: int | None = None,
                 name: str | None = None, start_ns: float = 0.0) -> Task:
        """A task running ``program``: a thread of ``process`` (None: a kernel thread),
        pinned to ``cpu`` or migratable; it starts at ``start_ns``."""
        if self._ran:
            raise InvalidArgument("this simulation has run; make a new one with Machine.simulation()")
        if cpu is not None and (not isinstance(cpu, int) or not 0 <= cpu < self.machine.cpus):
            raise InvalidArgument(f"cpu {cpu!r} does not exist; this machine has 0..{self.machine.cpus - 1}")
        if process is not None and process.machine is not self.machine:
            raise InvalidArgument(f"process {process.name!r} belongs to another machine")
        prog = check_program(program, f"task {name or len(self.tasks)} program")
        t = Task(self, process, prog, name or f"task{len(self.tasks)}", pin=cpu, start_ps=round(start_ns * 1000))
        self.tasks.append(t)
        return t

    def run(self, until_ns: float | None = None) -> Results:
        """Run every task to the end of its program (or until ``until_ns``)."""
        from mmuemu.results import Results

        if self._ran:
            raise InvalidArgument("this simulation has already run")
        self._ran = True
        for t in self.tasks:  # mm_cpumask starts empty: CPUs join as the threads run
            if t.process is not None:
                t.process.mm.cpumask = set()
        for t in list(self.tasks):
            t.start()
        if self.live:  # until every task is done (or ``until_ns``, whichever comes first)
            end: simpy.Event = self._all_done
            if until_ns is not None:
                end = simpy.AnyOf(self.env, [self._all_done, self.env.timeout(round(until_ns * 1000))])
            try:
                self.env.run(until=end)
            except RuntimeError as e:  # SimPy ran out of events with tasks still waiting
                stuck = [f"{lk.key} held by {lk.holder.name if lk.holder else None}, waited on by "
                         f"{[t.name for t, _ in lk.waiters]}" for lk in self.locks.locks.values()]
                raise InvariantError(f"simulation deadlock at {self.now_ns:.0f} ns: {e}; "
                                     f"locks: {stuck or 'none'}") from None
        leaked = [lk.key for lk in self.locks.locks.values() if lk.holder is not None and lk.holder.done_ps is not None]
        if leaked:
            raise InvariantError(f"finished tasks still hold spinlocks {leaked}")
        self.machine.runner.stats.update(self.stats)
        return Results.from_simulation(self)

    @property
    def now_ns(self) -> float:
        return self.now_ps / 1000

    @property
    def now_ps(self) -> int:
        """Simulated time (SimPy's clock, in integer picoseconds)."""
        return int(self.env.now)

    # ------------------------------------------------------------ time
    def total_ps(self, totals: Counter[str] | dict[str, int]) -> int:
        ps = self.ps
        return sum(ps[name] * int(c) for name, c in totals.items() if name in ps)

    def busy(self, task: Task, ps: int, mode: str, what: str) -> Generator[Any, Any, None]:
        """Spend ``ps`` on ``task``'s CPU; user and (under preemptible models) kernel work is
        preempted when asked and resumes later."""
        while ps > 0:
            act = Busy(self, task, ps, mode)
            yield from task.wait_activity(act)
            if self.trace is not None and act.end > act.start:
                self.trace.span(task, what, act.start, act.end, "user" if mode == "user" else "kernel")
            if not act.preempted:
                return
            ps = act.remaining
            yield from self.sched.preempt(task)

    def busy_rest(self, task: Task, act: Busy, what: str) -> Generator[Any, Any, None]:
        """Finish :meth:`busy` of an activity that a poke moved or cut while the task
        waited for its first timeout."""
        yield from task.wait_activity(act)  # (at once when it was cut to now)
        if self.trace is not None and act.end > act.start:
            self.trace.span(task, what, act.start, act.end, "user" if act.mode == "user" else "kernel")
        if act.preempted:
            yield from self.sched.preempt(task)
            yield from self.busy(task, act.remaining, act.mode, what)

    def run_segment(self, task: Task, seg: Segment) -> Generator[Any, Any, None]:
        self.segments.append(seg)
        cpu = self.sched.cpus[task.cpu]
        if cpu.need_resched:
            seg.on(("resched",), self.now_ps)
        try:
            yield from task.wait_activity(seg)
        finally:
            self.segments.remove(seg)

    def account(self, task: Task, work: Work, totals: dict[str, int]) -> None:
        stats = self.stats
        for name, c in totals.items():
            stats[name] += c
        for f in work.ops.flushes:
            self.flush_tlbs(task, f)

    def note_break(self, task: Task, work: Work, item: int) -> None:
        self.breaks.append((task.name, work.path, item, self.now_ps))
        if self.trace is not None:
            self.trace.instant(task, f"lock break ({work.path})", self.now_ps)

    # ------------------------------------------------------------ locks
    def spin_lock(self, task: Task, key: Key, path: str) -> Generator[Any, Any, None]:
        """Mirrors: spin_lock: take ``key``, spinning (CPU kept) while another task holds it."""
        now = self.now_ps
        holder = self.locks.holder(key)
        if holder is None or holder is task:
            for seg in self.segments:
                if seg.task is task:
                    continue
                found = seg.find(key, now)
                if found is None:
                    continue
                sec, held = found
                if held:
                    holder = seg.task
                    break
                self.locks.take(key, task)  # first come: the segment stops before it
                seg.task.poke(("claim", sec))
                return
            else:
                return  # free (or already ours): held virtually, nothing to record
        if holder is task:
            return
        ev = self.locks.wait(key, task, holder)
        if self.trace is not None:
            self.trace.instant(task, f"spin on {key[0]} {key[1]}", now)
        holder.poke(("needbreak", key))
        yield ev
        self.book.wait(key[0], path, self.now_ps - now)
        if self.trace is not None and self.now_ps > now:
            self.trace.span(task, f"wait {key[0]}", now, self.now_ps, "lock wait")

    def first_conflict(self, task: Task, work: Work, s0: int, n: int) -> int:
        """The first section from ``s0`` whose locks another task holds (else ``n``)."""
        if s0 >= n or not work.locks:
            return n
        held: list[Key] = [k for k, lk in self.locks.locks.items() if lk.holder is not task]
        for seg in self.segments:
            if seg.task is not task:
                held.extend(seg.keys(seg.current_section(self.now_ps)))
        best = n
        for key in held:
            if key[0] not in work.locks:
                continue
            hit = sections_holding(work, key, s0, n)
            if len(hit):
                best = min(best, s0 + int(hit[0]))
        return best

    def mmap_lock(self, process: Process) -> RwSem:
        mm = process.mm
        sem = self.mmap_locks.get(mm.id)
        if sem is None:
            sem = self.mmap_locks[mm.id] = RwSem(f"mmap_lock mm{mm.id}")
        return sem

    def down(self, task: Task, sem: RwSem, mode: str, path: str) -> Generator[Any, Any, None]:
        """Mirrors: down_read / down_write: sleep (CPU given up) until granted."""
        if sem.try_acquire(task, mode):
            return
        now = self.now_ps
        ev = sem.enqueue(self.env, task, mode)
        self.sched.release(task)
        yield ev
        yield from self.sched.acquire(task, woken=True)
        self.book.wait("mmap_lock", path, self.now_ps - now)
        if self.trace is not None:
            self.trace.span(task, f"wait mmap_lock ({mode})", now, self.now_ps, "lock wait")

    def release_rwsem(self, task: Task, sem: RwSem) -> None:
        """Mirrors: up_read / up_write (the granted tasks wake up)."""
        sem.release(task)

    # ------------------------------------------------------------ task life
    def spawn(self, process: Process, program: tuple[Any, ...], *, name: str, cpu: int | None,
              parent: Task) -> Task:
        """A new task made while running (a forked child): runnable at once."""
        t = Task(self, process, program, name, pin=cpu)
        t.cpu = parent.cpu if cpu is None else cpu
        self.tasks.append(t)
        t.start()
        return t

    def task_done(self, task: Task) -> None:
        self.live -= 1
        if self.live == 0 and not self._all_done.triggered:
            self._all_done.succeed()

    # ------------------------------------------------------------ page tables and TLBs
    def pt_changed(self, mm_id: int, start: int | None = None, end: int | None = None, *,
                   by: Task | None = None) -> None:
        """A path changed ``mm_id``'s page tables (in [start, end), or anywhere): cached walks
        are refreshed and running access batches of the mm restart their translation."""
        if start is None or end is None:
            self.mm_epoch[mm_id] = self.mm_epoch.get(mm_id, 0) + 1
            self.mm_patches[mm_id] = []
        else:
            self.mm_patches.setdefault(mm_id, []).append((start, end))
        for cpu in self.sched.cpus:
            t = cpu.current
            if t is not None and t is not by and t.process is not None and t.process.mm.id == mm_id:
                t.poke(("pt",))

    def flush_tlbs(self, task: Task, f: TlbFlush) -> None:
        """Apply a flush to every CPU's TLB.  x86 shootdown IPIs interrupt the other CPUs
        of the mm (the initiator's wait is in the path's cost already); arm64's broadcast
        TLBIs invalidate without interrupting."""
        mm = self.kernel.mms.get(f.mm)
        cpus = set(range(len(self.tlbs))) if mm is None else set(mm.cpumask) | {task.cpu}
        ipi = self.machine.arch.name.startswith("x86") and mm is not None
        for c in sorted(cpus - {task.cpu}):  # the targets stop first, then lose the entries
            cur = self.sched.cpus[c].current
            if ipi:
                self.stats["ipis_received"] += 1
                if self.trace is not None:
                    self.trace.cpu_instant(c, "TLB shootdown IPI", self.now_ps)
            if cur is not None:
                cur.poke(("ipi", self.ipi_ps if ipi else 0))
        for c in cpus:
            if f.end is None:
                self.tlbs[c].flush_asid(f.mm)
            else:
                self.tlbs[c].flush_range(f.mm, f.start, f.end)
