"""Workloads: synthetic regions (and, later, ELF images and smaps captures)."""

from __future__ import annotations

from mmuemu.workload.regions import populated

__all__ = ["populated"]
