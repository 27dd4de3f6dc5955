"""The published measurements the shipped cost models must reproduce, and the emulator runs
that reproduce them.

Each table row names an experiment mmuemu can run (fork or munmap of 1 GiB of private
anonymous memory populated with PTE-mapped folios of one size, batched or legacy) and the
time the kernel took.  :func:`counts` runs the experiment and returns the operation counts;
a cost model turns them into a prediction (:func:`predict`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from attrs import frozen

from mmuemu.machine import Machine
from mmuemu.sim.costs import CostModel
from mmuemu.workload import populated

__all__ = ["XEON_4210R", "Row", "counts", "predict"]

GiB = 1 << 30
MiB = 1 << 20


@frozen
class Row:
    """One published measurement: ``op`` of 1 GiB of ``folio_kib`` folios in ``mode``."""

    machine: str
    op: str  # "fork" | "munmap"
    folio_kib: int
    mode: str  # "batched" | "legacy"
    seconds: float
    source: str


_FORK = "20240129124649.189745-1-david@redhat.com"
_ZAP = "20240129143221.263763-1-david@redhat.com"
_SIZES = (4, 16, 32, 64, 128, 256, 512, 1024, 2048)
_FORK_BEFORE = (0.014328, 0.014263, 0.014334, 0.014046, 0.014011, 0.013993, 0.013983, 0.013986, 0.014305)
_FORK_AFTER = (0.014035, 0.011960, 0.010940, 0.010444, 0.010063, 0.009938, 0.009850, 0.009820, 0.010076)
_ZAP_BEFORE = (0.058110, 0.044198, 0.034216, 0.029207, 0.026579, 0.025130, 0.024292, 0.023812, 0.023785)
_ZAP_AFTER = (0.057715, 0.035469, 0.023522, 0.018434, 0.014026, 0.011756, 0.010703, 0.010294, 0.009910)


def _rows(op: str, before: Iterable[float], after: Iterable[float], src: str) -> list[Row]:
    out = []
    for kib, b, a in zip(_SIZES, before, after, strict=True):
        out.append(Row("xeon-4210r", op, kib, "legacy", b, src))
        out.append(Row("xeon-4210r", op, kib, "batched", a, src))
    return out


#: CALIBRATION.md, x86_64 Xeon Silver 4210R: fork and munmap of 1 GiB, v6.8-rc1 vs batched
XEON_4210R: tuple[Row, ...] = tuple(_rows("fork", _FORK_BEFORE, _FORK_AFTER, _FORK)
                                    + _rows("munmap", _ZAP_BEFORE, _ZAP_AFTER, _ZAP))


def counts(row: Row, size: int = GiB) -> Counter[str]:
    """Operation counts of the row's experiment, run on the emulator."""
    order = (row.folio_kib // 4).bit_length() - 1
    m = Machine(arch="x86_64", memory=f"{size // MiB * 2 + 64}MiB", fork_mode=row.mode,
                costs=CostModel("zero", "x86_64", {}))
    p, a = populated(m, size, order)  # the series measured PTE-mapped THP
    with m.measure() as t:
        if row.op == "fork":
            p.fork()
        else:
            p.munmap(a, size)
    return t.counts


def predict(costs: CostModel, rows: Iterable[Row] = XEON_4210R) -> list[tuple[Row, float]]:
    """(row, predicted seconds) for every row."""
    return [(r, costs.total_ps(counts(r)) / 1e12) for r in rows]
