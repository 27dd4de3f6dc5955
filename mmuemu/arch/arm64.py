"""arm64 with the 4 KiB granule and 4 levels (48-bit virtual addresses), without contpte.

This is the plain arm64 backend: every ``__``-prefixed helper of
``arch/arm64/include/asm/pgtable.h`` as the kernel has it with CONFIG_ARM64_CONTPTE=n, so
``set_ptes`` and ``wrprotect_ptes`` are the generic loops (``__set_ptes``,
``__wrprotect_ptes``: one store, one cmpxchg per entry) and ``pte_batch_hint`` is 1.  The
contpte layer is a subclass in its own module.

Descriptor layout: Linux **v6.9** (the bits of ``pgtable-hwdef.h``/``pgtable-prot.h`` then):

- hardware: 0 VALID, 1 TABLE/PAGE (PTE_TYPE_PAGE = 0b11; clear in a PMD block), 4:2 AttrIndx,
  6 AP[1] = PTE_USER, 7 AP[2] = PTE_RDONLY, 9:8 SH = 0b11 (PTE_SHARED, no LPA2), 10 AF,
  11 nG, 12-47 OA (48-bit PA), 50 GP, 51 DBM = PTE_WRITE, 52 CONT, 53 PXN, 54 UXN;
  table descriptors also set PXNTable (bit 59), as ``pmd_populate`` does for user tables;
- software: 55 PTE_DIRTY, 56 PTE_SPECIAL, 57 PTE_DEVMAP, 58 PTE_PROT_NONE (only when !VALID).

uffd-wp: arm64 v6.9 does not select HAVE_ARCH_USERFAULTFD_WP, so there is no PTE_UFFD_WP bit
and the generic stubs apply (``pte_uffd_wp`` is false, the setters return the entry).  The
~v6.10 layout (PTE_PRESENT_INVALID = nG when !VALID, PTE_UFFD_WP = bit 58 in place of
PROT_NONE) is not modelled.  arm64 has no soft-dirty either: those helpers are no-ops.

``pte_mkwrite`` is v6.9's ``pte_mkwrite_novma``: it sets DBM **and clears RDONLY**, so a clean
entry made writable reads as hardware-dirty (fixed in v6.18 by 143937ca51cc, which clears
RDONLY only when PTE_DIRTY is set; ``mkwrite_dirty_only`` selects that form).

Machine options: ``hafdbs`` (FEAT_HAFDBS: the MMU sets AF and, through DBM, clears RDONLY
on a write; without it those accesses fault: the core's fault path asks
:attr:`Arm64.hw_access_flags`), ``tlbi_range``
(FEAT_TLBIRANGE: range TLBIs), ``kpti`` (every TLBI is issued for the user ASID too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from mmuemu.arch.base import I64, U64, Arch, Prot
from mmuemu.errors import InvalidArgument

if TYPE_CHECKING:
    from mmuemu.mm.work import Ops

__all__ = ["Arm64"]


def _b(bit: int) -> np.uint64:
    return np.uint64(1 << bit)


def _s(n: int) -> np.uint64:
    return np.uint64(n)


VALID = _b(0)
TABLE = _b(1)  # PTE_TABLE_BIT / PMD_TABLE_BIT: page or table descriptor; clear in a block
TYPE_PAGE = VALID | TABLE
ATTRINDX_MASK = np.uint64(7 << 2)
#: MAIR index of Normal write-back memory.  Linux keeps MT_NORMAL at index 0 (memory.h:
#: vm_get_page_prot may OR in MT_NORMAL_TAGGED = 1 for PROT_MTE), and protection_map holds
#: only MT_NORMAL attributes, so every user page here has AttrIndx = 0.
MT_NORMAL = 0
ATTR_NORMAL = np.uint64(MT_NORMAL << 2)
USER = _b(6)  # AP[1]
RDONLY = _b(7)  # AP[2]
SHARED = np.uint64(3 << 8)  # SH: inner shareable
AF = _b(10)
NG = _b(11)
ADDR_MASK = np.uint64(((1 << 48) - 1) & ~0xFFF)  # OA, 48-bit PA
GP = _b(50)
WRITE = _b(51)  # DBM
CONT = _b(52)
PXN = _b(53)
UXN = _b(54)
DIRTY = _b(55)  # software dirty
SPECIAL = _b(56)
DEVMAP = _b(57)
PROT_NONE = _b(58)  # only when !VALID
TABLE_PXN = _b(59)  # PXNTable, in table descriptors only
_TABLE_BITS, _ADDR_BITS = int(TYPE_PAGE | TABLE_PXN), int(ADDR_MASK)  # as Python ints
ONE = _s(1)
S7, S44, S48, S51, S55 = _s(7), _s(44), _s(48), _s(51), _s(55)

#: _PAGE_DEFAULT: PTE_TYPE_PAGE | PTE_AF | PTE_SHARED | PTE_ATTRINDX(MT_NORMAL)
PAGE_DEFAULT = TYPE_PAGE | AF | SHARED | ATTR_NORMAL
PAGE_NONE = (PAGE_DEFAULT & ~VALID) | PROT_NONE | RDONLY | NG | PXN | UXN
#: shared+writable pages start clean: RDONLY together with WRITE (DBM)
PAGE_SHARED = PAGE_DEFAULT | USER | RDONLY | NG | PXN | UXN | WRITE
PAGE_SHARED_EXEC = PAGE_DEFAULT | USER | RDONLY | NG | PXN | WRITE
PAGE_READONLY = PAGE_DEFAULT | USER | RDONLY | NG | PXN | UXN
PAGE_READONLY_EXEC = PAGE_DEFAULT | USER | RDONLY | NG | PXN
PAGE_EXECONLY = PAGE_DEFAULT | RDONLY | NG | PXN
#: the bits pte_modify takes from the new protection
MODIFY_MASK = USER | PXN | UXN | RDONLY | PROT_NONE | VALID | WRITE | GP | ATTRINDX_MASK


def _hw_dirty_to(pte: U64, shift: np.uint64) -> U64:
    """pte_hw_dirty (DBM set, RDONLY clear) as a 0/1 bit moved to bit ``shift``."""
    return ((pte >> S51) & ~(pte >> S7) & ONE) << shift  # type: ignore[no-any-return]


class Arm64(Arch):
    """The arm64 backend (arch/arm64/include/asm/pgtable*.h, tlbflush.h), contpte off."""

    name: ClassVar[str] = "arm64"
    #: CONT_PTES for the 4K granule (CONFIG_ARM64_CONT_PTE_SHIFT = 4): 16 entries = 64 KiB
    cont_ptes: ClassVar[int] = 16
    #: MAX_DVM_OPS (= PTRS_PER_PTE): without TLBIRANGE, wider ranges flush the whole ASID
    max_dvm_ops: ClassVar[int] = 512
    #: MAX_TLBI_RANGE_PAGES = __TLBI_RANGE_PAGES(31, 3)
    max_tlbi_range_pages: ClassVar[int] = 32 << 16
    #: pte_mkwrite clears RDONLY only on sw-dirty entries (v6.18, 143937ca51cc); v6.9: always
    mkwrite_dirty_only: ClassVar[bool] = False
    #: the machine options this backend accepts
    allowed_options: ClassVar[tuple[str, ...]] = ("hafdbs", "kpti", "tlbi_range")

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.allowed_options))
        if unknown:
            raise InvalidArgument(f"unknown {self.name} option{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(map(repr, unknown))}; allowed: {', '.join(self.allowed_options)}")
        for key, value in options.items():
            if not isinstance(value, (bool, np.bool_)):
                raise InvalidArgument(f"{self.name} option {key!r} must be true or false, not {value!r}")
        super().__init__()
        self.hafdbs: bool = bool(options.get("hafdbs", True))
        self.tlbi_range: bool = bool(options.get("tlbi_range", False))
        self.kpti: bool = bool(options.get("kpti", False))

    # ------------------------------------------------------------ protections
    def vm_get_page_prot(self, prot: Prot) -> int:
        """Mirrors: arch/arm64/mm/mmap.c protection_map (without FEAT_EPAN, so exec-only
        maps as PAGE_READONLY_EXEC): private writable mappings are read-only (COW)."""
        if prot.write and prot.shared:
            bits = PAGE_SHARED_EXEC if prot.exec else PAGE_SHARED
        elif prot.exec:
            bits = PAGE_READONLY_EXEC
        elif prot.read or prot.write:
            bits = PAGE_READONLY
        else:
            bits = PAGE_NONE
        return int(bits)

    # ------------------------------------------------------------ encoding
    def pfn_pte(self, pfn: I64, prot: int) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pfn_pte (48-bit PA)."""
        return ((np.asarray(pfn, dtype=np.uint64) << _s(12)) & ADDR_MASK) | np.uint64(prot)  # type: ignore[no-any-return]

    def pte_pfn(self, pte: U64) -> I64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_pfn."""
        return ((np.asarray(pte, dtype=np.uint64) & ADDR_MASK) >> _s(12)).view(np.int64)  # type: ignore[no-any-return]

    def pte_present(self, pte: U64) -> NDArray[np.bool_]:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_present (VALID or PROT_NONE)."""
        return (pte & (VALID | PROT_NONE)) != 0  # type: ignore[no-any-return]

    def pte_write(self, pte: U64) -> NDArray[np.bool_]:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_write (PTE_WRITE = DBM)."""
        return (pte & WRITE) != 0  # type: ignore[no-any-return]

    def pte_hw_dirty(self, pte: U64) -> NDArray[np.bool_]:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_hw_dirty (DBM and not RDONLY)."""
        return ((pte & WRITE) != 0) & ((pte & RDONLY) == 0)  # type: ignore[no-any-return]

    def pte_dirty(self, pte: U64) -> NDArray[np.bool_]:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_dirty (sw dirty or hw dirty)."""
        return ((pte & DIRTY) != 0) | self.pte_hw_dirty(pte)  # type: ignore[no-any-return]

    def pte_young(self, pte: U64) -> NDArray[np.bool_]:
        return (pte & AF) != 0  # type: ignore[no-any-return]

    def pte_special(self, pte: U64) -> NDArray[np.bool_]:
        return (pte & SPECIAL) != 0  # type: ignore[no-any-return]

    def pte_cont(self, pte: U64) -> NDArray[np.bool_]:
        return (pte & CONT) != 0  # type: ignore[no-any-return]

    def pte_uffd_wp(self, pte: U64) -> NDArray[np.bool_]:
        """Mirrors: include/asm-generic/pgtable_uffd.h pte_uffd_wp (v6.9 arm64: no uffd-wp)."""
        return np.zeros(np.shape(pte), dtype=bool)

    def pte_soft_dirty(self, pte: U64) -> NDArray[np.bool_]:
        """arm64 has no soft-dirty bit (no HAVE_ARCH_SOFT_DIRTY)."""
        return np.zeros(np.shape(pte), dtype=bool)

    def pte_wrprotect(self, pte: U64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_wrprotect: hw-dirty moves to
        PTE_DIRTY, DBM cleared, RDONLY set."""
        return (pte | _hw_dirty_to(pte, S55) | RDONLY) & ~WRITE  # type: ignore[no-any-return]

    def pte_mkwrite(self, pte: U64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_mkwrite_novma (v6.9: set DBM, clear
        RDONLY; with ``mkwrite_dirty_only``, v6.18: clear RDONLY only if PTE_DIRTY)."""
        if self.mkwrite_dirty_only:
            out = pte | WRITE
            return out & ~((out >> S48) & RDONLY)  # type: ignore[no-any-return]
        return (pte | WRITE) & ~RDONLY  # type: ignore[no-any-return]

    def pte_mkclean(self, pte: U64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_mkclean: clear PTE_DIRTY, set RDONLY."""
        return (pte & ~DIRTY) | RDONLY  # type: ignore[no-any-return]

    def pte_mkdirty(self, pte: U64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_mkdirty: set PTE_DIRTY, and clear
        RDONLY if writable (DBM)."""
        out = pte | DIRTY
        return out & ~((out >> S44) & RDONLY)  # type: ignore[no-any-return]

    def pte_mkold(self, pte: U64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_mkold."""
        return pte & ~AF  # type: ignore[no-any-return]

    def pte_mkyoung(self, pte: U64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_mkyoung."""
        return pte | AF  # type: ignore[no-any-return]

    def pte_mkspecial(self, pte: U64) -> U64:
        return pte | SPECIAL  # type: ignore[no-any-return]

    def pte_mkcont(self, pte: U64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_mkcont (CONT, and a page descriptor)."""
        return pte | CONT | TYPE_PAGE  # type: ignore[no-any-return]

    def pte_mknoncont(self, pte: U64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_mknoncont."""
        return pte & ~CONT  # type: ignore[no-any-return]

    def pte_clear_uffd_wp(self, pte: U64) -> U64:
        return pte  # the generic stub: no uffd-wp bit in v6.9 arm64

    def pte_mkuffd_wp(self, pte: U64) -> U64:
        return pte

    def pte_mksoft_dirty(self, pte: U64) -> U64:
        return pte  # no soft-dirty on arm64

    def pte_clear_soft_dirty(self, pte: U64) -> U64:
        return pte

    @property
    def hw_access_flags(self) -> bool:
        """FEAT_HAFDBS: the MMU sets AF and, through DBM, clears RDONLY on a store."""
        return self.hafdbs

    def pte_hw_access(self, pte: U64, write: bool) -> U64:
        """What FEAT_HAFDBS does to a valid entry it uses: set AF; on a store through a
        writable (DBM) entry, clear RDONLY (the entry becomes hardware-dirty; PTE_DIRTY is
        software's).  Without ``hafdbs`` the hardware changes nothing: the access faults
        instead (access-flag / permission fault, see :attr:`hw_access_flags`), so the entry
        is returned unchanged."""
        pte = np.asarray(pte, dtype=np.uint64)
        if not self.hafdbs:
            return pte.copy()
        out = pte | ((pte & VALID) << _s(10))
        if write:  # RDONLY cleared where VALID (bit 0 -> 7) and DBM (bit 51 -> 7)
            out &= ~((out >> S44) & (out << S7) & RDONLY)
        return out  # type: ignore[no-any-return]

    def pte_modify(self, pte: U64, prot: int) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_modify: hw-dirty saved in PTE_DIRTY,
        the MODIFY_MASK bits (USER, PXN, UXN, RDONLY, PROT_NONE, VALID, WRITE, GP, AttrIndx)
        taken from ``prot``, then a sw-dirty entry made hw-dirty again if writable."""
        pte = np.asarray(pte, dtype=np.uint64)
        val = ((pte | _hw_dirty_to(pte, S55)) & ~MODIFY_MASK) | (np.uint64(prot) & MODIFY_MASK)
        return val & ~((val >> S48) & (val >> S44) & RDONLY)  # type: ignore[no-any-return]

    def pte_advance_pfn(self, pte: U64, nr: I64 | int) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_advance_pfn (the PFN rebuilt with
        pfn_pte(pte_pfn + nr, pte_pgprot), so it never carries out of OA)."""
        pte = np.asarray(pte, dtype=np.uint64)
        oa = (pte & ADDR_MASK) + (np.asarray(nr, dtype=np.uint64) << _s(12))
        oa &= ADDR_MASK
        return oa | (pte & ~ADDR_MASK)  # type: ignore[no-any-return]

    def pte_same_bits(self, pte: U64) -> U64:
        return pte & ~ADDR_MASK  # type: ignore[no-any-return]

    def pte_batch_bits(self, pte: U64, ignore_dirty: bool, ignore_soft_dirty: bool) -> U64:
        """The generic normalisation (mkold, wrprotect, mkclean if ignoring dirty, no PFN) as
        masks: the result always has RDONLY and never AF or WRITE, and PTE_DIRTY is the
        entry's dirtiness (sw or hw) unless ignored.  Equal to the generic composition."""
        key = (pte & ~(ADDR_MASK | AF | WRITE | RDONLY | DIRTY)) | RDONLY
        if not ignore_dirty:
            key |= (pte & DIRTY) | _hw_dirty_to(pte, S55)
        return key  # type: ignore[no-any-return]

    # table descriptors and PMD blocks
    def mk_table(self, pfn: I64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgalloc.h pmd_populate / pud_populate /
        p4d_populate for user tables: TABLE type, PXNTable, the table's address."""
        oa = (np.asarray(pfn, dtype=np.uint64) << _s(12)) & ADDR_MASK
        return oa | TYPE_PAGE | TABLE_PXN  # type: ignore[no-any-return]

    def table_pfn(self, entry: U64) -> I64:
        return ((np.asarray(entry, dtype=np.uint64) & ADDR_MASK) >> _s(12)).view(np.int64)

    def mk_table_of(self, pfn: int) -> int:
        return ((pfn << 12) & _ADDR_BITS) | _TABLE_BITS

    def table_pfn_of(self, entry: int) -> int:
        return (entry & _ADDR_BITS) >> 12

    def pmd_leaf(self, pmd: U64) -> NDArray[np.bool_]:
        """Mirrors: arch/arm64/include/asm/pgtable.h pmd_leaf (present and not a table)."""
        return ((pmd & TABLE) == 0) & ((pmd & (VALID | PROT_NONE)) != 0)  # type: ignore[no-any-return]

    def pmd_to_pte(self, pmd: U64) -> U64:
        """A PMD block as a page descriptor of its first page: pmd_pte, plus the TABLE/PAGE
        bit on present entries (which split_huge_pmd's PTEs carry through the VMA's prot)."""
        pmd = np.asarray(pmd, dtype=np.uint64)
        return pmd | (((pmd | (pmd >> _s(58))) & ONE) << ONE)  # type: ignore[no-any-return]

    def pte_to_pmd(self, pte: U64) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pmd_mkhuge (clear PMD_TABLE_BIT)."""
        return pte & ~TABLE  # type: ignore[no-any-return]

    # ------------------------------------------------------------ atomics arm64 always uses
    # (get_and_clear_full_ptes / clear_full_ptes: the generic xchg, plain_clear_full=False)
    def ptep_set_access_flags(self, mm: Any, store: U64, idx: I64, entry: U64, ops: Ops,
                              items: Any = None, dirty: bool = True) -> None:
        """Mirrors: arch/arm64/mm/fault.c __ptep_set_access_flags: nothing for an unchanged
        entry; else AF, PTE_DIRTY and write permission (DBM set, RDONLY cleared) merged in by
        a cmpxchg loop, then, for a write fault, flush_tlb_page of the stale read-only entry."""
        idx = np.asarray(idx, dtype=np.int64)
        old = store[idx]
        changed = old != entry
        if not changed.any():
            return
        ci = np.flatnonzero(changed)
        bits = (np.asarray(entry, dtype=np.uint64)[ci] & (RDONLY | AF | WRITE | DIRTY)) ^ RDONLY
        store[idx[ci]] = ((old[ci] ^ RDONLY) | bits) ^ RDONLY
        if items is None or np.isscalar(items):
            ops.add("pte_atomics", len(ci), items)
        else:
            ops.add("pte_atomics", 1, np.asarray(items)[ci])
        if dirty:
            self.flush_tlb_pages(mm, len(ci), ops)

    # ------------------------------------------------------------ TLB
    def _tlbi(self, ops: Ops, n: int) -> None:
        """``n`` TLBI instructions; under KPTI each is repeated for the user ASID (__tlbi_user)."""
        if n:
            ops.add("tlbi_ops", 2 * n if self.kpti else n)

    def flush_tlb_mm(self, mm: Any, ops: Ops, cpu: int = 0) -> None:
        """Mirrors: arch/arm64/include/asm/tlbflush.h flush_tlb_mm: one broadcast TLBI
        ASIDE1IS (two under KPTI) between DSBs; no IPIs."""
        ops.add("tlb_flush_mm", 1)
        self.note_flush(mm, ops)
        self._tlbi(ops, 1)

    def range_tlbis(self, start: int, end: int, stride_shift: int | None = None) -> int | None:
        """TLBI instructions __flush_tlb_range issues for [start, end) (before KPTI doubling),
        or None when it falls back to flush_tlb_mm."""
        shift = stride_shift or self.page_shift
        stride = 1 << shift
        start &= ~(stride - 1)
        end = (end + stride - 1) & ~(stride - 1)
        pages = (end - start) >> self.page_shift
        if not self.tlbi_range:
            if (end - start) >= self.max_dvm_ops * stride:
                return None
            return (end - start) >> shift  # one VALE1IS/VAE1IS per stride
        if pages > self.max_tlbi_range_pages:
            return None
        return self._range_op_count(pages, stride >> self.page_shift)

    @staticmethod
    def _range_op_count(pages: int, stride_pages: int) -> int:
        """Mirrors: __flush_tlb_range_op with FEAT_TLBIRANGE: R ops from scale 3 down to 0,
        each (num + 1) << (5 * scale + 1) pages; a lone last page gets a single-VA op."""
        n, scale = 0, 3
        while pages > 0:
            if pages == 1 or scale < 0:
                n += 1
                pages -= stride_pages
                continue
            unit = 5 * scale + 1
            num = (min(pages, 32 << unit) >> unit) - 1
            if num >= 0:
                n += 1
                pages -= (num + 1) << unit
            scale -= 1
        return n

    def flush_tlb_range(self, mm: Any, start: int, end: int, ops: Ops, cpu: int = 0,
                        stride_shift: int | None = None) -> None:
        """Mirrors: arch/arm64/include/asm/tlbflush.h __flush_tlb_range: one TLBI per stride
        below MAX_DVM_OPS strides (range TLBIs with ``tlbi_range``, up to
        MAX_TLBI_RANGE_PAGES), else flush_tlb_mm (counted as one, too); broadcast, no IPIs."""
        ops.add("tlb_flush_range", 1)
        n = self.range_tlbis(start, end, stride_shift)
        if n is None:
            self.flush_tlb_mm(mm, ops, cpu)
        else:
            self.note_flush(mm, ops, start, end)
            self._tlbi(ops, n)
