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
from mmuemu.info import FolioInfo, PteInfo
from mmuemu.machine import Machine, Measurement
from mmuemu.process import Process
from mmuemu.sim.costs import CostModel

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CostModel",
    "FolioInfo",
    "InvalidArgument",
    "InvariantError",
    "Machine",
    "Measurement",
    "MmuEmuError",
    "OutOfMemory",
    "Process",
    "PteInfo",
    "SegmentationFault",
    "__version__",
    "available_arches",
    "register",
]
