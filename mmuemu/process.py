"""Processes: the library's handle on an address space (``mmuemu.Machine.spawn``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from mmuemu.errors import InvalidArgument
from mmuemu.info import FolioInfo, PteInfo
from mmuemu.mm import fault, fork, gup, huge_memory, mmap
from mmuemu.mm.mm import RSS_NAMES, Mm
from mmuemu.mm.physmem import F_ANON, F_RESERVED
from mmuemu.mm.vma import File, VmFlag
from mmuemu.mm.work import Ops, Work

if TYPE_CHECKING:
    from mmuemu.machine import Machine

__all__ = ["Process"]

PAGE = 4096


class Process:
    """A process with one address space on a :class:`~mmuemu.Machine`."""

    def __init__(self, machine: Machine, mm: Mm, name: str) -> None:
        self.machine = machine
        self.mm = mm
        self.name = name

    def __repr__(self) -> str:
        state = "exited" if self.mm.dead else f"{len(self.mm.vmas)} VMAs"
        return f"<Process {self.name!r} mm={self.mm.id} {state}>"

    # ------------------------------------------------------------ helpers
    def _k(self):  # type: ignore[no-untyped-def]
        if self.mm.dead:
            raise InvalidArgument(f"process {self.name!r} has exited")
        return self.machine.kernel

    def _run(self, gen):  # type: ignore[no-untyped-def]
        return self.machine.runner.run(gen)

    @staticmethod
    def _range(addr: int, length: int) -> tuple[int, int]:
        if not isinstance(addr, int | np.integer) or not isinstance(length, int | np.integer):
            raise InvalidArgument(f"address {addr!r} and length {length!r} must be integers")
        if length <= 0:
            raise InvalidArgument(f"length {length} must be positive")
        start = int(addr) & ~(PAGE - 1)
        end = (int(addr) + int(length) + PAGE - 1) & ~(PAGE - 1)
        return start, end

    # ------------------------------------------------------------ address space
    def mmap(self, length: int, prot: str = "rw", *, addr: int | None = None, shared: bool = False,
             align: int | None = None, file: File | None = None, offset: int = 0) -> int:
        """Map memory (private anonymous unless ``shared``/``file``); return its address."""
        return mmap.do_mmap(self._k(), self.mm, length, prot, addr=addr, shared=shared,
                            align=align, file=file, offset=offset)

    def munmap(self, addr: int, length: int) -> None:
        self._run(mmap.do_munmap(self._k(), self.mm, addr, length))

    def mprotect(self, addr: int, length: int, prot: str) -> None:
        self._run(mmap.do_mprotect(self._k(), self.mm, addr, length, prot))

    def madvise(self, addr: int, length: int, advice: str) -> None:
        self._run(mmap.do_madvise(self._k(), self.mm, addr, length, advice))

    def mremap(self, addr: int, old_len: int, new_len: int, new_addr: int | None = None) -> int:
        return int(self._run(mmap.do_mremap(self._k(), self.mm, addr, old_len, new_len, new_addr)))

    def set_folio_orders(self, orders: Sequence[int]) -> None:
        """Anon folio orders the fault path may allocate (mTHP policy); 0 is always allowed."""
        k = self._k()
        # THP_ORDERS_ALL_ANON: order 1 is not an anon mTHP order (include/linux/huge_mm.h)
        allowed = [0, *range(2, k.arch.pmd_order + 1)]
        bad = [o for o in orders if not isinstance(o, int) or o not in allowed]
        if bad:
            raise InvalidArgument(f"folio orders {bad} not supported by {k.arch.name}; "
                                  f"allowed: 0 and 2..{k.arch.pmd_order} ({k.arch.pmd_order} = PMD THP)")
        self.mm.folio_orders = tuple(sorted(set(orders) | {0}, reverse=True))

    # ------------------------------------------------------------ memory access
    def populate(self, addr: int, length: int, write: bool = True) -> None:
        """Fault every page of the range in, as touching each page in order would."""
        start, end = self._range(addr, length)
        self._run(fault.fault_range(self._k(), self.mm, start, end, write=write))

    def write(self, addr: int, token: int, length: int = PAGE) -> None:
        """A CPU store to every page of [addr, addr+length): faults like the kernel, then sets
        each page's content token."""
        start, end = self._range(addr, length)
        k = self._k()
        self._run(fault.fault_range(k, self.mm, start, end, write=True))
        pfn, _, _ = gup.follow_range(k, self.mm, start, end)
        k.phys.token[pfn] = int(token)

    def read(self, addr: int, length: int | None = None) -> int | NDArray[np.int64]:
        """A CPU load: the page's token, or an array of tokens (one per page) with ``length``."""
        start, end = self._range(addr, length or 1)
        k = self._k()
        self._run(fault.fault_range(k, self.mm, start, end, write=False))
        pfn, _, _ = gup.follow_range(k, self.mm, start, end)
        tokens = k.phys.token[pfn]
        return int(tokens[0]) if length is None else tokens.copy()

    def split_huge_pmd(self, addr: int, length: int) -> None:
        """PTE-map every PMD-mapped THP in the range (mmuemu extension; mirrors
        __split_huge_pmd, which a partial mprotect or munmap would cause)."""
        start, end = self._range(addr, length)
        ops = Ops()
        huge_memory.split_huge_pmds_in(self._k(), self.mm, start, end, ops, partial_only=False)
        self._run(_one(Work("split_huge_pmd", ops)))

    # ------------------------------------------------------------ fork, exit, GUP
    def fork(self, mode: str | None = None, name: str | None = None) -> Process:
        """fork(): a child with a copy of this address space."""
        child_mm = self._run(fork.dup_mmap(self._k(), self.mm, mode))
        return Process(self.machine, child_mm, name or f"{self.name}-child")

    def exit(self) -> None:
        """Tear the address space down (exit_mmap)."""
        k = self._k()
        self._run(mmap.exit_mmap(k, self.mm))

    def get_pages(self, addr: int, length: int) -> gup.GupHandle:
        """FOLL_GET references on the pages (like vmsplice)."""
        start, end = self._range(addr, length)
        return self._run(gup.gup(self._k(), self.mm, start, end - start, pin=False, write=False,
                                 longterm=False))

    def pin(self, addr: int, length: int, write: bool = False, longterm: bool = True) -> gup.GupHandle:
        """FOLL_PIN (with FOLL_LONGTERM): R/O longterm pins unshare shared anon pages first."""
        start, end = self._range(addr, length)
        return self._run(gup.gup(self._k(), self.mm, start, end - start, pin=True, write=write,
                                 longterm=longterm))

    def run_on(self, *cpus: int) -> None:
        """Record that this process's threads ran on these CPUs (mm_cpumask), so TLB
        shootdowns reach them (x86: one IPI per other CPU)."""
        bad = [c for c in cpus if not isinstance(c, int) or not 0 <= c < self.machine.cpus]
        if bad:
            raise InvalidArgument(f"cpus {bad} do not exist; this machine has 0..{self.machine.cpus - 1}")
        self._k()
        self.mm.cpumask |= set(cpus)

    # ------------------------------------------------------------ inspection
    def pte(self, addr: int) -> PteInfo:
        """The entry mapping ``addr`` (a PMD leaf is shown as its page's PTE)."""
        k = self._k()
        start = int(addr) & ~(PAGE - 1)
        _, _, vals = gup.follow_range(k, self.mm, start, start + PAGE)
        slots = k.pt.pmd_slots(self.mm.pgd_row, start, start + PAGE)
        is_pmd = bool(len(slots.va)) and bool(k.arch.pmd_leaf(k.pt.flat[slots.flat])[0])
        if is_pmd:
            d = k.arch.describe(int(k.arch.pmd_to_pte(k.pt.flat[slots.flat])[0]))
            d["pfn"] = int(k.arch.pte_pfn(vals)[0])
            return PteInfo(**d, pmd=True)
        return PteInfo(**k.arch.describe(int(vals[0])))

    def folio(self, addr: int) -> FolioInfo:
        """The folio mapped at ``addr`` (InvalidArgument if nothing or the zero page is)."""
        k = self._k()
        ph = k.phys
        start = int(addr) & ~(PAGE - 1)
        pfn, present, vals = gup.follow_range(k, self.mm, start, start + PAGE)
        p = int(pfn[0])
        if not present[0] or ph.flags[p] & F_RESERVED or k.arch.pte_special(vals)[0]:
            raise InvalidArgument(f"no folio mapped at {addr:#x}")
        h = int(ph.head[p])
        large = bool(ph.order[h])  # the large-folio counts are only kept for large folios
        pmd_mapped = int(ph.entire_mapcount[h]) if large else 0
        return FolioInfo(
            pfn=h, order=int(ph.order[h]), refcount=int(ph.refcount[h]),
            mapcount=int(ph.mapcount[p]) + pmd_mapped, anon=bool(ph.flags[h] & F_ANON),
            anon_exclusive=bool(ph.anon_exclusive[p] or (pmd_mapped and ph.anon_exclusive[h])),
            pinned=bool(ph.folio_maybe_dma_pinned(np.array([h]))[0]),
            large_mapcount=int(ph.large_mapcount[h]) if large else 0, entire_mapcount=pmd_mapped,
            pincount=int(ph.pincount[h]) if large else 0,
        )

    @property
    def rss(self) -> dict[str, int]:
        return {name: int(self.mm.rss[i]) for i, name in sorted(RSS_NAMES.items(), key=lambda x: x[1])}

    @property
    def vmas(self) -> list[tuple[int, int, str]]:
        """(start, end, flags) of every VMA."""
        return [(v.start, v.end, VmFlag.names(v.flags)) for v in self.mm.vmas]


def _one(work: Work):  # type: ignore[no-untyped-def]
    yield work
