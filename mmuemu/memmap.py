"""What a process maps, like /proc/PID/smaps: its VMAs with resident and THP sizes, the mix
of folio sizes behind its mapped pages, and its page-table pages."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from attrs import frozen

if TYPE_CHECKING:
    from mmuemu.process import Process

__all__ = ["MemoryMap", "memory_map"]


@frozen
class MemoryMap:
    """``vmas``: one row per VMA (start, end, prot, kind, size/rss/thp in KiB);
    ``folio_mix``: mapped KiB by folio size, PTE-mapped and PMD-mapped apart;
    ``pagetable_pages``: table pages of every level."""

    vmas: list[dict[str, Any]]
    folio_mix: list[dict[str, Any]]
    pagetable_pages: dict[str, int]


def _prot(v: Any) -> str:
    p = v.prot
    return ("r" if p.read else "-") + ("w" if p.write else "-") + ("x" if p.exec else "-") + \
        ("s" if p.shared else "p")


def memory_map(process: Process) -> MemoryMap:
    """The memory map of a live process (read from its page tables, vectorised), with the
    sizes fs/proc/task_mmu.c show_smap reports (Size, Rss, AnonHugePages) per VMA."""
    k = process.machine.kernel
    a, pt, ph = k.arch, k.pt, k.phys
    n = a.ptrs_per_table
    levels, base, _, leaf_va = pt.walk(process.mm.pgd_row)
    vals = pt.entries[levels[-1]].reshape(-1)
    va = (base[:, None] + (np.arange(n, dtype=np.int64) << 12)[None, :]).reshape(-1)
    live = vals != 0
    vals, va = vals[live], va[live]
    keep = a.pte_present(vals) & ~a.pte_special(vals)
    vals, va = vals[keep], va[keep]
    pfn = a.pte_pfn(vals)
    order = ph.order[ph.head[pfn]].astype(np.int64)
    order_idx = np.argsort(va, kind="stable")
    va, order = va[order_idx], order[order_idx]
    leaf_va = np.sort(leaf_va)
    pmd_bytes = 1 << (a.pmd_order + 12)
    rows = []
    for v in process.mm.vmas:
        lo, hi = np.searchsorted(va, [v.start, v.end])
        llo, lhi = np.searchsorted(leaf_va, [v.start, v.end])
        thp = int(lhi - llo) * pmd_bytes
        rss = int(hi - lo) * 4096 + thp
        rows.append({"start": f"{v.start:#x}", "end": f"{v.end:#x}", "prot": _prot(v),
                     "kind": "file" if v.file is not None else "anon",
                     "name": v.file.name if v.file is not None else "",
                     "size_kib": (v.end - v.start) >> 10, "rss_kib": rss >> 10, "thp_kib": thp >> 10})
    mix = []
    counts = np.bincount(order, minlength=a.pmd_order + 1) if len(order) else np.zeros(1, np.int64)
    for o, pages in enumerate(counts):
        if pages:
            mix.append({"folio_kib": 4 << o, "mapping": "pte", "kib": int(pages) * 4})
    if len(leaf_va):
        mix.append({"folio_kib": pmd_bytes >> 10, "mapping": "pmd", "kib": len(leaf_va) * (pmd_bytes >> 10)})
    names = ["pgd", "pud", "pmd", "pte"] if len(levels) == 4 else [f"level{i}" for i in range(len(levels))]
    tables = {name: len(rows_) for name, rows_ in zip(names, levels, strict=True)}
    tables["deposited"] = len(process.mm.deposit)
    return MemoryMap(rows, mix, tables)
