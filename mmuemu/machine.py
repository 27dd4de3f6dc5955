"""The machine: an architecture, physical memory, its processes and a runner."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import define, field

from mmuemu.arch import make_arch
from mmuemu.errors import InvalidArgument
from mmuemu.info import parse_size
from mmuemu.mm import invariants
from mmuemu.mm.fork import FORK_MODES
from mmuemu.mm.mm import Kernel
from mmuemu.mm.pagetable import PageTables
from mmuemu.mm.physmem import PhysMem
from mmuemu.mm.vma import File
from mmuemu.process import Process
from mmuemu.sim.costs import CostModel, default_costs, load_costs
from mmuemu.sim.runners import InstantRunner

if TYPE_CHECKING:
    from mmuemu.sim.simulation import Simulation

__all__ = ["COUNTERS", "Machine", "Measurement"]

#: the counter names DESIGN.md promises (each reads 0 until its operation happens)
COUNTERS = (
    "pte_reads", "pte_writes", "ptes_wrprotected", "folio_ref_ops", "mapcount_ops",
    "fork_batches", "fork_batched_ptes", "prealloc_retries", "fork_page_copies",
    "contpte_folds", "contpte_unfolds", "tlbi_ops", "tlb_flush_mm", "ipis", "cow_copies",
    "cow_reuses", "resched_checks", "lock_breaks", "page_faults",
)


@define
class Measurement:
    """Simulated time and operation counts of what ran inside ``Machine.measure()``."""

    ns: float = 0.0
    counts: Counter[str] = field(factory=Counter)


class Machine:
    """An emulated machine running Linux's mm.

    ``arch`` names a registered backend (``mmuemu.available_arches()``); further keyword
    arguments are that backend's switches.  ``costs`` is a cost-model name, a TOML path or a
    :class:`~mmuemu.sim.costs.CostModel` (default: the arch's shipped model).
    """

    def __init__(self, arch: str = "x86_64", *, memory: int | str = "16GiB", cpus: int = 4,
                 fork_mode: str = "batched", costs: str | Path | CostModel | None = None,
                 **arch_options: Any) -> None:
        self.arch = make_arch(arch, **arch_options)
        nbytes = parse_size(memory, "memory")
        if nbytes < (4 << 20):
            raise InvalidArgument(f"memory {memory!r} is too small: at least 4MiB")
        if not isinstance(cpus, int) or cpus < 1:
            raise InvalidArgument(f"cpus {cpus!r} must be a positive integer")
        if fork_mode not in FORK_MODES:
            raise InvalidArgument(f"unknown fork_mode {fork_mode!r}; allowed: {', '.join(FORK_MODES)}")
        self.cpus = cpus
        phys = PhysMem(nbytes >> self.arch.page_shift)
        self.arch.attach(phys)
        self.kernel = Kernel(self.arch, phys, PageTables(self.arch, phys), fork_mode=fork_mode)
        self.costs = default_costs(arch) if costs is None else load_costs(costs)
        self.runner = InstantRunner(self.costs)
        self._nprocs = 0

    def __repr__(self) -> str:
        return (f"<Machine {self.arch.name} {self.kernel.phys.nr_pages << 12 >> 20}MiB "
                f"fork_mode={self.kernel.fork_mode} costs={self.costs.name}>")

    @property
    def fork_mode(self) -> str:
        return self.kernel.fork_mode

    def spawn(self, name: str | None = None) -> Process:
        """A new process with an empty address space."""
        self._nprocs += 1
        mm = self.kernel.new_mm()
        return Process(self, mm, name or f"proc{self._nprocs}")

    def file(self, name: str, size: int | str, *, shmem: bool = False) -> File:
        """A file with a page cache to map with ``Process.mmap(file=...)``."""
        pages = (parse_size(size, "file size") + 4095) >> 12
        f = File(name, pages, swapbacked=shmem)
        self.kernel.files.append(f)
        return f

    @property
    def stats(self) -> Counter[str]:
        """Every operation counter since the machine was made (missing names read 0)."""
        out: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        out.update(self.runner.stats)
        return out

    @property
    def now_ns(self) -> float:
        """The instant runner's virtual clock."""
        return self.runner.now_ns

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Measure the simulated time and operations of the block."""
        m = Measurement()
        t0 = self.runner.clock_ps
        tap = self.runner.tap()
        try:
            yield m
        finally:
            self.runner.untap(tap)
            m.ns = (self.runner.clock_ps - t0) / 1000
            m.counts = tap

    def simulation(self, preempt: str = "none", hz: int = 250, **options: Any) -> Simulation:
        """A SimPy simulation over this machine's CPUs: ``preempt`` is the preemption model
        (none, voluntary, full, lazy), ``hz`` the tick rate; options: ``slice_ns``,
        ``wakeup_preempt``, ``trace``, ``seed``."""
        from mmuemu.sim.simulation import Simulation

        return Simulation(self, preempt, hz, **options)

    def check(self) -> None:
        """Verify every invariant; raise mmuemu.InvariantError naming the first broken one."""
        invariants.check(self.kernel)

    def inject_alloc_failure(self, after: int = 0) -> None:
        """Make the allocation after the next ``after`` allocation calls fail (-ENOMEM)."""
        self.kernel.phys.fail_countdown = after

    @property
    def free_pages(self) -> int:
        return self.kernel.phys.nr_free
