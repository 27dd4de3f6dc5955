"""What gives the mm core time: cost models, the instant runner, and the SimPy runner with
its scheduler, locks, TLBs and tasks."""

from __future__ import annotations

from mmuemu.sim.costs import CostModel, load_costs
from mmuemu.sim.runners import InstantRunner
from mmuemu.sim.simulation import Simulation

__all__ = ["CostModel", "InstantRunner", "Simulation", "load_costs"]
