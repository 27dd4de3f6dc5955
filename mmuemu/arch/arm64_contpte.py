"""arm64 with the contpte layer (CONFIG_ARM64_CONTPTE, v6.9): 64 KiB blocks of 16 PTEs.

The public ptep API of ``arch/arm64/include/asm/pgtable.h`` wraps the plain ``__`` helpers of
:class:`~mmuemu.arch.arm64.Arm64` and keeps PTE_CONT (bit 52) right on user mappings: the
contiguous bit is private to this layer, stripped from what callers set and set again on
every whole, VA- and PA-aligned 16-entry block that ``set_ptes`` writes in one call.  An
operation that would leave a block non-uniform first *unfolds* it (``contpte_convert``:
break-before-make, 16 atomic clears, a block TLB invalidation, 16 stores); with
``contpte_fold`` the last entry written in an aligned block may *fold* it again (v6.9's
auto-fold).

Every helper works on many runs at once (see :mod:`mmuemu.arch.base`); blocks are found and
converted as arrays, never one by one.  When several runs of one call touch the same block,
the first one in call order is the one the kernel's loop would have unfolded it in, and
the conversion is counted against that run's item.

Machine options, on top of :class:`Arm64`'s: ``contpte_batch_apis`` (default true; false is
the series' "contpte-basic" stage: ``wrprotect_ptes`` and the clear helpers are the generic
per-PTE loops over the nr == 1 paths, so every block a parent wrprotect touches unfolds;
``set_ptes`` keeps contpte_set_ptes, which predates those batch APIs), ``contpte_fold``
(default false: v6.9's auto-fold in ``set_ptes`` with nr == 1) and ``bbml2``
(BBML2_NOABORT, v6.17: contpte_convert issues no TLBI).

Folding must check that one large folio covers the block, which needs the machine's
physical memory: the Machine gives it through :meth:`Arm64Contpte.attach`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from mmuemu.arch.arm64 import ADDR_MASK, CONT, VALID, Arm64
from mmuemu.arch.base import I64, U64
from mmuemu.errors import InvalidArgument
from mmuemu.runs import Rows, Sel, expand_runs, flat_index, sel_view

if TYPE_CHECKING:
    from mmuemu.mm.work import Ops

__all__ = ["Arm64Contpte"]

CONT_PTES = 16
_MASK = CONT_PTES - 1
_OFFS = np.arange(CONT_PTES, dtype=np.int64)
_VALID_CONT = VALID | CONT
#: the low PFN bits that a block's first page must have clear (PA alignment of the block)
_PFN_LOW = np.uint64(_MASK << 12)
B = NDArray[np.bool_]


def _valid_cont(pte: U64) -> B:
    """Mirrors: arch/arm64/include/asm/pgtable.h pte_valid_cont."""
    return (np.asarray(pte, dtype=np.uint64) & _VALID_CONT) == _VALID_CONT  # type: ignore[no-any-return]


def _item_sel(items: Any, runs: I64) -> Any:
    """The items the given runs belong to (None: everything is item 0)."""
    if items is None:
        return None
    from mmuemu.mm.work import ALL

    if items is ALL:
        return runs
    return np.asarray(items)[runs]


def _count(ops: Ops, name: str, per: int, sel: Any, n: int) -> None:
    """``per`` operations for each of ``n`` blocks, attributed to ``sel`` (one per block)."""
    if not n or not per:
        return
    if sel is None:
        ops.add(name, per * n)
    else:
        ops.add(name, per, sel)


def _runs(start: I64 | Rows | slice, nr: I64) -> tuple[I64, I64]:
    """Run starts and lengths as arrays (whole rows or a slice: every entry a run of one)."""
    if isinstance(start, Rows | slice):
        s = flat_index(start)
        return s, np.ones(len(s), dtype=np.int64)
    return np.asarray(start, dtype=np.int64), np.asarray(nr, dtype=np.int64)


class Arm64Contpte(Arm64):
    """The arm64 backend with CONFIG_ARM64_CONTPTE=y (arch/arm64/mm/contpte.c)."""

    #: the options only this layer understands (plain arm64 rejects them)
    contpte_options: ClassVar[tuple[str, ...]] = ("bbml2", "contpte_batch_apis", "contpte_fold")
    allowed_options: ClassVar[tuple[str, ...]] = (*Arm64.allowed_options, *contpte_options)
    #: the options only this layer understands (plain arm64 rejects them)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.contpte_batch_apis: bool = bool(options.get("contpte_batch_apis", True))
        self.contpte_fold: bool = bool(options.get("contpte_fold", False))
        self.bbml2: bool = bool(options.get("bbml2", False))
        #: physical memory, for the folio check of a fold (see :meth:`attach`)
        self.phys: Any = None

    def attach(self, phys: Any) -> None:
        """Give the layer the machine's physical memory (``PhysMem``): folding checks that
        one large folio covers the block, as __contpte_try_fold does with page_folio."""
        self.phys = phys

    def _need_phys(self) -> None:
        if self.phys is None:
            raise InvalidArgument("contpte_fold needs the machine's physical memory to find "
                                  "folios: attach(kernel.phys) first (a Machine does)")

    # ------------------------------------------------------------ break-before-make
    def contpte_convert(self, store: U64, bstart: I64, pte: U64, ops: Ops, sel: Any,
                        fold: bool) -> None:
        """Mirrors: arch/arm64/mm/contpte.c contpte_convert, for many blocks at once.

        ``bstart``: each block's first flat index; ``pte``: per block, the entry whose
        protection the block takes (with PTE_CONT for a fold, without for an unfold).
        Every entry is cleared atomically, dirty and young are ORed over the block, the
        block's TLB entries are invalidated (unless ``bbml2``) and the 16 entries stored.
        """
        n = len(bstart)
        if not n:
            return
        blk = bstart[:, None] + _OFFS[None, :]
        old = store[blk]
        dirty: B = np.any(self.pte_dirty(old), axis=1)[:, None]
        young: B = np.any(self.pte_young(old), axis=1)[:, None]
        pfn0 = self.pte_pfn(pte) & ~np.int64(_MASK)
        new = self.pfn_pte(pfn0[:, None] + _OFFS[None, :], 0) | (pte & ~ADDR_MASK)[:, None]
        new = np.where(dirty, self.pte_mkdirty(new), new)
        new = np.where(young, self.pte_mkyoung(new), new)
        store[blk] = new
        _count(ops, "pte_atomics", CONT_PTES, sel, n)  # __ptep_get_and_clear: xchg
        _count(ops, "pte_writes", CONT_PTES, sel, n)  # __set_ptes
        if not self.bbml2:  # __flush_tlb_range(start, start + 64K, PAGE_SIZE, true, 3)
            tlbis = self.range_tlbis(0, CONT_PTES << self.page_shift)
            assert tlbis is not None
            _count(ops, "tlb_flush_range", 1, sel, n)
            _count(ops, "tlbi_ops", 2 * tlbis if self.kpti else tlbis, sel, n)
        _count(ops, "contpte_folds" if fold else "contpte_unfolds", 1, sel, n)

    def _unfold(self, store: U64, flat: I64, run: I64, ops: Ops, items: Any) -> None:
        """Mirrors: contpte_try_unfold / __contpte_try_unfold at each entry of ``flat`` (in
        call order; ``run`` says which run each belongs to): a valid+CONT entry unfolds
        its block, the first time the block is met."""
        if not len(flat):
            return
        hit = _valid_cont(store[flat])
        if not hit.any():
            return
        flat, run = flat[hit], run[hit]
        blocks, first = np.unique(flat & ~np.int64(_MASK), return_index=True)
        trig = flat[first]
        self.contpte_convert(store, blocks, self.pte_mknoncont(store[trig]), ops,
                             _item_sel(items, run[first]), fold=False)

    def _unfold_runs(self, store: U64, starts: I64, nr: I64, ops: Ops, items: Any,
                     batched: bool, expanded: Sel | None = None) -> None:
        """The unfolds before a batch operation over runs: with the batch APIs, nr == 1
        runs unfold their block and longer runs only their partially covered edge blocks
        (contpte_try_unfold_partial); without, every entry is an nr == 1 call
        (``expanded``: the runs' entries, when the caller has them)."""
        if not len(starts):
            return
        if not batched:
            flat = flat_index(expanded) if expanded is not None else expand_runs(starts, nr)[0]
            run = np.repeat(np.arange(len(nr), dtype=np.int64), nr)
            self._unfold(store, flat, run, ops, items)
            return
        runs = np.arange(len(starts), dtype=np.int64)
        ends = starts + nr
        head = ((starts & _MASK) != 0) | (nr < CONT_PTES)  # nr == 1 included
        tail = (nr > 1) & ((ends & _MASK) != 0)
        if not tail.any():  # only run heads: already in call order
            self._unfold(store, starts[head], runs[head], ops, items)
            return
        flat = np.concatenate([starts[head], ends[tail] - 1])
        run = np.concatenate([runs[head], runs[tail]])
        order = np.argsort(2 * run + np.concatenate([np.zeros(int(head.sum()), np.int64),
                                                     np.ones(int(tail.sum()), np.int64)]),
                           kind="stable")
        self._unfold(store, flat[order], run[order], ops, items)

    def _unfold_for_clear(self, store: U64, start: I64 | Rows | slice, nr: I64, ops: Ops, items: Any,
                          expanded: Sel | None) -> None:
        """Mirrors: the unfolds of contpte.c contpte_get_and_clear_full_ptes /
        contpte_clear_full_ptes (whole rows or a slice: every entry is an nr == 1 run, which
        unfolds a CONT entry's block; read once, and only then searched)."""
        if isinstance(start, Rows | slice):
            if bool((sel_view(store, start) & CONT).any()):
                flat = flat_index(start)
                self._unfold(store, flat, np.arange(len(flat), dtype=np.int64), ops, items)
            return
        starts, nrs = _runs(start, nr)
        self._unfold_runs(store, starts, nrs, ops, items, self.contpte_batch_apis, expanded)

    def _try_fold(self, store: U64, flat: I64, pte: U64, ops: Ops, sel: Any) -> None:
        """Mirrors: contpte_try_fold / __contpte_try_fold after a set_ptes of nr == 1 at
        ``flat``: tried only on the last entry of a VA- and PA-aligned block with a valid,
        non-special entry; folds when one large folio covers the block and all 16 entries,
        made old and clean, are the block's pages with one protection."""
        pfn = self.pte_pfn(pte)
        cand = (((flat & _MASK) == _MASK) & ((pfn & _MASK) == _MASK)
                & ((pte & VALID) != 0) & ~self.pte_special(pte))
        if not cand.any():
            return
        ci = np.flatnonzero(cand)
        last, p = flat[ci], pte[ci]
        pfn0 = pfn[ci] - _MASK
        heads = self.phys.head[pfn0]
        ok = (heads == self.phys.head[pfn0 + _MASK]) & (self.phys.order[heads] > 0)
        bstart = last - _MASK
        blk = store[bstart[:, None] + _OFFS[None, :]]
        want = self.pfn_pte(pfn0[:, None] + _OFFS[None, :], 0) | (p & ~ADDR_MASK)[:, None]
        same = self.pte_mkold(self.pte_mkclean(blk)) == self.pte_mkold(self.pte_mkclean(want))
        ok &= same.all(axis=1)
        if ok.any():
            fsel = None if sel is None else np.asarray(sel)[ci[ok]]
            self.contpte_convert(store, bstart[ok], self.pte_mkcont(p[ok]), ops, fsel, fold=True)

    # ------------------------------------------------------------ setters
    def set_ptes(self, mm: Any, store: U64, start: I64 | Rows, pte: U64, nr: I64, ops: Ops,
                 items: Any = None, expanded: tuple[I64 | Rows, I64 | None] | None = None,
                 values: U64 | None = None) -> None:
        """Mirrors: arch/arm64/include/asm/pgtable.h set_ptes and arch/arm64/mm/contpte.c
        contpte_set_ptes.

        PTE_CONT is stripped from the input.  nr == 1: unfold the old entry's block if it
        was valid+CONT, store, then (``contpte_fold``) try to fold.  nr > 1: store, with
        PTE_CONT on every whole block whose start VA, end VA and start PA are 64K-aligned;
        no TLBI (the targets were not present).
        """
        pte = np.asarray(pte, dtype=np.uint64) & ~CONT
        if (values is not None and expanded is not None and isinstance(expanded[0], Rows)
                and len(nr) and bool((nr > 1).all())):
            # whole tables, in order, written by runs of several entries (a fork's copy of
            # large folios): mark the whole, PA-aligned blocks in the values
            values = self._mark_cont_values(values, nr)
            super().set_ptes(mm, store, start, pte, nr, ops, items, expanded, values)
            return
        if values is not None:
            values = values & ~CONT
        if isinstance(start, Rows) and not self.contpte_fold and not (start.get(store) & CONT).any():
            # whole rows of single entries over no CONT block: the plain stores
            super().set_ptes(mm, store, start, pte, nr, ops, items, expanded, values)
            return
        starts, nrs = _runs(start, nr)
        single = nrs == 1
        s_idx = np.flatnonzero(single)
        if self.contpte_fold and len(s_idx):
            self._need_phys()
        self._unfold(store, starts[s_idx], s_idx, ops, items)
        super().set_ptes(mm, store, start, pte, nr, ops, items, expanded, values)
        m_idx = np.flatnonzero(~single)
        if len(m_idx):
            self._mark_cont(store, starts[m_idx], nrs[m_idx], pte[m_idx])
        if self.contpte_fold and len(s_idx):
            if values is None:
                p1 = pte if len(s_idx) == len(pte) else pte[s_idx]
            else:  # the entries the single runs wrote
                p1 = values[s_idx if len(s_idx) == len(values) else (np.cumsum(nrs) - nrs)[s_idx]]
            self._try_fold(store, starts[s_idx], p1, ops, _item_sel(items, s_idx))

    def _mark_cont_values(self, values: U64, nr: I64) -> U64:
        """_mark_cont for ``values``, the entries of whole tables in order that runs of
        ``nr`` entries write one after the other (CONT in them is ignored): a block is whole
        when no run starts inside it, and aligned when its first page is.  Returns the
        entries to write."""
        ok = (values[::CONT_PTES] & _PFN_LOW) == 0  # the first page of each block is aligned
        if not bool(((nr & _MASK) == 0).all()):  # (else every run starts on a block)
            offs = np.cumsum(nr) - nr
            ok[offs[(offs & _MASK) != 0] // CONT_PTES] = False
        if ok.all():
            return values | CONT  # type: ignore[no-any-return]
        out = values & ~CONT
        if ok.any():
            out.reshape(-1, CONT_PTES)[...] |= np.where(ok, CONT, np.uint64(0))[:, None]
        return out  # type: ignore[no-any-return]

    def _mark_cont(self, store: U64, starts: I64, nr: I64, pte: U64) -> None:
        """The PTE_CONT half of contpte_set_ptes: whole aligned blocks of each run."""
        first = (starts + _MASK) & ~np.int64(_MASK)
        last = (starts + nr) & ~np.int64(_MASK)
        nb = np.maximum(last - first, 0) // CONT_PTES
        nb[((self.pte_pfn(pte) - starts) & _MASK) != 0] = 0  # PA not aligned like VA
        if not nb.any():
            return
        blocks = expand_runs(first // CONT_PTES, nb)[0] * CONT_PTES
        flat = (blocks[:, None] + _OFFS[None, :]).ravel()
        store[flat] = self.pte_mkcont(store[flat])

    def wrprotect_ptes(self, mm: Any, store: U64, start: I64 | Rows, nr: I64, ops: Ops,
                       items: Any = None, expanded: I64 | Rows | None = None) -> None:
        """Mirrors: arch/arm64/include/asm/pgtable.h wrprotect_ptes and contpte.c
        contpte_wrprotect_ptes.

        nr == 1: a valid+CONT entry unfolds its whole block, then is write-protected.
        nr > 1: only partially covered edge blocks unfold; whole blocks keep PTE_CONT (they
        stay uniform; the caller's later TLB flush covers them).  Without the batch APIs
        every entry takes the nr == 1 path.
        """
        if self.contpte_batch_apis and not isinstance(start, Rows):
            # only nr == 1 runs and the edges of longer ones are read
            self._unfold_runs(store, *_runs(start, nr), ops, items, True)
        else:
            if isinstance(expanded, Rows):
                vals = expanded.get(store)
            elif expanded is not None:
                vals = store[expanded]
            else:
                vals = store[expand_runs(*_runs(start, nr))[0]]
            if bool((vals & CONT).any()):
                self._unfold_runs(store, *_runs(start, nr), ops, items, self.contpte_batch_apis)
        super().wrprotect_ptes(mm, store, start, nr, ops, items, expanded)

    def ptep_set_wrprotect(self, mm: Any, store: U64, idx: I64, ops: Ops, items: Any = None) -> None:
        """Mirrors: arch/arm64/include/asm/pgtable.h ptep_set_wrprotect (wrprotect_ptes
        with nr == 1: a CONT entry unfolds its block first)."""
        self.wrprotect_ptes(mm, store, idx, np.ones(len(idx), dtype=np.int64), ops, items)

    # ------------------------------------------------------------ clears
    def get_and_clear_full_ptes(self, mm: Any, store: U64, start: I64 | Rows | slice, nr: I64, full: bool,
                                ops: Ops, items: Any = None, expanded: Sel | None = None) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h get_and_clear_full_ptes and contpte.c
        contpte_get_and_clear_full_ptes: nr == 1 unfolds, nr > 1 unfolds partially covered
        edge blocks; then one xchg per entry, dirty and young ORed into the result."""
        self._unfold_for_clear(store, start, nr, ops, items, expanded)
        return super().get_and_clear_full_ptes(mm, store, start, nr, full, ops, items, expanded)

    def clear_full_ptes(self, mm: Any, store: U64, start: I64 | Rows | slice, nr: I64, full: bool, ops: Ops,
                        items: Any = None, expanded: Sel | None = None) -> None:
        """Mirrors: arch/arm64/include/asm/pgtable.h clear_full_ptes and contpte.c
        contpte_clear_full_ptes (unfolds as get_and_clear_full_ptes)."""
        self._unfold_for_clear(store, start, nr, ops, items, expanded)
        super().clear_full_ptes(mm, store, start, nr, full, ops, items, expanded)

    def ptep_get_and_clear(self, mm: Any, store: U64, idx: I64, ops: Ops, items: Any = None) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h ptep_get_and_clear: always unfold a
        CONT entry's block first, then the plain xchg."""
        idx = np.asarray(idx, dtype=np.int64)
        self._unfold(store, idx, np.arange(len(idx), dtype=np.int64), ops, items)
        return super().ptep_get_and_clear(mm, store, idx, ops, items)

    def modify_prot_ptes(self, mm: Any, store: U64, idx: I64, prot: int, writable: B,
                         ops: Ops) -> None:
        """Mirrors: arch/arm64/mm/mmu.c ptep_modify_prot_start / ptep_modify_prot_commit
        (ptep_get_and_clear, which unfolds, then set_pte_at = set_ptes with nr == 1, which
        may fold the block again when its last entry is written)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.contpte_fold:
            self._need_phys()
        old = self.ptep_get_and_clear(mm, store, idx, ops)
        new = self.pte_modify(old, prot)
        new = np.where(writable, self.pte_mkwrite(new), new) & ~CONT
        store[idx] = new  # the targets were just cleared: nothing to unfold
        ops.add("pte_writes", len(idx))
        if self.contpte_fold:
            self._try_fold(store, idx, new, ops, None)

    def ptep_set_access_flags(self, mm: Any, store: U64, idx: I64, entry: U64, ops: Ops,
                              items: Any = None, dirty: bool = True) -> None:
        """Mirrors: arch/arm64/include/asm/pgtable.h ptep_set_access_flags and contpte.c
        contpte_ptep_set_access_flags.

        A CONT entry: nothing if the gathered entry already equals ``entry``; the same
        write permission: AF/dirty/write merged into all 16 entries, one block TLBI when
        ``dirty``; a write change: the block unfolds and only the entry is set.
        (``dirty`` is the kernel's argument; every core caller passes 1.)
        """
        idx = np.asarray(idx, dtype=np.int64)
        entry = np.asarray(entry, dtype=np.uint64) & ~CONT
        cont = _valid_cont(store[idx])
        if not cont.any():
            super().ptep_set_access_flags(mm, store, idx, entry, ops, items)
            return
        ci = np.flatnonzero(cont)
        orig = self.pte_mknoncont(self._gather(store, idx[ci], store[idx[ci]]))
        change = orig != entry[ci]
        wchange = change & (self.pte_write(orig) != self.pte_write(entry[ci]))
        wi = ci[wchange]
        self._unfold(store, idx[wi], wi, ops, items)
        mi = ci[change & ~wchange]
        if len(mi):
            from mmuemu.arch.arm64 import AF, DIRTY, RDONLY, WRITE

            bits = (entry[mi] & (RDONLY | AF | WRITE | DIRTY)) ^ RDONLY
            blocks, inv = np.unique(idx[mi] & ~np.int64(_MASK), return_inverse=True)
            acc = np.zeros(len(blocks), dtype=np.uint64)
            np.bitwise_or.at(acc, inv, bits)
            flat = blocks[:, None] + _OFFS[None, :]
            store[flat] = ((store[flat] ^ RDONLY) | acc[:, None]) ^ RDONLY
            first = np.unique(inv, return_index=True)[1]
            bsel = _item_sel(items, mi[first])
            _count(ops, "pte_atomics", CONT_PTES, bsel, len(blocks))
            if dirty:
                tlbis = self.range_tlbis(0, CONT_PTES << self.page_shift)
                assert tlbis is not None
                _count(ops, "tlb_flush_range", 1, bsel, len(blocks))
                _count(ops, "tlbi_ops", 2 * tlbis if self.kpti else tlbis, bsel, len(blocks))
        rest = np.flatnonzero(~cont)
        rest = np.concatenate([rest, wi])
        if len(rest):
            super().ptep_set_access_flags(mm, store, idx[rest], entry[rest], ops,
                                          _item_sel(items, rest))

    # ------------------------------------------------------------ getters
    def ptep_get(self, store: U64, idx: I64, ops: Ops, items: Any = None) -> U64:
        """Mirrors: arch/arm64/include/asm/pgtable.h ptep_get and contpte.c contpte_ptep_get:
        a valid+CONT entry gets the dirty and young bits of its whole block (v6.9 reads all
        16 entries)."""
        out = super().ptep_get(store, idx, ops, items)
        ci = np.flatnonzero(_valid_cont(out))
        if len(ci):
            out = self._gather(store, idx, out)
            _count(ops, "pte_reads", CONT_PTES, _item_sel(items, ci), len(ci))
        return out

    def ptep_get_lockless(self, store: U64, idx: I64, ops: Ops, items: Any = None) -> U64:
        """Mirrors: arch/arm64/mm/contpte.c contpte_ptep_get_lockless: a CONT entry re-reads
        its block (here the block is always consistent: no concurrent writer) and gathers
        young/dirty, as ptep_get does."""
        return self.ptep_get(store, idx, ops, items)

    def ptep_test_and_clear_young(self, mm: Any, store: U64, idx: I64, ops: Ops,
                                  items: Any = None) -> NDArray[np.bool_]:
        """Mirrors: contpte.c contpte_ptep_test_and_clear_young: a CONT entry clears the
        access flag of all 16 entries of its block (a cmpxchg each) and reports their OR;
        the block stays folded (access is tracked per folio)."""
        idx = np.asarray(idx, dtype=np.int64)
        cont = _valid_cont(store[idx])
        if not cont.any():
            return super().ptep_test_and_clear_young(mm, store, idx, ops, items)
        young = np.zeros(len(idx), dtype=bool)
        rest = np.flatnonzero(~cont)
        if len(rest):
            young[rest] = super().ptep_test_and_clear_young(mm, store, idx[rest], ops, _item_sel(items, rest))
        ci = np.flatnonzero(cont)
        starts = idx[ci] & ~np.int64(_MASK)
        _, first = np.unique(starts, return_index=True)  # a block's later entries find it old
        ci, starts = ci[np.sort(first)], starts[np.sort(first)]
        flat = starts[:, None] + _OFFS[None, :]
        blk = store[flat]
        young[ci] = self.pte_young(blk).any(axis=1)
        store[flat] = self.pte_mkold(blk)
        _count(ops, "pte_atomics", CONT_PTES, _item_sel(items, ci), len(ci))
        return young

    def ptep_clear_flush_young(self, mm: Any, store: U64, idx: I64, ops: Ops,
                               items: Any = None) -> NDArray[np.bool_]:
        """Mirrors: contpte.c contpte_ptep_clear_flush_young: the test-and-clear over the
        block, then, if it was young, a block invalidation without the trailing DSB
        (__flush_tlb_range_nosync: TLBIs counted, no tlb_flush_range wait)."""
        idx = np.asarray(idx, dtype=np.int64)
        cont = _valid_cont(store[idx])
        young = self.ptep_test_and_clear_young(mm, store, idx, ops, items)
        plain_young = int((young & ~cont).sum())
        self.flush_tlb_pages(mm, plain_young, ops)
        yc = np.flatnonzero(young & cont)
        if len(yc):
            tlbis = self.range_tlbis(0, CONT_PTES << self.page_shift)
            assert tlbis is not None
            _count(ops, "tlbi_ops", 2 * tlbis if self.kpti else tlbis, _item_sel(items, yc), len(yc))
        return young

    def _gather(self, store: U64, idx: I64, vals: U64) -> U64:
        """``vals`` (the entries at ``idx``) with, on valid+CONT ones, the dirty and young
        bits of their whole block ORed in."""
        out = np.array(vals, dtype=np.uint64)
        ci = np.flatnonzero(_valid_cont(out))
        if len(ci):
            blk = store[(np.asarray(idx)[ci] & ~np.int64(_MASK))[:, None] + _OFFS[None, :]]
            v = out[ci]
            v = np.where(self.pte_dirty(blk).any(axis=1), self.pte_mkdirty(v), v)
            out[ci] = np.where(self.pte_young(blk).any(axis=1), self.pte_mkyoung(v), v)
        return out

    def ptep_get_reads(self, vals: U64) -> I64 | None:
        """Without the batch APIs (no pte_batch_hint), every ptep_get of a valid+CONT entry
        reads its whole block: 16 loads an entry.  With them, folio_pte_batch gathers once
        per block and jumps by the hint: about one load an entry, as counted already."""
        if self.contpte_batch_apis:
            return None
        return np.where(_valid_cont(vals), CONT_PTES, 1).astype(np.int64)

    def pte_batch_hint(self, store: U64, idx: I64, pte: U64) -> I64:
        """Mirrors: arch/arm64/include/asm/pgtable.h pte_batch_hint: for a valid+CONT
        entry, the entries left in its block; else 1."""
        return np.where(_valid_cont(pte), CONT_PTES - (np.asarray(idx) & _MASK), 1).astype(np.int64)
