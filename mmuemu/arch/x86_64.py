"""x86_64 with 4 KiB pages and 4-level paging (48-bit virtual addresses).

x86 overrides only the encoding and the TLB flush: ``set_ptes`` and ``wrprotect_ptes`` are
the generic loops (x86 defines neither), ``ptep_set_wrprotect`` is the v6.6+ cmpxchg loop
whose ``pte_wrprotect`` moves Dirty into SavedDirty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from mmuemu.arch.base import I64, U64, Arch, Prot

if TYPE_CHECKING:
    from mmuemu.mm.work import Ops

__all__ = ["X86_64"]


def _b(bit: int) -> np.uint64:
    return np.uint64(1 << bit)


PRESENT = _b(0)
RW = _b(1)
USER = _b(2)
PWT = _b(3)
PCD = _b(4)
ACCESSED = _b(5)
DIRTY = _b(6)
PSE = _b(7)  # PAT on a 4K PTE, "huge" on a PMD
GLOBAL = _b(8)
PROTNONE = GLOBAL  # only when !PRESENT
SPECIAL = _b(9)  # SOFTW1
UFFD_WP = _b(10)  # SOFTW2
SOFT_DIRTY = _b(11)  # SOFTW3
SAVED_DIRTY = _b(58)  # SOFTW5
NX = _b(63)
PFN_MASK = np.uint64(((1 << 52) - 1) & ~0xFFF)
PAGE_TABLE = PRESENT | RW | USER | ACCESSED | DIRTY
_TABLE_BITS, _PFN_BITS = int(PAGE_TABLE), int(PFN_MASK)  # as Python ints, for single entries
#: the bits pte_modify keeps (_PAGE_CHG_MASK: PFN, caching, special, A, D, SavedDirty, ...)
CHG_MASK = PFN_MASK | PCD | PWT | SPECIAL | ACCESSED | DIRTY | SAVED_DIRTY | SOFT_DIRTY | UFFD_WP
ZERO = np.uint64(0)


class X86_64(Arch):
    """The x86_64 backend (arch/x86/include/asm/pgtable*.h, arch/x86/mm/tlb.c)."""

    name: ClassVar[str] = "x86_64"
    #: tlb_single_page_flush_ceiling: ranges wider than this many pages flush the whole mm
    flush_ceiling: ClassVar[int] = 33
    #: ptep_get_and_clear_full: a plain load and store when the mm is dying
    plain_clear_full: ClassVar[bool] = True

    # ------------------------------------------------------------ protections
    def vm_get_page_prot(self, prot: Prot) -> int:
        """Mirrors: arch/x86/mm/pgprot.c protection_map (PAGE_NONE/READONLY/COPY/SHARED)."""
        if not (prot.read or prot.write or prot.exec):
            return int(PROTNONE | ACCESSED)
        bits = PRESENT | USER | ACCESSED
        if prot.write and prot.shared:
            bits |= RW
        if not prot.exec:
            bits |= NX
        return int(bits)

    # ------------------------------------------------------------ encoding
    @staticmethod
    def _needs_invert(val: U64) -> NDArray[np.bool_]:
        """Mirrors: __pte_needs_invert (L1TF: non-present entries store the PFN inverted)."""
        return (val != 0) & ((val & PRESENT) == 0)

    def pfn_pte(self, pfn: I64, prot: int) -> U64:
        """Mirrors: pfn_pte (with the L1TF protnone inversion)."""
        pte = np.asarray(pfn, dtype=np.uint64) << np.uint64(12)
        p = np.uint64(prot)
        if prot and not (prot & int(PRESENT)):
            pte = pte ^ PFN_MASK
        return (pte & PFN_MASK) | p

    def pte_pfn(self, pte: U64) -> I64:
        """Mirrors: pte_pfn (undoing the L1TF inversion)."""
        pte = np.asarray(pte, dtype=np.uint64)
        if np.count_nonzero(pte & PRESENT) != np.count_nonzero(pte):  # some are inverted
            pte = pte ^ np.where(self._needs_invert(pte), PFN_MASK, ZERO)
        return ((pte & PFN_MASK) >> np.uint64(12)).view(np.int64)

    def pte_present(self, pte: U64) -> NDArray[np.bool_]:
        """Mirrors: pte_present (PRESENT or PROTNONE)."""
        return (pte & (PRESENT | PROTNONE)) != 0

    def pte_write(self, pte: U64) -> NDArray[np.bool_]:
        return (pte & RW) != 0

    def pte_dirty(self, pte: U64) -> NDArray[np.bool_]:
        """Mirrors: pte_dirty (Dirty or SavedDirty, v6.6+)."""
        return (pte & (DIRTY | SAVED_DIRTY)) != 0

    def pte_young(self, pte: U64) -> NDArray[np.bool_]:
        return (pte & ACCESSED) != 0

    def pte_special(self, pte: U64) -> NDArray[np.bool_]:
        return (pte & SPECIAL) != 0

    def pte_uffd_wp(self, pte: U64) -> NDArray[np.bool_]:
        return (pte & UFFD_WP) != 0

    def pte_soft_dirty(self, pte: U64) -> NDArray[np.bool_]:
        return (pte & SOFT_DIRTY) != 0

    @staticmethod
    def _mksaveddirty(pte: U64, fresh: bool = False) -> U64:
        """Mirrors: pte_mksaveddirty: on a Write=0 entry, move Dirty into SavedDirty.
        (``fresh``: ``pte`` is a temporary that may be changed in place.)"""
        if np.ndim(pte) == 0:  # (the in-place steps below need an array)
            return X86_64._mksaveddirty(np.array([pte], dtype=np.uint64), fresh=True)[0]  # type: ignore[no-any-return]
        out = pte if fresh else pte.copy()
        # Dirty where RW is clear: bit 1 (RW) shifted to bit 6 (Dirty), inverted
        dirty = np.left_shift(out, np.uint64(5))
        np.invert(dirty, out=dirty)
        dirty &= DIRTY
        dirty &= out
        out ^= dirty  # (those Dirty bits are set: clear them)
        dirty <<= np.uint64(52)
        out |= dirty
        return out

    @staticmethod
    def _clear_saveddirty(pte: U64, fresh: bool = False) -> U64:
        """Mirrors: pte_clear_saveddirty: on a Write=1 entry, move SavedDirty into Dirty."""
        if np.ndim(pte) == 0:  # (the in-place steps below need an array)
            return X86_64._clear_saveddirty(np.array([pte], dtype=np.uint64), fresh=True)[0]  # type: ignore[no-any-return]
        out = pte if fresh else pte.copy()
        saved = np.left_shift(out, np.uint64(57))  # RW (bit 1) moved to bit 58
        saved &= SAVED_DIRTY
        saved &= out
        out ^= saved
        saved >>= np.uint64(52)
        out |= saved
        return out

    def pte_wrprotect(self, pte: U64) -> U64:
        """Mirrors: pte_wrprotect: clear RW, Dirty moves to SavedDirty."""
        return self._mksaveddirty(pte & ~RW, fresh=True)

    def pte_mkwrite(self, pte: U64) -> U64:
        """Mirrors: pte_mkwrite_novma: set RW, SavedDirty moves back to Dirty."""
        return self._clear_saveddirty(pte | RW, fresh=True)

    def pte_mkclean(self, pte: U64) -> U64:
        return pte & ~(DIRTY | SAVED_DIRTY)

    def pte_mkdirty(self, pte: U64) -> U64:
        """Mirrors: pte_mkdirty: Dirty and SoftDirty, kept as SavedDirty on Write=0 entries."""
        return self._mksaveddirty(pte | DIRTY | SOFT_DIRTY, fresh=True)

    def pte_hw_access(self, pte: U64, write: bool) -> U64:
        """The page walker sets A, and D on a store through a writable entry (no soft-dirty)."""
        return pte | (ACCESSED | DIRTY if write else ACCESSED)

    def pte_mkold(self, pte: U64) -> U64:
        return pte & ~ACCESSED

    def pte_mkyoung(self, pte: U64) -> U64:
        return pte | ACCESSED

    def pte_mkspecial(self, pte: U64) -> U64:
        return pte | SPECIAL

    def pte_clear_uffd_wp(self, pte: U64) -> U64:
        return pte & ~UFFD_WP

    def pte_clear_soft_dirty(self, pte: U64) -> U64:
        return pte & ~SOFT_DIRTY

    def pte_mkuffd_wp(self, pte: U64) -> U64:
        return pte | UFFD_WP

    def pte_mksoft_dirty(self, pte: U64) -> U64:
        return pte | SOFT_DIRTY

    def pte_modify(self, pte: U64, prot: int) -> U64:
        """Mirrors: arch/x86 pte_modify (CHG_MASK, L1TF flip, SavedDirty rules)."""
        pte = np.asarray(pte, dtype=np.uint64)
        newprot = np.uint64(prot) & ~CHG_MASK
        val = (pte & CHG_MASK) | newprot
        flip = self._needs_invert(pte) != self._needs_invert(val)
        val = np.where(flip, val ^ PFN_MASK, val)
        return np.where((pte & RW) != 0, self._mksaveddirty(val), self._clear_saveddirty(val))

    def pte_advance_pfn(self, pte: U64, nr: I64 | int) -> U64:
        """Mirrors: arch/x86 pte_advance_pfn (subtracts for inverted, non-present entries)."""
        step = np.asarray(nr, dtype=np.uint64) << np.uint64(12)
        pte = np.asarray(pte, dtype=np.uint64)
        if (pte & PRESENT).all():  # the common case: present entries are never inverted
            return pte + step
        inv = self._needs_invert(pte)
        return np.where(inv, pte - step, pte + step)

    def pte_same_bits(self, pte: U64) -> U64:
        return pte & ~PFN_MASK

    def pte_batch_bits(self, pte: U64, ignore_dirty: bool, ignore_soft_dirty: bool) -> U64:
        """The generic normalisation, as masks: wrprotect folds Dirty into SavedDirty, so the
        dirty state compares as one bit."""
        drop = PFN_MASK | RW | ACCESSED | DIRTY | SAVED_DIRTY | (SOFT_DIRTY if ignore_soft_dirty else ZERO)
        key = pte & ~drop
        if not ignore_dirty:
            key |= (((pte >> np.uint64(6)) | (pte >> np.uint64(58))) & np.uint64(1)) << np.uint64(58)
        return key

    def mk_table(self, pfn: I64) -> U64:
        return (np.asarray(pfn, dtype=np.uint64) << np.uint64(12)) | PAGE_TABLE

    def table_pfn(self, entry: U64) -> I64:
        return ((np.asarray(entry, dtype=np.uint64) & PFN_MASK) >> np.uint64(12)).view(np.int64)

    def mk_table_of(self, pfn: int) -> int:
        return (pfn << 12) | _TABLE_BITS

    def table_pfn_of(self, entry: int) -> int:
        return (entry & _PFN_BITS) >> 12

    def pmd_leaf(self, pmd: U64) -> NDArray[np.bool_]:
        return ((pmd & PSE) != 0) & ((pmd & (PRESENT | PROTNONE)) != 0)

    def pmd_to_pte(self, pmd: U64) -> U64:
        return pmd & ~PSE

    def pte_to_pmd(self, pte: U64) -> U64:
        return pte | PSE

    # ------------------------------------------------------------ TLB
    def flush_tlb_mm(self, mm: Any, ops: Ops, cpu: int = 0) -> None:
        """Mirrors: arch/x86/mm/tlb.c flush_tlb_mm: a local flush plus an IPI to every other
        CPU in mm_cpumask (freed_tables=true, so lazy CPUs are not skipped)."""
        ops.add("tlb_flush_mm", 1)
        self.note_flush(mm, ops)
        others = len(mm.cpumask - {cpu})
        if others:
            ops.add("ipis", others)

    def flush_tlb_range(self, mm: Any, start: int, end: int, ops: Ops, cpu: int = 0,
                        stride_shift: int | None = None) -> None:
        """Mirrors: flush_tlb_mm_range (freed_tables=false): one INVLPG per stride up to the
        33-entry ceiling, else a full flush of the mm's ASID, locally and by IPI on every
        other CPU in mm_cpumask."""
        pages = (end - start) >> (stride_shift or self.page_shift)
        ops.add("tlb_flush_range", 1)
        self.note_flush(mm, ops, start, end)
        others = len(mm.cpumask - {cpu})
        if others:
            ops.add("ipis", others)
        if cpu in mm.cpumask:
            if pages > self.flush_ceiling:
                ops.add("tlb_local_flushes", 1)
            else:
                ops.add("tlbi_ops", pages)
