"""Allocations made while a fault is planned, undone if a later one fails."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from mmuemu.mm.mm import Kernel

__all__ = ["Undo", "alloc_folios"]

I64 = NDArray[np.int64]


class Undo:
    """Allocations made while planning, released if a later allocation fails."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.folios: list[I64] = []
        self.tables: list[tuple[int, int]] = []
        self.rows: list[I64] = []  # tables allocated but not linked yet
        self.pending: dict[int, int] = {}  # PMD entry -> its new, not yet linked table
        self.hooks: list[Any] = []

    def rollback(self) -> None:
        for hook in self.hooks:
            hook()
        for rows in self.rows:
            self.k.pt.free(rows)
        for heads in self.folios:
            self.k.phys.ref_sub_and_free(heads, self.k.phys.refcount[heads])
        for parent_flat, row in reversed(self.tables):
            self.k.pt.flat[parent_flat] = 0
            self.k.pt.free(np.array([row]))


def alloc_folios(ph: Any, order: int, n: int, flags: Any, undo: Undo) -> I64:
    heads = ph.new_folios(order, n, flags)
    undo.folios.append(heads)
    return heads
