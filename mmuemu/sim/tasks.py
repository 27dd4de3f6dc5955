"""Tasks: threads of processes (or kernel threads) running programs on simulated CPUs.

A task owns a CPU while it runs, gives it up when it sleeps, blocks on a sleeping lock or
exits, and is preempted as the scheduler's model allows.  Its actions go through the mm
core's kernel paths (:func:`mmuemu.sim.kpath.run_path`), so a fork in a task takes the
parent's mmap_lock for writing and write-locks its VMAs, and a fault taken by another thread
meanwhile waits for both.
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from mmuemu.errors import MmuEmuError
from mmuemu.mm import fault, fork, mmap
from mmuemu.mm.work import Ops, Work
from mmuemu.sim import access
from mmuemu.sim.kpath import Busy, run_path
from mmuemu.sim.program import (
    Access,
    Exit,
    Fork,
    Loop,
    Madvise,
    Mmap,
    Mprotect,
    Munmap,
    RmapWalk,
    Run,
    Sleep,
)

if TYPE_CHECKING:
    from mmuemu.process import Process
    from mmuemu.sim.simulation import Simulation

__all__ = ["Task"]

Gen = Generator[Any, Any, Any]


#: re-arm a poked activity's timeout without interrupting its process (see :func:`retarget_ok`)
RETARGET = True


@functools.cache
def retarget_ok() -> bool:
    """Whether this SimPy keeps a waiting process's state as 4.x does (``_target``, the event
    it waits for, whose callbacks hold ``_resume``), so that a poke can move the wait to a new
    timeout instead of interrupting it; if not, pokes interrupt."""
    env = simpy.Environment()

    def probe() -> Gen:
        yield env.timeout(1)

    proc = env.process(probe())
    env.step()  # (the process starts and waits)
    target = getattr(proc, "_target", None)
    return isinstance(target, simpy.Timeout) and proc._resume in (target.callbacks or ())


class _Exited(Exception):
    """The task's program ran Exit."""


class Task:
    """A schedulable thread: a process's thread, or a kernel thread (``process`` None)."""

    def __init__(self, sim: Simulation, process: Process | None, program: tuple[Any, ...], name: str,
                 pin: int | None = None, start_ps: int = 0) -> None:
        self.sim, self.process, self.program, self.name = sim, process, program, name
        self.pin = pin
        #: the CPU the task runs on, or last ran on (its pinned CPU before it first runs)
        self.cpu: int = pin if pin is not None else 0
        self.start_ps = start_ps
        self.turn: simpy.Event | None = None
        self.woken_at: int | None = None
        self.activity: Any = None
        self.proc: simpy.Process | None = None
        self.mappings: dict[str, tuple[int, int]] = {}
        self.counts: dict[str, int] = {"accesses": 0, "faults": 0, "forks": 0, "tlb_misses": 0,
                                       "l2_misses": 0}
        self.done_ps: int | None = None
        self.fork_ns: list[float] = []
        self.children: list[Process] = []

    def __repr__(self) -> str:
        return f"<Task {self.name!r} cpu={self.cpu}>"

    # ------------------------------------------------------------ plumbing
    def start(self) -> None:
        self.sim.live += 1
        self.proc = self.sim.env.process(self._main())

    def on_cpu(self, cpu: int) -> None:
        """Called when the task starts running on ``cpu`` (switch_mm sets mm_cpumask)."""
        if self.process is not None and not self.process.mm.dead:
            self.process.mm.cpumask.add(cpu)

    def poke(self, cause: tuple[Any, ...]) -> None:
        """Tell the running activity about an event (resched request, lock waiter, IPI);
        re-arm its timeout if that moved its end."""
        act = self.activity
        if act is not None and act.on(cause, self.sim.now_ps):
            proc = self.proc
            assert proc is not None
            if RETARGET and retarget_ok():
                # what Process.interrupt does inside SimPy, minus the event and the exception:
                # the process stops waiting for its timeout and waits for one at the new end
                env = self.sim.env
                proc._target.callbacks.remove(proc._resume)
                t = env.timeout(max(0, act.end - env.now))
                t.callbacks.append(proc._resume)
                proc._target = t
            else:
                proc.interrupt(cause)

    def wait_activity(self, act: Any) -> Gen:
        """Run a timed activity to its (possibly moving) end."""
        env = self.sim.env
        self.activity = act
        try:
            while True:
                try:
                    yield env.timeout(max(0, act.end - env.now))
                    if env.now >= act.end:
                        break
                except simpy.Interrupt:
                    continue
        finally:
            self.activity = None
        self.sim.events += 1

    # ------------------------------------------------------------ the program
    def _main(self) -> Gen:
        env, sched = self.sim.env, self.sim.sched
        if self.start_ps:
            yield env.timeout(self.start_ps)
        yield from sched.acquire(self, woken=self.start_ps > 0)
        try:
            yield from self._program(self.program)
        except _Exited:
            pass
        sched.release(self)
        self.done_ps = self.sim.now_ps
        self.sim.task_done(self)

    def _program(self, prog: tuple[Any, ...]) -> Gen:
        sim, sched, env = self.sim, self.sim.sched, self.sim.env
        for act in _unrolled(prog):
            kind = type(act)
            try:
                if kind is Run:  # the two commonest actions first, inline
                    ps = round(act.ns * 1000)
                    if ps <= 0:
                        continue
                    busy = Busy(sim, self, ps, "user")
                    self.activity = busy
                    try:  # (Simulation.busy and wait_activity, for the usual uninterrupted run)
                        yield env.timeout(ps)
                    except simpy.Interrupt:
                        pass
                    self.activity = None
                    if env.now < busy.end or busy.preempted:  # moved or cut: the general path
                        yield from sim.busy_rest(self, busy, "run")
                    else:
                        sim.events += 1
                        if sim.trace is not None:
                            sim.trace.span(self, "run", busy.start, busy.end, "user")
                elif kind is Sleep:  # the CPU goes to the next task; back in the queue on wakeup
                    sched.release(self)
                    yield env.timeout(round(act.ns * 1000))
                    turn = sched.request(self, woken=True)
                    if turn is not None:
                        yield turn
                else:
                    yield from self._do(act)
            except MmuEmuError as e:  # the action fails (recorded); the program goes on
                sim.errors.append((self.name, f"{type(act).__name__}: {e}"))

    def _do(self, act: Any) -> Gen:
        """Every action but Run and Sleep (which :meth:`_program` runs itself) and Loop
        (which it unrolls)."""
        sim = self.sim
        if isinstance(act, Access):
            yield from access.run_access(sim, self, act)
        elif isinstance(act, Fork):
            yield from self._fork(act)
        elif isinstance(act, Mmap | Munmap | Mprotect | Madvise):
            yield from self._syscall(act)
        elif isinstance(act, RmapWalk):
            yield from self._rmap_walk(act)
        elif isinstance(act, Exit):
            yield from self._exit()
            raise _Exited
        else:  # pragma: no cover (check_program rejects these)
            raise TypeError(act)

    def return_to_user(self) -> Gen:
        """Mirrors: exit_to_user_mode: schedule if NEED_RESCHED (or the lazy flag) is set."""
        if self.sim.sched.wants_switch(self, user=True):
            yield from self.sim.sched.preempt(self)

    def _need_process(self, act: Any) -> Process:
        if self.process is None or self.process.mm.dead:
            raise MmuEmuError(f"task {self.name!r}: {type(act).__name__} needs a live process")
        return self.process

    def _fork(self, act: Fork) -> Gen:
        from mmuemu.process import Process

        sim = self.sim
        p = self._need_process(act)
        sem = sim.mmap_lock(p)
        t0 = sim.now_ps
        yield from sim.down(self, sem, "write", "fork")
        sim.vma_write_locked.add(p.mm.id)  # vma_start_write on every VMA it copies
        child_mm = None
        try:
            child_mm = yield from run_path(sim, self, fork.dup_mmap(sim.kernel, p.mm, act.mode), p.mm.id)
        except MmuEmuError as e:
            sim.errors.append((self.name, f"fork: {e}"))
        finally:
            sim.vma_write_locked.discard(p.mm.id)
            sim.release_rwsem(self, sem)
        self.fork_ns.append((sim.now_ps - t0) / 1000)
        self.counts["forks"] += 1
        if child_mm is not None:
            child = Process(p.machine, child_mm, f"{p.name}-child{len(self.children) + 1}")
            self.children.append(child)
            prog: tuple[Any, ...] = (Exit(),) if act.child == "exit" else () if act.child == "stay" else act.child  # type: ignore[assignment]
            sim.spawn(child, prog, name=f"{self.name}-child{len(self.children)}", cpu=act.cpu, parent=self)
        yield from self.return_to_user()

    def _syscall(self, act: Any) -> Gen:
        sim, k = self.sim, self.sim.kernel
        p = self._need_process(act)
        sem = sim.mmap_lock(p)
        path = type(act).__name__.lower()
        yield from sim.down(self, sem, "write", path)
        try:
            if isinstance(act, Mmap):
                addr = mmap.do_mmap(k, p.mm, act.length, act.prot, shared=act.shared)
                if act.name:
                    self.mappings[act.name] = (addr, act.length)
                if act.populate:
                    yield from run_path(sim, self, fault.fault_range(k, p.mm, addr, addr + act.length, write=True),
                                        p.mm.id)
            elif isinstance(act, Munmap):
                addr, length = self._resolve(act.addr, act.length, act.name)
                yield from run_path(sim, self, mmap.do_munmap(k, p.mm, addr, length), p.mm.id)
            elif isinstance(act, Mprotect):
                yield from run_path(sim, self, mmap.do_mprotect(k, p.mm, act.addr, act.length, act.prot), p.mm.id)
            else:
                yield from run_path(sim, self, mmap.do_madvise(k, p.mm, act.addr, act.length, act.advice),
                                    p.mm.id)
        except MmuEmuError as e:
            sim.errors.append((self.name, f"{path}: {e}"))
        finally:
            sim.release_rwsem(self, sem)
        yield from self.return_to_user()

    def _resolve(self, addr: int | None, length: int | None, name: str | None) -> tuple[int, int]:
        if name is not None:
            if name not in self.mappings:
                raise MmuEmuError(f"no mapping called {name!r}; known: {sorted(self.mappings)}")
            return self.mappings[name]
        if addr is None or length is None:
            raise MmuEmuError("munmap needs addr and length, or name")
        return addr, length

    def _rmap_walk(self, act: RmapWalk) -> Gen:
        """A kernel thread's rmap walk: lock each page's PTE table, work, unlock."""
        sim, k = self.sim, self.sim.kernel
        mm = act.process.mm
        for i in range(act.pages):
            addr = act.addr + i * act.stride
            row = _table_row(k, mm, addr)
            ops = Ops()
            ops.add("busy_ns", round(act.hold_ns))
            ops.add(f"rmap_walks_{act.kind}", 1)
            if row is None:  # nothing mapped there (or a PMD leaf: not modelled)
                yield from run_path(sim, self, _one(Work(f"rmap_{act.kind}", ops)))
                continue
            work = Work(f"rmap_{act.kind}", ops, locks=("ptl",), lock_ids=np.array([row], np.int64))
            yield from run_path(sim, self, _one(work))

    def _exit(self) -> Gen:
        sim = self.sim
        p = self.process
        if p is None or p.mm.dead:
            return
        others = [t for t in sim.tasks if t is not self and t.process is p and t.done_ps is None]
        if others:
            return  # a thread exits; the mm stays with the others
        sem = sim.mmap_lock(p)
        yield from sim.down(self, sem, "write", "exit")
        try:
            yield from run_path(sim, self, mmap.exit_mmap(sim.kernel, p.mm), p.mm.id)
        finally:
            sim.release_rwsem(self, sem)


#: programs of at most this many actions (loops counted out) are unrolled into one tuple
FLAT_ACTIONS = 4096


def _unrolled(prog: tuple[Any, ...]) -> Iterable[Any]:
    """The actions of a program in the order they run: a tuple when the program is short,
    else a generator that unrolls loops as they are reached."""
    if _length(prog) <= FLAT_ACTIONS:
        return _flat(prog)
    return _unrolling(prog)


def _length(prog: tuple[Any, ...]) -> int:
    return sum(act.times * _length(act.body) if isinstance(act, Loop) else 1 for act in prog)


def _flat(prog: tuple[Any, ...]) -> tuple[Any, ...]:
    out: list[Any] = []
    for act in prog:
        if isinstance(act, Loop):
            out.extend(_flat(act.body) * act.times)
        else:
            out.append(act)
    return tuple(out)


def _unrolling(prog: tuple[Any, ...]) -> Generator[Any, None, None]:
    for act in prog:
        if isinstance(act, Loop):
            short = _length(act.body) <= FLAT_ACTIONS
            body = _flat(act.body) if short else ()  # unrolled once for every pass
            for _ in range(act.times):
                yield from body if short else _unrolling(act.body)
        else:
            yield act


def _one(work: Work) -> Generator[Work, Any, None]:
    yield work


def _table_row(k: Any, mm: Any, addr: int) -> int | None:
    """The PTE table mapping ``addr`` (None if there is none)."""
    slots = k.pt.pmd_slots(mm.pgd_row, addr & ~4095, (addr & ~4095) + 4096)
    if not len(slots.flat):
        return None
    pmd = k.pt.flat[slots.flat]
    if not pmd[0] or k.arch.pmd_leaf(pmd)[0]:
        return None
    return int(k.pt.rows_of(pmd)[0])
