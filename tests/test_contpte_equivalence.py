"""Every contpte override leaves the logical state the generic loops leave on plain arm64.

For random runs (straddling 64K blocks and ending anywhere), each helper is applied to a
page-table store on :class:`Arm64Contpte` and to a copy without CONT bits on plain
:class:`Arm64`.  The entries must then agree once CONT is dropped and young/dirty are set
aside (contpte gathers them over a block, the raw layer keeps them per entry); so must what
the helpers return.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mmuemu.arch.arm64 import Arm64
from mmuemu.arch.arm64_contpte import Arm64Contpte
from mmuemu.arch.base import Prot
from mmuemu.mm.work import Ops

N = 4 * 512  # four page tables
CONT = np.uint64(1 << 52)
PFN0 = 1 << 12  # the store maps pfn PFN0 + i at entry i (one big, aligned folio)

plain, cont = Arm64(), Arm64Contpte()
RW = plain.vm_get_page_prot(Prot(True, True, False, False))
RO = plain.vm_get_page_prot(Prot(True, False, False, False))


def _logical(a: Arm64, v: np.ndarray) -> np.ndarray:
    """What must agree: the entry without CONT, young and dirty (RDONLY is the inverse of
    hardware dirty on writable entries, so mkclean normalises it too)."""
    v = np.asarray(v, dtype=np.uint64) & ~CONT
    live = v != 0
    out = v.copy()
    out[live] = a.pte_mkclean(a.pte_mkold(v[live]))
    return out


@st.composite
def runs(draw: st.DrawFn, lo: int = 0, hi: int = N, max_runs: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint runs (start, nr) inside [lo, hi), in order, any alignment."""
    cuts = sorted(set(draw(st.lists(st.integers(lo, hi), min_size=2, max_size=2 * max_runs))))
    pairs = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if b > a]
    starts = np.array([a for a, _ in pairs], dtype=np.int64)
    nrs = np.array([b - a for a, b in pairs], dtype=np.int64)
    return starts, nrs


def _populated(layout: tuple[np.ndarray, np.ndarray], prot: int) -> tuple[np.ndarray, np.ndarray]:
    """The same mapping set by each layer's set_ptes over ``layout`` (runs over none
    entries, as the contract wants): contpte marks the whole aligned blocks CONT."""
    starts, nrs = layout
    stores = []
    for a in (plain, cont):
        s = np.zeros(N, dtype=np.uint64)
        if len(starts):
            pte = a.pte_mkdirty(a.pfn_pte(PFN0 + starts, prot))
            a.set_ptes(None, s, starts, pte, nrs, Ops(max(1, len(starts))), np.arange(len(starts)))
        stores.append(s)
    return stores[0], stores[1]


def _mapped_runs(store: np.ndarray, ops: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The runs whose entries are all mapped (the helpers' contract)."""
    keep = np.array([bool((store[a : a + b] != 0).all()) for a, b in zip(*ops, strict=True)], dtype=bool)
    return ops[0][keep], ops[1][keep]


def _agree(p: np.ndarray, c: np.ndarray) -> None:
    assert np.array_equal(_logical(plain, p), _logical(cont, c))


LAYOUT = runs(max_runs=6)
SETTINGS = settings(max_examples=150, deadline=None)


@SETTINGS
@given(layout=LAYOUT)
def test_set_ptes(layout: tuple[np.ndarray, np.ndarray]) -> None:
    p, c = _populated(layout, RW)
    _agree(p, c)
    blocks = c.reshape(-1, 16)
    marked = (blocks & CONT) != 0
    assert (marked.all(axis=1) | ~marked.any(axis=1)).all()  # whole blocks only


@SETTINGS
@given(layout=LAYOUT, ops=runs())
def test_wrprotect_ptes(layout: tuple[np.ndarray, np.ndarray], ops: tuple[np.ndarray, np.ndarray]) -> None:
    p, c = _populated(layout, RW)
    s, n = _mapped_runs(p, ops)
    if not len(s):
        return
    plain.wrprotect_ptes(None, p, s, n, Ops(len(s)), np.arange(len(s)))
    cont.wrprotect_ptes(None, c, s, n, Ops(len(s)), np.arange(len(s)))
    _agree(p, c)
    for a, b in zip(s.tolist(), (s + n).tolist(), strict=True):  # the runs are write-protected
        assert not plain.pte_write(p[a:b]).any() and not cont.pte_write(c[a:b]).any()


@SETTINGS
@given(layout=LAYOUT, ops=runs(), full=st.booleans())
def test_get_and_clear_full_ptes(layout: tuple[np.ndarray, np.ndarray], ops: tuple[np.ndarray, np.ndarray],
                                 full: bool) -> None:
    p, c = _populated(layout, RW)
    s, n = _mapped_runs(p, ops)
    if not len(s):
        return
    rp = plain.get_and_clear_full_ptes(None, p, s, n, full, Ops(len(s)), np.arange(len(s)))
    rc = cont.get_and_clear_full_ptes(None, c, s, n, full, Ops(len(s)), np.arange(len(s)))
    _agree(p, c)
    assert np.array_equal(_logical(plain, rp), _logical(cont, rc))
    # what the kernel ORs together: a run reads dirty if any of its entries was
    assert np.array_equal(plain.pte_dirty(rp), cont.pte_dirty(rc))


@SETTINGS
@given(layout=LAYOUT, picks=st.lists(st.integers(0, N - 1), min_size=1, max_size=20, unique=True))
def test_ptep_get_and_clear(layout: tuple[np.ndarray, np.ndarray], picks: list[int]) -> None:
    p, c = _populated(layout, RW)
    idx = np.array(sorted(i for i in picks if p[i] != 0), dtype=np.int64)
    if not len(idx):
        return
    rp = plain.ptep_get_and_clear(None, p, idx, Ops())
    rc = cont.ptep_get_and_clear(None, c, idx, Ops())
    _agree(p, c)
    assert np.array_equal(_logical(plain, rp), _logical(cont, rc))


@SETTINGS
@given(layout=LAYOUT, picks=st.lists(st.integers(0, N - 1), min_size=1, max_size=40, unique=True),
       writable=st.booleans())
def test_modify_prot_ptes(layout: tuple[np.ndarray, np.ndarray], picks: list[int], writable: bool) -> None:
    p, c = _populated(layout, RW)
    idx = np.array(sorted(i for i in picks if p[i] != 0), dtype=np.int64)
    if not len(idx):
        return
    w = np.full(len(idx), writable)
    plain.modify_prot_ptes(None, p, idx, RO, w, Ops())
    cont.modify_prot_ptes(None, c, idx, RO, w, Ops())
    _agree(p, c)
    blocks = c.reshape(-1, 16)
    marked = (blocks & CONT) != 0
    assert (marked.all(axis=1) | ~marked.any(axis=1)).all()


@SETTINGS
@given(layout=LAYOUT, ops=runs(), full=st.booleans())
def test_clear_full_ptes(layout: tuple[np.ndarray, np.ndarray], ops: tuple[np.ndarray, np.ndarray],
                         full: bool) -> None:
    p, c = _populated(layout, RW)
    s, n = _mapped_runs(p, ops)
    if not len(s):
        return
    plain.clear_full_ptes(None, p, s, n, full, Ops(len(s)), np.arange(len(s)))
    cont.clear_full_ptes(None, c, s, n, full, Ops(len(s)), np.arange(len(s)))
    _agree(p, c)
    blocks = c.reshape(-1, 16)
    marked = (blocks & CONT) != 0
    assert (marked.all(axis=1) | ~marked.any(axis=1)).all()


@SETTINGS
@given(layout=LAYOUT, picks=st.lists(st.integers(0, N - 1), min_size=1, max_size=20, unique=True),
       write=st.booleans())
def test_ptep_set_access_flags(layout: tuple[np.ndarray, np.ndarray], picks: list[int], write: bool) -> None:
    """A fault's fix-up (young, and dirty and writable on a write) on read-only entries."""
    p, c = _populated(layout, RO)
    idx = np.array(sorted(i for i in picks if p[i] != 0), dtype=np.int64)
    if not len(idx):
        return
    for a, store in ((plain, p), (cont, c)):
        entry = a.pte_mkyoung(store[idx] & ~CONT)
        if write:
            entry = a.pte_mkwrite(a.pte_mkdirty(entry))
        a.ptep_set_access_flags(None, store, idx, entry, Ops(), dirty=write)
    _agree(p, c)
    assert np.array_equal(plain.pte_write(p[idx]), cont.pte_write(c[idx]))
