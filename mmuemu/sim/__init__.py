"""Runners, cost models and (later) the SimPy machinery that give the mm core time."""

from __future__ import annotations

from mmuemu.sim.costs import CostModel, load_costs
from mmuemu.sim.runners import InstantRunner

__all__ = ["CostModel", "InstantRunner", "load_costs"]
