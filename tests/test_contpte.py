"""The arm64 contpte layer (CONFIG_ARM64_CONTPTE, v6.9): exact fold/unfold/TLBI counts.

32 MiB of 64K folios = 8192 PTEs = 512 contpte blocks in 16 page tables.
"""

from __future__ import annotations

import numpy as np
import pytest

import mmuemu
from mmuemu.arch.arm64 import Arm64
from mmuemu.arch.arm64_contpte import Arm64Contpte
from mmuemu.mm.gup import follow_range

MiB = 1 << 20
P = 4096
SIZE = 32 * MiB
PAGES = SIZE // P
BLOCKS = PAGES // 16
CONT = np.uint64(1 << 52)


def _setup(**opts: object) -> tuple[mmuemu.Machine, mmuemu.Process, int]:
    m = mmuemu.Machine(arch="arm64", contpte=True, memory="256MiB", **opts)
    p = m.spawn(name="parent")
    p.set_folio_orders([4])
    a = p.mmap(SIZE, prot="rw", align=2 * MiB)
    p.populate(a, SIZE, write=True)
    return m, p, a


def _cont(m: mmuemu.Machine, p: mmuemu.Process, a: int, n: int = SIZE) -> np.ndarray:
    """PTE_CONT of every page's raw entry."""
    _, present, vals = follow_range(m.kernel, p.mm, a, a + n)
    assert present.all()
    return (vals & CONT) != 0


def _check_blocks(m: mmuemu.Machine, p: mmuemu.Process, a: int, n: int = SIZE) -> None:
    """The contpte invariant m.check() does not know yet: a block with any CONT entry is 16
    valid CONT entries mapping 16 naturally aligned consecutive PFNs with equal attributes
    (ignoring young and dirty).  ``a`` and ``n`` must be 64K-aligned."""
    arch = m.arch
    _, _, vals = follow_range(m.kernel, p.mm, a, a + n)
    blk = vals.reshape(-1, 16)
    cont = (blk & CONT) != 0
    bad = cont.any(axis=1) & ~cont.all(axis=1)
    assert not bad.any(), f"partly CONT blocks at {np.flatnonzero(bad)}"
    c = blk[cont.all(axis=1)]
    if len(c):
        assert ((c & np.uint64(1)) != 0).all()
        pfn = arch.pte_pfn(c)
        assert (pfn[:, 0] % 16 == 0).all() and (pfn - pfn[:, :1] == np.arange(16)).all()
        attrs = arch.pte_batch_bits(c, ignore_dirty=True, ignore_soft_dirty=True)
        assert (attrs == attrs[:, :1]).all()


def test_selection_and_options() -> None:
    assert type(mmuemu.Machine(arch="arm64", memory="64MiB").arch) is Arm64
    assert type(mmuemu.Machine(arch="arm64", contpte=False, memory="64MiB").arch) is Arm64
    m = mmuemu.Machine(arch="arm64", contpte=True, memory="64MiB", kpti=True, bbml2=True)
    assert isinstance(m.arch, Arm64Contpte) and m.arch.name == "arm64"
    assert m.arch.kpti and m.arch.bbml2 and m.arch.contpte_batch_apis and not m.arch.contpte_fold
    for opt in ("contpte_fold", "bbml2", "contpte_batch_apis"):
        with pytest.raises(mmuemu.InvalidArgument, match=f"'{opt}'"):
            mmuemu.Machine(arch="arm64", memory="64MiB", **{opt: True})
    with pytest.raises(mmuemu.InvalidArgument, match="'contpte_fold'"):
        mmuemu.Machine(arch="arm64", contpte=True, memory="64MiB", contpte_fold="yes")
    with pytest.raises(mmuemu.InvalidArgument, match="'nope'"):
        mmuemu.Machine(arch="arm64", contpte=True, memory="64MiB", nope=True)
    with pytest.raises(mmuemu.InvalidArgument, match="'contpte'"):
        mmuemu.Machine(arch="arm64", contpte="yes", memory="64MiB")


def test_populate_marks_every_block() -> None:
    m, p, a = _setup()
    assert _cont(m, p, a).all()
    assert m.stats["contpte_folds"] == m.stats["contpte_unfolds"] == 0
    assert p.pte(a).cont
    m.check()


def test_batched_fork_keeps_parent_folded_and_child_cont() -> None:
    m, p, a = _setup()
    with m.measure() as t:
        c = p.fork()
    assert t.counts["contpte_unfolds"] == 0 and t.counts["contpte_folds"] == 0
    assert t.counts["tlb_flush_mm"] == 1
    assert t.counts["tlbi_ops"] == 1  # the parent's ASIDE1IS only
    assert t.counts["ptes_wrprotected"] == PAGES == t.counts["pte_atomics"]
    assert t.counts["pte_writes"] == PAGES
    assert _cont(m, p, a).all() and _cont(m, c, a).all()
    assert not p.pte(a).write and not c.pte(a).write
    _check_blocks(m, p, a)
    _check_blocks(m, c, a)
    m.check()


@pytest.mark.parametrize(("mode", "opts"), [("legacy", {}), ("batched", {"contpte_batch_apis": False})])
def test_per_pte_wrprotect_unfolds_every_parent_block(mode: str, opts: dict[str, bool]) -> None:
    """Legacy fork, or contpte-basic (no batch APIs): every parent ptep_set_wrprotect of a
    CONT entry unfolds its block (16 xchg + 16 stores + 16 VALE1IS each)."""
    m, p, a = _setup(**opts)
    with m.measure() as t:
        c = p.fork(mode=mode)
    assert t.counts["contpte_unfolds"] == BLOCKS == 512
    assert t.counts["contpte_folds"] == 0
    assert t.counts["tlbi_ops"] == BLOCKS * 16 + 1 == 8193
    assert t.counts["tlb_flush_range"] == BLOCKS
    assert t.counts["pte_atomics"] == PAGES + BLOCKS * 16 == 16384
    assert t.counts["pte_writes"] == PAGES + BLOCKS * 16 == 16384
    assert not _cont(m, p, a).any()
    # legacy: nr == 1 set_ptes never marks CONT; contpte-basic still has contpte_set_ptes
    assert (_cont(m, c, a).all() if mode == "batched" else not _cont(m, c, a).any())
    if mode == "batched":  # no pte_batch_hint: every ptep_get gathers its block (the read
        # that ends each batch included, except at the end of a table)
        tables = SIZE // (2 * MiB)
        assert t.counts["pte_reads"] == (PAGES + BLOCKS - tables) * 16
    m.check()


@pytest.mark.parametrize(("opts", "tlbi"), [
    ({"tlbi_range": True}, BLOCKS * 1 + 1),  # one RVALE1IS per block
    ({"kpti": True}, 2 * (BLOCKS * 16 + 1)),  # every TLBI twice
    ({"bbml2": True}, 1),  # no TLBI in contpte_convert
])
def test_unfold_tlbi_variants(opts: dict[str, bool], tlbi: int) -> None:
    m, p, _ = _setup(**opts)
    with m.measure() as t:
        p.fork(mode="legacy")
    assert t.counts["contpte_unfolds"] == BLOCKS
    assert t.counts["tlbi_ops"] == tlbi
    assert t.counts["tlb_flush_range"] == (0 if "bbml2" in opts else BLOCKS)
    m.check()


def test_fork_unfolds_only_edge_blocks() -> None:
    """A VMA boundary in the middle of two folios (madvise splits the VMA, PTEs untouched):
    the batches stop there, and only those two straddling blocks unfold."""
    m, p, a = _setup()
    p.madvise(a + MiB + 8 * P, MiB, "hugepage")
    with m.measure() as t:
        c = p.fork()
    assert t.counts["contpte_unfolds"] == 2
    assert t.counts["tlbi_ops"] == 2 * 16 + 1
    assert t.counts["pte_atomics"] == PAGES + 2 * 16
    edge = np.zeros(PAGES, bool)
    for b in (MiB // P, 2 * MiB // P):  # the two straddling blocks
        edge[b : b + 16] = True
    assert np.array_equal(_cont(m, p, a), ~edge)
    assert np.array_equal(_cont(m, c, a), ~edge)  # child: nr == 8 runs stay non-CONT
    _check_blocks(m, p, a)
    _check_blocks(m, c, a)
    m.check()


def test_munmap_mid_block_unfolds_edges() -> None:
    m, p, a = _setup()
    with m.measure() as t:
        p.munmap(a + 8 * P, 64 * 1024 * 2)  # [8, 40): partial blocks 0 and 2, whole block 1
    assert t.counts["contpte_unfolds"] == 2
    cont = _cont(m, p, a, 8 * P)
    assert not cont.any()
    assert not p.pte(a + 40 * P).cont and p.pte(a + 48 * P).cont
    m.check()


def test_mprotect_one_page_unfolds_its_block_only() -> None:
    m, p, a = _setup()
    with m.measure() as t:
        p.mprotect(a + 5 * P, P, "r")
    assert t.counts["contpte_unfolds"] == 1 and t.counts["contpte_folds"] == 0
    assert t.counts["pte_clears"] == 1
    assert t.counts["pte_atomics"] == 16 + 1
    assert t.counts["tlbi_ops"] == 16 + 1  # the unfold, then mprotect's one-page flush
    cont = _cont(m, p, a)
    assert not cont[:16].any() and cont[16:].all()
    # without contpte_fold, restoring leaves the block unfolded
    with m.measure() as t:
        p.mprotect(a + 5 * P, P, "rw")
    assert t.counts["contpte_folds"] == t.counts["contpte_unfolds"] == 0
    assert not _cont(m, p, a)[:16].any()
    m.check()


def test_fold_on_restored_protection() -> None:
    """v6.9 auto-fold: tried when the last entry of an aligned block is set."""
    m, p, a = _setup(contpte_fold=True)
    p.mprotect(a + 15 * P, P, "r")
    assert m.stats["contpte_unfolds"] == 1 and m.stats["contpte_folds"] == 0  # not uniform
    with m.measure() as t:
        p.mprotect(a + 15 * P, P, "rw")
    assert t.counts["contpte_folds"] == 1 and t.counts["contpte_unfolds"] == 0
    assert t.counts["tlbi_ops"] == 16 + 1
    assert _cont(m, p, a).all()
    pte = p.pte(a + 15 * P)
    assert pte.write and pte.dirty and pte.cont
    # a page that is not a block's last: set_ptes does not try to fold
    p.mprotect(a + 21 * P, P, "r")
    with m.measure() as t:
        p.mprotect(a + 21 * P, P, "rw")
    assert t.counts["contpte_folds"] == 0
    assert not _cont(m, p, a)[16:32].any()
    # the whole range: every block unfolds (one ptep_get_and_clear each) and folds again
    with m.measure() as t:
        p.mprotect(a, SIZE, "r")
    assert t.counts["contpte_unfolds"] == BLOCKS - 1 and t.counts["contpte_folds"] == BLOCKS
    assert _cont(m, p, a).all() and not p.pte(a).write
    _check_blocks(m, p, a)
    m.check()


def test_fold_never_merges_small_folios() -> None:
    m = mmuemu.Machine(arch="arm64", contpte=True, contpte_fold=True, memory="64MiB")
    p = m.spawn()
    a = p.mmap(MiB, prot="rw", align=2 * MiB)
    p.populate(a, MiB, write=True)  # order 0, physically contiguous: still no fold
    assert m.stats["contpte_folds"] == 0
    assert not _cont(m, p, a, MiB).any()
    m.check()


def test_the_machine_attaches_its_memory_and_a_bare_layer_refuses_to_fold() -> None:
    m = mmuemu.Machine(arch="arm64", contpte=True, contpte_fold=True, memory="64MiB")
    assert m.arch.phys is m.kernel.phys
    from mmuemu.arch.arm64_contpte import Arm64Contpte
    from mmuemu.mm.work import Ops

    bare = Arm64Contpte(contpte_fold=True)
    store = np.zeros(32, np.uint64)
    pte = bare.pfn_pte(np.array([15]), int(bare.vm_get_page_prot(mmuemu.arch.Prot(True, True, False, False))))
    with pytest.raises(mmuemu.InvalidArgument, match="attach"):
        bare.set_ptes(None, store, np.array([15]), pte, np.array([1]), Ops())


def test_public_api_state_stays_right() -> None:
    """fork, COW in parent and child, pins, munmap and exit on contpte."""
    m, p, a = _setup()
    c = p.fork()
    with m.measure() as t:
        p.write(a, 0xAA)  # COW copy: ptep_clear_flush unfolds the parent's block
        c.write(a + 64 * 1024, 0xBB)  # in the child's second block
    assert t.counts["cow_copies"] == 2 and t.counts["contpte_unfolds"] == 2
    assert p.read(a) == 0xAA and c.read(a) == 0 and c.read(a + 64 * 1024) == 0xBB
    assert not _cont(m, p, a)[:16].any() and _cont(m, p, a)[16:].all()
    assert not _cont(m, c, a)[16:32].any() and _cont(m, c, a)[32:].all()
    m.check()
    pin = p.pin(a + MiB, 2 * 64 * 1024, write=True)  # unshares: COW copies, unfolds
    m.check()
    c2 = p.fork()  # pinned exclusive pages are copied; their neighbours go alone
    for q in (p, c, c2):
        _check_blocks(m, q, a)
    m.check()
    pin.release()
    p.munmap(a + 3 * MiB + 4 * P, 8 * P)
    _check_blocks(m, p, a, 3 * MiB)
    m.check()
    c.exit()
    c2.exit()
    m.check()
    with m.measure() as t:
        p.munmap(a, SIZE)
    assert t.counts["contpte_unfolds"] == 0  # whole blocks clear without unfolding
    m.check()
    assert p.rss["anon"] == 0


def _block(arch: Arm64Contpte) -> np.ndarray:
    """A table pool of 32 entries: entries 16..31 one CONT block of PFNs 32..47 (read-only,
    private writable: COW), entry 20 young and dirty, the others old and clean."""
    from mmuemu.arch.base import Prot

    prot = arch.vm_get_page_prot(Prot(read=True, write=True, exec=False, shared=False))
    ptes = arch.pte_mkold(arch.pfn_pte(np.arange(32, 48, dtype=np.int64), prot))
    store = np.zeros(32, dtype=np.uint64)
    store[16:] = arch.pte_mkcont(ptes)
    store[20] = arch.pte_mkyoung(arch.pte_mkdirty(store[20:21]))[0]
    return store


def test_ptep_get_gathers_and_batch_hint() -> None:
    from mmuemu.mm.work import Ops

    arch = Arm64Contpte()
    store = _block(arch)
    ops = Ops()
    got = arch.ptep_get(store, np.array([17, 31]), ops)
    assert arch.pte_dirty(got).all() and arch.pte_young(got).all()
    assert not arch.pte_dirty(store[[17, 31]]).any()  # raw entries unchanged
    assert ops.totals["pte_reads"] == 2 + 2 * 16  # v6.9 contpte_ptep_get reads all 16
    hint = arch.pte_batch_hint(store, np.array([16, 21, 31, 3]), store[[16, 21, 31, 3]])
    assert hint.tolist() == [16, 11, 1, 1]


def test_ptep_set_access_flags_on_cont() -> None:
    from mmuemu.mm.work import Ops

    arch = Arm64Contpte()
    store = _block(arch)
    # same write permission: AF merged into all 16 entries, no unfold, one block TLBI
    ops = Ops()
    entry = arch.pte_mkyoung(arch.pte_mknoncont(store[17:18]))
    arch.ptep_set_access_flags(None, store, np.array([17]), entry, ops)
    assert arch.pte_young(store[16:]).all() and arch.pte_cont(store[16:]).all()
    assert ops.totals["pte_atomics"] == 16 and ops.totals["tlbi_ops"] == 16
    assert "contpte_unfolds" not in ops.totals
    # unchanged (gathered) entry: nothing to do
    ops = Ops()
    arch.ptep_set_access_flags(None, store, np.array([20]), arch.pte_mknoncont(store[20:21]), ops)
    assert not ops.totals
    # write permission changes (a COW reuse): the block unfolds, only the entry is set
    ops = Ops()
    entry = arch.pte_mkwrite(arch.pte_mkdirty(arch.pte_mknoncont(store[18:19])))
    arch.ptep_set_access_flags(None, store, np.array([18]), entry, ops)
    assert ops.totals["contpte_unfolds"] == 1
    assert not arch.pte_cont(store[16:]).any()
    assert arch.pte_write(store[16:]).tolist() == [i == 2 for i in range(16)]
    assert arch.pte_dirty(store[16:]).all()  # the unfold spread entry 20's dirty bit
    assert arch.pte_pfn(store[16:]).tolist() == list(range(32, 48))


def test_mremap_to_unaligned_address_keeps_blocks_valid() -> None:
    """move_ptes goes through ptep_get_and_clear and set_pte_at: blocks that are no longer
    VA-aligned are not CONT at the new address."""
    m, p, a = _setup()
    hole = p.mmap(4 * MiB, prot="rw", align=2 * MiB)
    p.munmap(hole, 4 * MiB)
    b = p.mremap(a, MiB, MiB, new_addr=hole + 3 * P)
    _, _, vals = follow_range(m.kernel, p.mm, b, b + MiB)
    assert not ((vals & CONT) != 0).any()  # no block is VA-aligned any more


@pytest.mark.parametrize(("mode", "opts"), [
    ("batched", {}), ("legacy", {}), ("batched", {"contpte_fold": True}),
    ("legacy", {"contpte_fold": True}), ("batched", {"contpte_batch_apis": False}),
])
def test_same_state_as_plain_arm64(mode: str, opts: dict[str, bool]) -> None:
    """contpte changes PTE_CONT (and spreads young/dirty over a block when unfolding), never
    which pages are mapped, writable, or what they hold."""

    def run(contpte: bool) -> tuple[list[np.ndarray], dict[str, int]]:
        m = mmuemu.Machine(arch="arm64", memory="128MiB", fork_mode=mode,
                           **({"contpte": True, **opts} if contpte else {}))
        p = m.spawn()
        p.set_folio_orders([5, 4, 0])
        n = 4 * MiB + 5 * P
        a = p.mmap(n, prot="rw", align=2 * MiB)
        p.populate(a, n, write=True)
        p.write(a, 9, length=40 * P)
        p.madvise(a + MiB + 24 * P, MiB, "hugepage")
        pin = p.pin(a + 2 * MiB + 3 * P, 20 * P, write=True)
        c = p.fork()
        p.write(a + 17 * P, 1)
        c.write(a + 70 * P, 2, length=30 * P)
        p.mprotect(a + 3 * MiB + 7 * P, 9 * P, "r")
        p.munmap(a + 3 * MiB + 100 * P, 3 * P)
        c2 = c.fork()
        c.exit()
        pin.release()
        m.check()
        if contpte:
            _check_blocks(m, p, a, 4 * MiB)
            _check_blocks(m, c2, a, 4 * MiB)
        out = []
        for q in (p, c2):
            pfn, present, vals = follow_range(m.kernel, q.mm, a, a + n)
            out += [pfn, present, m.arch.pte_write(vals), m.kernel.phys.token[pfn[present]],
                    m.kernel.phys.refcount[m.kernel.phys.head[pfn[present]]]]
        keys = ("cow_copies", "cow_reuses", "fork_page_copies", "page_faults", "ptes_wrprotected")
        return out, {k: m.stats[k] for k in keys}

    plain, plain_stats = run(False)
    cont, cont_stats = run(True)
    for x, y in zip(plain, cont, strict=True):
        assert np.array_equal(x, y)
    assert plain_stats == cont_stats


def test_split_pmd_maps_cont_blocks() -> None:
    """__split_huge_pmd_locked fills the table with one set_ptes(HPAGE_PMD_NR), so every
    block of the split THP comes out CONT (contpte series, 'Batch-collapse PMD with
    set_ptes()')."""
    from mmuemu.workload import populated

    m = mmuemu.Machine(arch="arm64", contpte=True, memory="64MiB")
    p, a = populated(m, 2 * MiB, 9)  # PTE-mapped THP, as the fork benchmarks use
    assert _cont(m, p, a, 2 * MiB).all()


@pytest.mark.parametrize("mode", ["batched", "legacy"])
def test_fork_of_1gib_of_64k_folios(mode: str) -> None:
    """The issue's figures at full size: batched, every parent block stays folded and every
    child block is CONT, with one flush_tlb_mm; legacy, all 16384 parent blocks unfold
    (16 VALE1IS each) and the child is left unfolded."""
    m = mmuemu.Machine(arch="arm64", contpte=True, memory="2GiB")
    p = m.spawn()
    p.set_folio_orders([4])
    a = p.mmap(1 << 30, prot="rw", align=2 * MiB)
    p.populate(a, 1 << 30)
    with m.measure() as t:
        c = p.fork(mode=mode)
    blocks = (1 << 30) // (64 << 10)
    assert t.counts["tlb_flush_mm"] == 1
    _, _, pv = follow_range(m.kernel, p.mm, a, a + (1 << 30))
    _, _, cv = follow_range(m.kernel, c.mm, a, a + (1 << 30))
    if mode == "batched":
        assert blocks == 16384 and t.counts["contpte_unfolds"] == 0 and t.counts["tlbi_ops"] == 1
        assert ((pv & CONT) != 0).all() and ((cv & CONT) != 0).all()
    else:
        assert t.counts["contpte_unfolds"] == blocks
        assert t.counts["tlbi_ops"] == blocks * 16 + 1
        assert not ((pv & CONT) != 0).any() and not ((cv & CONT) != 0).any()
    m.check()


def test_young_is_tested_and_cleared_over_the_block() -> None:
    """contpte_ptep_test_and_clear_young clears AF on all 16 entries without unfolding;
    the flush variant adds a block invalidation (no DSB wait) only when it was young."""
    from mmuemu.mm.work import Ops

    m, p, a = _setup()
    k = m.kernel
    slots = k.pt.pmd_slots(p.mm.pgd_row, a, a + 2 * MiB)
    row = int(k.pt.rows_of(k.pt.flat[slots.flat])[0])
    store = k.pt.flat
    idx = np.array([row * 512 + 5, row * 512 + 9, row * 512 + 40])  # two in one block
    ops = Ops()
    young = m.arch.ptep_clear_flush_young(None, store, idx, ops)
    assert young.tolist() == [True, False, True]  # the block's second entry finds it old
    base = row * 512
    assert not m.arch.pte_young(store[base : base + 16]).any()
    assert not m.arch.pte_young(store[base + 32 : base + 48]).any()
    assert m.arch.pte_young(store[base + 16 : base + 32]).all()  # a block nobody asked about
    assert m.arch.pte_cont(store[base : base + 48]).all()  # still folded
    assert ops.totals["pte_atomics"] == 2 * 16 and ops.totals["tlbi_ops"] == 2 * 16
    assert "tlb_flush_range" not in ops.totals and "contpte_unfolds" not in ops.totals
    again = m.arch.ptep_test_and_clear_young(None, store, idx, Ops())
    assert not again.any()
    m.check()


def test_young_on_plain_arm64() -> None:
    from mmuemu.mm.work import Ops

    m = mmuemu.Machine(arch="arm64", memory="64MiB")
    p = m.spawn()
    a = p.mmap(MiB)
    p.populate(a, MiB)
    slots = m.kernel.pt.pmd_slots(p.mm.pgd_row, a, a + MiB)
    row = int(m.kernel.pt.rows_of(m.kernel.pt.flat[slots.flat])[0])
    idx = np.array([row * 512 + (a >> 12) % 512])
    ops = Ops()
    assert m.arch.ptep_clear_flush_young(None, m.kernel.pt.flat, idx, ops).tolist() == [True]
    assert ops.totals["pte_atomics"] == 1 and ops.totals["tlbi_ops"] == 1
    assert not p.pte(a).young
