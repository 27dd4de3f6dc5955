"""The generic architecture layer: what ``include/linux/pgtable.h`` gives every architecture.

An architecture backend is a subclass of :class:`Arch`.  It must provide the PTE encoding
(the ``pte_*`` transforms and predicates, all vectorised over ``uint64`` arrays) and may
override the generic helpers exactly where its kernel overrides them.  The generic helpers
below are the kernel's plain loops (``set_ptes`` writes ``nr`` entries advancing the PFN,
``wrprotect_ptes`` is ``nr`` times ``ptep_set_wrprotect``, ``pte_batch_hint`` is 1); here a
"loop" runs over many runs of entries at once as numpy operations, and counts what the
kernel loop would have done.

Helpers take the flat entry store of all page tables (``store``), flat indices into it, an
:class:`~mmuemu.mm.work.Ops` to count into and, optionally, the item of work each run
belongs to (``items``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from mmuemu.runs import Rows, Sel, expand_runs, run_offsets, sel_clear, sel_take

if TYPE_CHECKING:
    from mmuemu.mm.work import Ops

__all__ = ["U64", "Arch", "Prot"]

U64 = NDArray[np.uint64]
I64 = NDArray[np.int64]


def _u(x: int) -> np.uint64:
    return np.uint64(x)


class Prot:
    """Access rights of a mapping, as the kernel's VM_READ/VM_WRITE/VM_EXEC/VM_SHARED."""

    __slots__ = ("exec", "read", "shared", "write")

    def __init__(self, read: bool, write: bool, exec: bool, shared: bool) -> None:
        self.read, self.write, self.exec, self.shared = read, write, exec, shared


class Arch:
    """Generic helpers and geometry; backends subclass and override.

    Geometry: 4 KiB pages, 512 entries per table, 4 levels (PGD, PUD, PMD, PTE) and a 48-bit
    virtual address space unless a backend says otherwise.
    """

    name: ClassVar[str] = "generic"
    page_shift: ClassVar[int] = 12
    table_bits: ClassVar[int] = 9
    levels: ClassVar[int] = 4
    va_bits: ClassVar[int] = 48
    #: entries per contiguous block the hardware can cache as one TLB entry (1: none)
    cont_ptes: ClassVar[int] = 1
    #: anon folio orders the fault path may allocate (PMD order maps with a PMD leaf)
    max_folio_order: ClassVar[int] = 10

    #: ptep_get_and_clear_full is a plain store, not an atomic exchange, when the mm is
    #: dying (``full``): x86's override; the generic one is ptep_get_and_clear, an xchg
    plain_clear_full: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            from mmuemu.errors import InvalidArgument

            raise InvalidArgument(f"unknown {self.name} option(s) {', '.join(map(repr, sorted(options)))}; "
                                  f"{self.name} takes none")

    def attach(self, phys: Any) -> None:
        """Given the machine's physical memory once it exists (a layer that must find
        folios, as arm64's contpte fold does, keeps it; the generic layer needs none)."""

    # ---------------------------------------------------------------- geometry
    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def ptrs_per_table(self) -> int:
        return 1 << self.table_bits

    @property
    def pmd_shift(self) -> int:
        return self.page_shift + self.table_bits

    @property
    def pmd_order(self) -> int:
        return self.table_bits

    def level_shift(self, level: int) -> int:
        """Shift of the address bits indexing ``level`` (0 = PGD ... levels-1 = PTE)."""
        return self.page_shift + self.table_bits * (self.levels - 1 - level)

    # ---------------------------------------------------------------- encoding (backends)
    def vm_get_page_prot(self, prot: Prot) -> int:
        """Mirrors: mm/mmap.c vm_get_page_prot (the protection_map lookup)."""
        raise NotImplementedError

    def pfn_pte(self, pfn: I64, prot: int) -> U64:
        raise NotImplementedError

    def pte_pfn(self, pte: U64) -> I64:
        raise NotImplementedError

    def pte_present(self, pte: U64) -> NDArray[np.bool_]:
        raise NotImplementedError

    def pte_none(self, pte: U64) -> NDArray[np.bool_]:
        return pte == 0

    def pte_write(self, pte: U64) -> NDArray[np.bool_]:
        raise NotImplementedError

    def pte_dirty(self, pte: U64) -> NDArray[np.bool_]:
        raise NotImplementedError

    def pte_young(self, pte: U64) -> NDArray[np.bool_]:
        raise NotImplementedError

    def pte_special(self, pte: U64) -> NDArray[np.bool_]:
        raise NotImplementedError

    def pte_uffd_wp(self, pte: U64) -> NDArray[np.bool_]:
        raise NotImplementedError

    def pte_soft_dirty(self, pte: U64) -> NDArray[np.bool_]:
        raise NotImplementedError

    def pte_cont(self, pte: U64) -> NDArray[np.bool_]:
        return np.zeros(np.shape(pte), dtype=bool)

    def pte_wrprotect(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_mkwrite(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_mkclean(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_mkdirty(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_mkold(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_mkyoung(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_mkspecial(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_clear_uffd_wp(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_mkuffd_wp(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_mksoft_dirty(self, pte: U64) -> U64:
        raise NotImplementedError

    def pte_clear_soft_dirty(self, pte: U64) -> U64:
        raise NotImplementedError

    @property
    def hw_access_flags(self) -> bool:
        """Whether the MMU sets the access flag and dirties writable entries itself (x86
        always; arm64 with FEAT_HAFDBS).  Without it such accesses fault."""
        return True

    def pte_hw_access(self, pte: U64, write: bool) -> U64:
        """What the MMU does to an entry it uses: set Accessed, and Dirty on a write."""
        pte = self.pte_mkyoung(pte)
        return self.pte_mkdirty(pte) if write else pte

    def pte_modify(self, pte: U64, prot: int) -> U64:
        """Mirrors: pte_modify: keep the PFN and the page's own bits, take the new protection."""
        raise NotImplementedError

    @property
    def pte_pfn_unit(self) -> np.uint64:
        """How much a present entry grows when its PFN advances by one (1 << PFN_PTE_SHIFT):
        entries of consecutive pages with identical bits differ by exactly this."""
        return _u(1 << self.page_shift)

    def normal_pfn_run(self, vals: U64) -> int | None:
        """The first PFN when the entries map consecutive normal pages, each entry the
        previous one with the PFN advanced by one and nothing else changed (the usual range
        after a fault-in or a fork: every test is then the first entry's); else None.  Scalar
        tests first, then one vector test."""
        m = len(vals)
        if not m:
            return None
        unit = self.pte_pfn_unit
        if m > 1 and int(vals[-1]) - int(vals[0]) != (m - 1) * int(unit):
            return None
        ends = vals[[0, m - 1]]
        if not bool((self.pte_present(ends[:1]) & ~self.pte_special(ends[:1]))[0]):
            return None
        p0, p1 = self.pte_pfn(ends).tolist()
        if p1 != p0 + m - 1:  # (a PFN stored inverted goes down)
            return None
        if m > 2 and not bool((vals[1:] - vals[:-1] == unit).all()):
            return None
        return int(p0)

    def pte_advance_pfn(self, pte: U64, nr: I64 | int) -> U64:
        """Mirrors: include/linux/pgtable.h pte_advance_pfn (``pte + (nr << PFN_PTE_SHIFT)``)."""
        return pte + (np.asarray(nr, dtype=np.uint64) << _u(self.page_shift))

    def pte_same_bits(self, pte: U64) -> U64:
        """The entry with its PFN removed, for comparing two entries' attributes."""
        raise NotImplementedError

    def pte_batch_bits(self, pte: U64, ignore_dirty: bool, ignore_soft_dirty: bool) -> U64:
        """Mirrors: mm/internal.h __pte_batch_clear_ignored (v6.9), with the PFN removed:
        two entries can share a batch iff these are equal (and their PFNs are consecutive).
        Accessed and write are always ignored; dirty and soft-dirty per flag."""
        pte = self.pte_wrprotect(self.pte_mkold(pte))
        if ignore_dirty:
            pte = self.pte_mkclean(pte)
        if ignore_soft_dirty:
            pte = self.pte_clear_soft_dirty(pte)
        return self.pte_same_bits(pte)

    # table entries and PMD leaves
    def mk_table(self, pfn: I64) -> U64:
        """An upper-level entry pointing at the table page ``pfn``."""
        raise NotImplementedError

    def table_pfn(self, entry: U64) -> I64:
        raise NotImplementedError

    def mk_table_of(self, pfn: int) -> int:
        """:meth:`mk_table` of one table, as a Python int (walks touch one table a level)."""
        return int(self.mk_table(np.array([pfn], dtype=np.int64))[0])

    def table_pfn_of(self, entry: int) -> int:
        """:meth:`table_pfn` of one entry, as a Python int."""
        return int(self.table_pfn(np.array([entry], dtype=np.uint64))[0])

    def pmd_leaf(self, pmd: U64) -> NDArray[np.bool_]:
        """Mirrors: pmd_leaf / pmd_trans_huge: the entry maps a huge page itself."""
        raise NotImplementedError

    def pmd_to_pte(self, pmd: U64) -> U64:
        """A PMD leaf seen as a PTE of its first page (so the pte_* helpers apply)."""
        raise NotImplementedError

    def pte_to_pmd(self, pte: U64) -> U64:
        """Mirrors: pmd_mkhuge: the leaf PMD with the attributes of ``pte``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- generic helpers
    def ptep_get(self, store: U64, idx: I64, ops: Ops, items: Any = None) -> U64:
        """Mirrors: include/linux/pgtable.h ptep_get (READ_ONCE)."""
        ops.add("pte_reads", 1 if items is not None else len(idx), items)
        return store[idx]

    def ptep_get_lockless(self, store: U64, idx: I64, ops: Ops, items: Any = None) -> U64:
        """Mirrors: include/linux/pgtable.h ptep_get_lockless (GUP-fast's read, no PTL)."""
        return self.ptep_get(store, idx, ops, items)

    def ptep_test_and_clear_young(self, mm: Any, store: U64, idx: I64, ops: Ops,
                                  items: Any = None) -> NDArray[np.bool_]:
        """Mirrors: ptep_test_and_clear_young: clear the access flag, say whether it was set
        (an atomic per entry)."""
        old = store[idx]
        young = self.pte_young(old)
        store[idx] = np.where(young, self.pte_mkold(old), old)
        ops.add("pte_atomics", len(idx) if items is None else 1, items)
        return young  # type: ignore[no-any-return]

    def ptep_clear_flush_young(self, mm: Any, store: U64, idx: I64, ops: Ops,
                               items: Any = None) -> NDArray[np.bool_]:
        """Mirrors: ptep_clear_flush_young: test-and-clear, then flush the pages that were
        young."""
        young = self.ptep_test_and_clear_young(mm, store, idx, ops, items)
        self.flush_tlb_pages(mm, int(young.sum()), ops)
        return young

    def ptep_get_reads(self, vals: U64) -> I64 | None:
        """Entry loads a copy loop makes per entry it reads with ptep_get and
        folio_pte_batch (None: one each, as here).  A layer whose ptep_get gathers over
        several entries without a batch hint to skip them (arm64 contpte before its batch
        APIs) reads more."""
        return None

    def pte_batch_hint(self, store: U64, idx: I64, pte: U64) -> I64:
        """Mirrors: include/linux/pgtable.h pte_batch_hint (1 unless overridden)."""
        return np.ones(len(idx), dtype=np.int64)

    def set_ptes(self, mm: Any, store: U64, start: I64 | Rows, pte: U64, nr: I64, ops: Ops,
                 items: Any = None, expanded: tuple[I64 | Rows, I64 | None] | None = None,
                 values: U64 | None = None) -> None:
        """Mirrors: include/linux/pgtable.h set_ptes: nr stores, advancing the PFN.

        Contract as the kernel's: for nr > 1 the targets are not present and map one folio.
        ``expanded`` may pass the runs' flat indices and offsets when the caller has them,
        ``values`` every entry the runs write (``pte`` advanced along each run);
        ``start`` may be whole :class:`~mmuemu.runs.Rows` when every run is one entry.
        """
        if isinstance(start, Rows):
            start.put(store, pte)
        elif values is None and int(nr.sum()) == len(nr) and bool((nr == 1).all()):
            store[start] = pte  # all single entries: no PFN to advance
        else:
            flat, off = expanded if expanded is not None else expand_runs(start, nr)
            if values is None:
                if off is None:
                    off = expand_runs(start, nr)[1]
                values = self.pte_advance_pfn(np.repeat(pte, nr), off)
            if isinstance(flat, Rows):
                flat.put(store, values)
            else:
                store[flat] = values
        ops.add("pte_writes", nr, items)

    def wrprotect_ptes(self, mm: Any, store: U64, start: I64 | Rows, nr: I64, ops: Ops,
                       items: Any = None, expanded: I64 | Rows | None = None) -> None:
        """Mirrors: include/linux/pgtable.h wrprotect_ptes: a loop of ptep_set_wrprotect.

        ``expanded`` may pass the runs' entries (flat indices or whole rows) when the caller
        has them; ``start`` may be whole :class:`~mmuemu.runs.Rows` when every run is one
        entry (``expanded`` is then required).
        """
        if expanded is None:
            assert not isinstance(start, Rows), "whole rows need expanded"
            flat: I64 | Rows = expand_runs(start, nr)[0]
        else:
            flat = expanded
        if isinstance(flat, Rows):
            flat.put(store, self.pte_wrprotect(flat.get(store)))
        else:
            self._set_wrprotect(store, flat)
        ops.add("ptes_wrprotected", nr, items)
        ops.add("pte_atomics", nr, items)

    def ptep_set_wrprotect(self, mm: Any, store: U64, idx: I64, ops: Ops, items: Any = None) -> None:
        """Mirrors: ptep_set_wrprotect (wrprotect_ptes with nr == 1)."""
        self.wrprotect_ptes(mm, store, idx, np.ones(len(idx), dtype=np.int64), ops, items)

    def _set_wrprotect(self, store: U64, flat: I64) -> None:
        store[flat] = self.pte_wrprotect(store[flat])

    def get_and_clear_full_ptes(self, mm: Any, store: U64, start: I64 | Rows | slice, nr: I64, full: bool,
                                ops: Ops, items: Any = None, expanded: Sel | None = None) -> U64:
        """Mirrors: include/linux/pgtable.h get_and_clear_full_ptes.

        Returns, per run, the first entry with the dirty and young bits of all its entries
        ORed in.  ``start`` may be whole :class:`~mmuemu.runs.Rows` or a slice of the store
        when every run is one entry; ``expanded`` may pass the runs' entries (flat indices,
        whole rows or a slice) when the caller has them.
        """
        off = None
        if isinstance(start, Rows | slice):
            sel: Sel = start
        elif expanded is not None:
            sel = expanded
        else:
            sel, off = expand_runs(start, nr)
        old = sel_take(store, sel)
        sel_clear(store, sel)
        self._count_clears(nr, full, ops, items)
        if len(old) == len(nr) and (isinstance(start, Rows | slice) or bool((nr == 1).all())):
            return old  # every run one entry: nothing to gather
        if off is None:
            off = run_offsets(nr, len(old))
        return self._gather_young_dirty(old, off, nr)

    def clear_full_ptes(self, mm: Any, store: U64, start: I64 | Rows | slice, nr: I64, full: bool, ops: Ops,
                        items: Any = None, expanded: Sel | None = None) -> None:
        """Mirrors: include/linux/pgtable.h clear_full_ptes (a loop of
        ptep_get_and_clear_full).  ``start`` and ``expanded`` as for
        :meth:`get_and_clear_full_ptes`."""
        if isinstance(start, Rows | slice):
            sel: Sel = start
        else:
            sel = expanded if expanded is not None else expand_runs(start, nr)[0]
        sel_clear(store, sel)
        self._count_clears(nr, full, ops, items)

    def _count_clears(self, nr: I64, full: bool, ops: Ops, items: Any) -> None:
        """The clears of get_and_clear_full_ptes / clear_full_ptes: one per entry, each an
        atomic exchange unless the mm is dying and the arch clears with a plain store."""
        ops.add("pte_clears", nr, items)
        if not (full and self.plain_clear_full):  # ptep_get_and_clear: an atomic exchange
            ops.add("pte_atomics", nr, items)

    def _gather_young_dirty(self, old: U64, off: I64, nr: I64) -> U64:
        first_pos = np.flatnonzero(off == 0)
        first = old[first_pos].copy()
        if len(old) == len(first):
            return first
        run = np.repeat(np.arange(len(nr)), nr)
        dirty = np.zeros(len(nr), dtype=bool)
        young = np.zeros(len(nr), dtype=bool)
        np.logical_or.at(dirty, run, self.pte_dirty(old))
        np.logical_or.at(young, run, self.pte_young(old))
        first = np.where(dirty, self.pte_mkdirty(first), first)
        return np.where(young, self.pte_mkyoung(first), first)

    def ptep_get_and_clear(self, mm: Any, store: U64, idx: I64, ops: Ops, items: Any = None) -> U64:
        """Mirrors: ptep_get_and_clear (an atomic exchange with 0)."""
        old = store[idx].copy()
        store[idx] = 0
        ops.add("pte_clears", len(idx), items)
        ops.add("pte_atomics", len(idx), items)
        return old

    def ptep_set_access_flags(self, mm: Any, store: U64, idx: I64, entry: U64, ops: Ops,
                              items: Any = None, dirty: bool = True) -> None:
        """Mirrors: ptep_set_access_flags: widen young/dirty/write on a present entry
        (``dirty``: the fault was a write)."""
        store[idx] = entry
        ops.add("pte_writes", len(idx), items)

    def modify_prot_ptes(self, mm: Any, store: U64, idx: I64, prot: int, writable: NDArray[np.bool_],
                         ops: Ops) -> None:
        """Mirrors: mm/mprotect.c change_pte_range's per-entry
        ptep_modify_prot_start / pte_modify / ptep_modify_prot_commit."""
        old = self.ptep_get_and_clear(mm, store, idx, ops)
        new = self.pte_modify(old, prot)
        new = np.where(writable, self.pte_mkwrite(new), new)
        store[idx] = new
        ops.add("pte_writes", len(idx))

    # ---------------------------------------------------------------- TLB maintenance
    def flush_tlb_mm(self, mm: Any, ops: Ops, cpu: int = 0) -> None:
        """Mirrors: flush_tlb_mm (backends override)."""
        ops.add("tlb_flush_mm", 1)
        self.note_flush(mm, ops)

    def flush_tlb_range(self, mm: Any, start: int, end: int, ops: Ops, cpu: int = 0,
                        stride_shift: int | None = None) -> None:
        """Mirrors: flush_tlb_range (backends override); ``stride_shift`` is the page size
        of the entries flushed (PMD_SHIFT when only PMD leaves were cleared)."""
        ops.add("tlb_flush_range", 1)
        self.note_flush(mm, ops, start, end)

    @staticmethod
    def note_flush(mm: Any, ops: Ops, start: int = 0, end: int | None = None) -> None:
        """Record what a flush invalidates, for runners that model TLBs (no cost)."""
        from mmuemu.mm.work import TlbFlush

        if mm is not None:
            ops.flushes.append(TlbFlush(mm.id, start, end))

    def flush_tlb_pages(self, mm: Any, n: int, ops: Ops, cpu: int = 0) -> None:
        """``n`` separate flush_tlb_page calls (one per COW-copied page), counted at once:
        what one call does, times ``n``."""
        if n:
            from mmuemu.mm.work import Ops as _Ops

            one = _Ops()
            self.flush_tlb_page(mm, 0, one, cpu)
            for name, c in one.totals.items():
                ops.add(name, c * n)

    def flush_tlb_page(self, mm: Any, addr: int, ops: Ops, cpu: int = 0) -> None:
        """Mirrors: flush_tlb_page."""
        self.flush_tlb_range(mm, addr, addr + self.page_size, ops, cpu)  # a single page

    # ---------------------------------------------------------------- decoding for humans
    def describe(self, pte: int) -> dict[str, Any]:
        """Decode one entry into the fields of :class:`mmuemu.PteInfo`."""
        v = np.array([pte], dtype=np.uint64)
        present = bool(self.pte_present(v)[0])
        return {
            "present": present,
            "pfn": int(self.pte_pfn(v)[0]) if pte else 0,
            "write": bool(self.pte_write(v)[0]),
            "dirty": bool(self.pte_dirty(v)[0]),
            "young": bool(self.pte_young(v)[0]),
            "cont": bool(self.pte_cont(v)[0]),
            "special": bool(self.pte_special(v)[0]),
            "uffd_wp": bool(self.pte_uffd_wp(v)[0]),
            "soft_dirty": bool(self.pte_soft_dirty(v)[0]),
            "raw": int(pte),
        }
