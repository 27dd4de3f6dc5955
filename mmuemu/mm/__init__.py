"""The generic mm core: physical memory, page tables, VMAs, faults, fork, zap, GUP.

It never names an architecture (the backend is passed in) and never imports SimPy or the
cost model: kernel paths are generators yielding :class:`~mmuemu.mm.work.Work`.
"""

from __future__ import annotations

from mmuemu.mm.mm import Kernel, Mm
from mmuemu.mm.work import Break, Ops, Work

__all__ = ["Break", "Kernel", "Mm", "Ops", "Work"]
