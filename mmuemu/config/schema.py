"""The config schema: one frozen attrs class per section.

Field validators raise a plain ValueError saying what is allowed; the loader turns it into
a ConfigError naming the file, the dotted key and the value.
"""

from __future__ import annotations

from typing import Any

from attrs import Attribute, field, frozen

from mmuemu.config.values import FieldError, Size

__all__ = [
    "CompareConfig",
    "Config",
    "ExperimentConfig",
    "MachineConfig",
    "OutputConfig",
    "ProcessConfig",
    "RegionConfig",
    "TaskConfig",
]


class _OneOf:
    """A validator: the value is one of ``choices``."""

    def __init__(self, *choices: Any) -> None:
        self.choices = choices

    def __call__(self, inst: object, attr: Attribute[Any], value: Any) -> None:
        if value not in self.choices:
            raise FieldError(attr.name, f"allowed: {', '.join(map(repr, self.choices))}")


def _at_least(lo: float) -> Any:
    def check(inst: object, attr: Attribute[Any], value: Any) -> None:
        if value is not None and not value >= lo:  # NaN too
            raise FieldError(attr.name, f"must be at least {lo:g}")
    return check


PREEMPT_MODELS = ("none", "voluntary", "full", "lazy")
POPULATE = ("none", "read", "write")
EXPERIMENTS = ("fork", "munmap", "fork-under-load", "program")
DEFAULT_MEMORY = Size(4 << 30)
PMD_SIZE = Size(2 << 20)


@frozen
class MachineConfig:
    """The emulated machine: ``Machine(arch, contpte=..., **options, cpus, memory,
    fork_mode, costs)`` plus the SimPy runner's preemption model and tick rate.
    ``cost_ns`` and ``cost_sim`` override single entries of the named cost model."""

    arch: str = "x86_64"
    contpte: bool = False
    options: dict[str, bool] = field(factory=dict)
    cpus: int = field(default=4, validator=_at_least(1))
    memory: Size = DEFAULT_MEMORY
    fork_mode: str = field(default="batched", validator=_OneOf("batched", "legacy"))
    preempt: str = field(default="none", validator=_OneOf(*PREEMPT_MODELS))
    hz: int = field(default=250, validator=_OneOf(100, 250, 300, 1000))
    costs: str = "default"
    cost_ns: dict[str, float] = field(factory=dict)
    cost_sim: dict[str, float] = field(factory=dict)


@frozen
class RegionConfig:
    """A private (or ``shared``) anonymous mapping of ``size`` bytes, populated with
    folios of ``folio_orders`` (default: the process's) by ``populate`` faults.  PMD-order
    folios stay PMD-mapped unless ``pte_mapped``."""

    size: Size
    prot: str = field(default="rw", validator=_OneOf("", "r", "rw", "rx", "rwx"))
    shared: bool = False
    folio_orders: list[int] | None = None
    populate: str = field(default="write", validator=_OneOf(*POPULATE))
    pte_mapped: bool = False
    madvise: list[str] = field(factory=list)
    align: Size = PMD_SIZE


@frozen
class ProcessConfig:
    """A process: named regions, and/or an image from an ELF file or a smaps capture."""

    folio_orders: list[int] = field(factory=lambda: [0])
    regions: dict[str, RegionConfig] = field(factory=dict)
    elf: str | None = None
    smaps: str | None = None
    populate_image: bool = True


@frozen
class TaskConfig:
    """A SimPy task: a thread of ``process`` (none: a kernel thread) running ``program``
    (a list of action tables, ``{op = "sleep", ns = 1e6}``; see docs/configs.md)."""

    process: str | None = None
    cpu: int | None = None
    start_ns: float = field(default=0.0, validator=_at_least(0))
    program: list[dict[str, Any]] = field(factory=list)


@frozen
class ExperimentConfig:
    """What runs.  ``fork``: fork ``process`` and exit the child (then, with
    ``then_munmap``, munmap the parent's regions); ``munmap``: munmap them; both on either
    runner.  ``fork-under-load``: the SimPy runner, a forker task forking ``forks`` times
    ``interval_ns`` apart next to the config's tasks (its children run on ``child_cpu``,
    default the forker's CPU rule).  ``program``: only the tasks."""

    kind: str = field(default="fork", validator=_OneOf(*EXPERIMENTS))
    runner: str = field(default="instant", validator=_OneOf("instant", "simpy"))
    process: str = "parent"
    repetitions: int = field(default=1, validator=_at_least(1))
    then_munmap: bool = False
    forks: int = field(default=1, validator=_at_least(1))
    interval_ns: float = field(default=1_000_000.0, validator=_at_least(0))
    forker_cpu: int | None = 0
    child_cpu: int | None = None
    until_ns: float | None = field(default=None, validator=_at_least(0))
    seed: int = 0
    check: bool = True


@frozen
class CompareConfig:
    """The columns of ``mmuemu compare``: named ``variants`` (each a set of dotted
    overrides) times the product of the ``across`` axes.  ``speedup`` names an across axis
    whose first value is the baseline: each column gets ratio columns against it."""

    variants: dict[str, dict[str, Any]] = field(factory=dict)
    across: dict[str, list[Any]] = field(factory=dict)
    metrics: list[str] = field(factory=lambda: ["time_ns"])
    families: list[str] = field(factory=lambda: ["fork", "munmap"])
    speedup: str | None = None


@frozen
class OutputConfig:
    """Where results go (``dir``; default ``runs/<config name>``) and what is written."""

    dir: str | None = None
    plots: bool = True
    trace: bool = False
    summary: list[str] = field(factory=list)


@frozen
class Config:
    """A whole experiment config (``source`` is the file it came from)."""

    name: str = ""
    description: str = ""
    machine: MachineConfig = field(factory=MachineConfig)
    processes: dict[str, ProcessConfig] = field(factory=dict)
    tasks: dict[str, TaskConfig] = field(factory=dict)
    experiment: ExperimentConfig = field(factory=ExperimentConfig)
    sweep: dict[str, list[Any]] = field(factory=dict)
    compare: CompareConfig = field(factory=CompareConfig)
    output: OutputConfig = field(factory=OutputConfig)
    source: str = "<config>"
