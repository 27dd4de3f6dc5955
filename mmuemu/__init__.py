"""mmuemu: a discrete-event, multi-architecture emulator of Linux's fork() mm paths."""

from __future__ import annotations

from mmuemu import _malloc  # noqa: F401  (allocator settings for numpy temporaries)
from mmuemu.arch import available_arches, register
from mmuemu.errors import (
    ConfigError,
    InvalidArgument,
    InvariantError,
    MmuEmuError,
    OutOfMemory,
    SegmentationFault,
)
from mmuemu.experiment import run
from mmuemu.info import FolioInfo, PteInfo
from mmuemu.machine import Machine, Measurement
from mmuemu.process import Process
from mmuemu.results import Results
from mmuemu.sim.costs import CostModel
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
from mmuemu.sim.simulation import Simulation

__version__ = "0.1.0"

__all__ = [
    "Access",
    "ConfigError",
    "CostModel",
    "Exit",
    "FolioInfo",
    "Fork",
    "InvalidArgument",
    "InvariantError",
    "Loop",
    "Machine",
    "Madvise",
    "Measurement",
    "Mmap",
    "MmuEmuError",
    "Mprotect",
    "Munmap",
    "OutOfMemory",
    "Process",
    "PteInfo",
    "Results",
    "RmapWalk",
    "Run",
    "SegmentationFault",
    "Simulation",
    "Sleep",
    "__version__",
    "available_arches",
    "register",
    "run",
]
