"""Programs: what a simulated task does, as a list of actions.

A task runs its actions in order.  Actions are frozen value classes; the SimPy runner
(:mod:`mmuemu.sim.simulation`) interprets them: user-mode work (``Run``, ``Access``) is
preemptible anywhere, system calls (``Fork``, ``Munmap``...) run the mm core's kernel paths
with their locks and resched checkpoints, ``Sleep`` gives the CPU up and is woken later
(its scheduling latency is recorded).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from attrs import field, frozen

from mmuemu.errors import InvalidArgument

__all__ = [
    "PATTERNS",
    "Access",
    "Action",
    "Exit",
    "Fork",
    "Loop",
    "Madvise",
    "Mmap",
    "Mprotect",
    "Munmap",
    "RmapWalk",
    "Run",
    "Sleep",
    "check_program",
]

#: access patterns of :class:`Access`
PATTERNS = ("sequential", "strided", "random", "zipf")


def _nonneg(name: str) -> Any:
    def check(inst: object, attr: Any, value: object) -> None:
        if not isinstance(value, int | float) or value < 0:
            raise InvalidArgument(f"{type(inst).__name__}.{attr.name} = {value!r}: {name}")
    return check


@frozen
class Run:
    """Compute in user mode for ``ns`` nanoseconds (preemptible at any time)."""

    ns: float = field(validator=_nonneg("must be a non-negative number of nanoseconds"))


@frozen
class Sleep:
    """Sleep for ``ns`` nanoseconds; the wakeup's scheduling latency is recorded."""

    ns: float = field(validator=_nonneg("must be a non-negative number of nanoseconds"))


@frozen
class Access:
    """A stream of ``count`` CPU loads/stores over [addr, addr + length).

    ``addr`` may name a mapping an earlier ``Mmap(name=...)`` of the task made (``length``
    0: all of it).  ``pattern`` is sequential (``stride`` bytes apart, wrapping), strided
    (the same, with a page-sized default stride), random (uniform) or zipf (page ranks with
    probability ~ rank^-``zipf_a``, the first page hottest: a bounded Zipf law).  A
    fraction ``writes`` of the accesses are stores (writing ``token`` into the page's
    content when given).  Each access costs ``ns_per_access`` plus its TLB miss costs;
    faults go through the mm core (COW after a fork happens here).
    """

    addr: int | str
    length: int = 0
    count: int = 1_000_000
    pattern: str = "sequential"
    writes: float = 0.0
    stride: int | None = None
    ns_per_access: float = 1.0
    zipf_a: float = 1.2
    token: int | None = None
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise InvalidArgument(f"Access.pattern = {self.pattern!r}; allowed: {', '.join(PATTERNS)}")
        if not 0.0 <= self.writes <= 1.0:
            raise InvalidArgument(f"Access.writes = {self.writes!r}: a fraction in [0, 1]")
        if self.length < 0 or (self.length == 0 and not isinstance(self.addr, str)) or self.count < 0:
            raise InvalidArgument(f"Access length {self.length!r} must be positive (0 only with a mapping "
                                  f"name) and count {self.count!r} non-negative")
        if self.pattern == "zipf" and self.zipf_a <= 1.0:
            raise InvalidArgument(f"Access.zipf_a = {self.zipf_a!r}: must be greater than 1")


@frozen
class Fork:
    """fork(): copy this task's address space.

    ``child`` is what the child task does: ``"exit"`` (exit at once), ``"stay"`` (keep the
    address space, do nothing), or a program (a list of actions).  ``mode`` overrides the
    machine's fork mode; ``cpu`` pins the child (default: the forking task's CPU rule).
    """

    child: str | tuple[Any, ...] = "exit"
    mode: str | None = None
    cpu: int | None = None

    def __attrs_post_init__(self) -> None:
        if isinstance(self.child, str) and self.child not in ("exit", "stay"):
            raise InvalidArgument(f"Fork.child = {self.child!r}; allowed: 'exit', 'stay' or a list of actions")
        if not isinstance(self.child, str):
            object.__setattr__(self, "child", tuple(self.child))


@frozen
class Mmap:
    """mmap(2) of ``length`` bytes; the address is remembered under ``name`` for later
    actions of the same task (``Munmap(name=...)``...), and is ``populate``d if asked."""

    length: int
    prot: str = "rw"
    name: str | None = None
    populate: bool = False
    shared: bool = False


@frozen
class Munmap:
    """munmap(2) of [addr, addr + length) (or of the mapping called ``name``)."""

    addr: int | None = None
    length: int | None = None
    name: str | None = None


@frozen
class Mprotect:
    """mprotect(2)."""

    addr: int
    length: int
    prot: str


@frozen
class Madvise:
    """madvise(2)."""

    addr: int
    length: int
    advice: str


@frozen
class RmapWalk:
    """A kernel thread's rmap walk (reclaim or migration) over ``pages`` pages of
    ``process`` from ``addr``, ``stride`` bytes apart: for each, it takes the PTE-table lock
    of the table mapping it (no mmap_lock), holds it for ``hold_ns`` (page_referenced /
    try_to_unmap work) and releases it."""

    process: Any
    addr: int
    pages: int = 1
    hold_ns: float = 2000.0
    kind: str = "reclaim"
    stride: int = 4096


@frozen
class Exit:
    """Exit: the last task of a process tears its address space down (exit_mmap)."""


def _as_tuple(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(items)


@frozen
class Loop:
    """Run ``body`` ``times`` times."""

    body: tuple[Any, ...] = field(converter=_as_tuple)
    times: int = 1


Action = Run | Sleep | Access | Fork | Mmap | Munmap | Mprotect | Madvise | RmapWalk | Exit | Loop
_KINDS = (Run, Sleep, Access, Fork, Mmap, Munmap, Mprotect, Madvise, RmapWalk, Exit, Loop)


def check_program(program: Sequence[Any], where: str = "program") -> tuple[Any, ...]:
    """Validate a program (a list of actions); return it as a tuple."""
    if isinstance(program, _KINDS):
        program = [program]
    out = tuple(program)
    for i, act in enumerate(out):
        if not isinstance(act, _KINDS):
            names = ", ".join(k.__name__ for k in _KINDS)
            raise InvalidArgument(f"{where}[{i}] = {act!r} is not an action; allowed: {names}")
        if isinstance(act, Loop):
            check_program(act.body, f"{where}[{i}].body")
        if isinstance(act, Fork) and isinstance(act.child, tuple):
            check_program(act.child, f"{where}[{i}].child")
    return out
