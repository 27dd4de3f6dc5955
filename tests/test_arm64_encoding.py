"""arm64 encodings (v6.9 descriptor, DBM dirty model), TLB op counts and options.

Expected values are built here from the architecture's bit positions, never by calling the
backend's own helpers, so a wrong constant or transform in the backend fails.
"""

from __future__ import annotations

import numpy as np
import pytest

import mmuemu
from mmuemu.arch.arm64 import Arm64
from mmuemu.arch.base import Arch, Prot
from mmuemu.errors import InvalidArgument
from mmuemu.mm.work import Ops

a = Arm64()

# descriptor bits (KERNEL.md 5.1/5.2, v6.9)
VALID, TABLE = 1 << 0, 1 << 1
USER, RDONLY, SH, AF, NG = 1 << 6, 1 << 7, 3 << 8, 1 << 10, 1 << 11
DBM, CONT, PXN, UXN = 1 << 51, 1 << 52, 1 << 53, 1 << 54
SWDIRTY, SPECIAL, PROT_NONE, PXNTABLE = 1 << 55, 1 << 56, 1 << 58, 1 << 59
ATTR_NORMAL = 0 << 2  # AttrIndx = MT_NORMAL = 0
DEFAULT = VALID | TABLE | AF | SH | ATTR_NORMAL
PAGE_NONE = TABLE | AF | SH | PROT_NONE | RDONLY | NG | PXN | UXN
PAGE_READONLY = DEFAULT | USER | RDONLY | NG | PXN | UXN
PAGE_READONLY_EXEC = DEFAULT | USER | RDONLY | NG | PXN
PAGE_SHARED = DEFAULT | USER | RDONLY | NG | PXN | UXN | DBM
PAGE_SHARED_EXEC = DEFAULT | USER | RDONLY | NG | PXN | DBM
PFN = 0x12345


def u(*vals: int) -> np.ndarray:
    return np.array(vals, dtype=np.uint64)


def one(v: np.ndarray) -> int:
    return int(np.asarray(v).reshape(-1)[0])


# (read, write, exec, shared) -> arch/arm64/mm/mmap.c protection_map entry (no EPAN)
PROTECTION_MAP = {
    (False, False, False, False): PAGE_NONE,
    (True, False, False, False): PAGE_READONLY,
    (False, True, False, False): PAGE_READONLY,
    (True, True, False, False): PAGE_READONLY,
    (False, False, True, False): PAGE_READONLY_EXEC,
    (True, False, True, False): PAGE_READONLY_EXEC,
    (False, True, True, False): PAGE_READONLY_EXEC,
    (True, True, True, False): PAGE_READONLY_EXEC,
    (False, False, False, True): PAGE_NONE,
    (True, False, False, True): PAGE_READONLY,
    (False, True, False, True): PAGE_SHARED,
    (True, True, False, True): PAGE_SHARED,
    (False, False, True, True): PAGE_READONLY_EXEC,
    (True, False, True, True): PAGE_READONLY_EXEC,
    (False, True, True, True): PAGE_SHARED_EXEC,
    (True, True, True, True): PAGE_SHARED_EXEC,
}


@pytest.mark.parametrize("rwxs", sorted(PROTECTION_MAP))
def test_pfn_pte_bit_exact_per_protection(rwxs: tuple[bool, bool, bool, bool]) -> None:
    prot = a.vm_get_page_prot(Prot(*rwxs))
    assert prot == PROTECTION_MAP[rwxs]
    pte = one(a.pfn_pte(np.array([PFN], np.int64), prot))
    assert pte == (PFN << 12) | PROTECTION_MAP[rwxs]
    assert one(a.pte_pfn(u(pte))) == PFN


def test_literal_encodings() -> None:
    """A few entries spelled out in hex, as a reader checking against the ARM ARM would."""
    ro = one(a.pfn_pte(np.array([1], np.int64), a.vm_get_page_prot(Prot(True, True, False, False))))
    assert ro == 0x0060_0000_0000_1FC3  # UXN PXN | PFN 1 | nG AF SH=11 RDONLY USER | page
    rw = one(a.pfn_pte(np.array([1], np.int64), a.vm_get_page_prot(Prot(True, True, False, True))))
    assert rw == 0x0068_0000_0000_1FC3  # the same plus DBM (bit 51): clean, writable
    none = a.vm_get_page_prot(Prot(False, False, False, False))
    assert none & 1 == 0 and none >> 58 & 1 and none & USER == 0


def test_oa_is_bits_12_to_47() -> None:
    top = (1 << 36) - 1
    pte = a.pfn_pte(np.array([top, top + 1], np.int64), 0)
    assert pte.tolist() == [top << 12, 0]  # a PFN beyond 48-bit PA is not representable
    assert a.pte_pfn(u((top << 12) | DBM | SWDIRTY | 0xFFF)).tolist() == [top]


# ---------------------------------------------------------------- DBM dirty model (5.3)
CLEAN_RO = DEFAULT | USER | RDONLY
CLEAN_RW = DEFAULT | USER | RDONLY | DBM
DIRTY_RO = DEFAULT | USER | RDONLY | SWDIRTY
DIRTY_RW = DEFAULT | USER | DBM  # hardware dirty
DIRTY_RW_SW = DEFAULT | USER | DBM | SWDIRTY


def test_dbm_state_predicates() -> None:
    v = u(CLEAN_RO, CLEAN_RW, DIRTY_RO, DIRTY_RW, DIRTY_RW_SW)
    assert a.pte_write(v).tolist() == [False, True, False, True, True]
    assert a.pte_dirty(v).tolist() == [False, False, True, True, True]
    assert a.pte_hw_dirty(v).tolist() == [False, False, False, True, True]
    # RDONLY set with DBM clear is "dirty, read-only" only through the software bit
    assert a.pte_dirty(u(DEFAULT | DBM | RDONLY | SWDIRTY)).tolist() == [True]


def test_wrprotect_keeps_dirtiness() -> None:
    v = u(CLEAN_RO, CLEAN_RW, DIRTY_RO, DIRTY_RW, DIRTY_RW_SW)
    w = a.pte_wrprotect(v)
    assert w.tolist() == [CLEAN_RO, CLEAN_RO, DIRTY_RO, DIRTY_RO, DIRTY_RO]
    assert a.pte_dirty(w).tolist() == a.pte_dirty(v).tolist()
    assert not a.pte_write(w).any()


def test_mkwrite_v69_clears_rdonly() -> None:
    """v6.9 pte_mkwrite_novma: DBM set and RDONLY cleared, so a clean entry becomes hw-dirty
    (the quirk KERNEL.md 3.4 describes)."""
    v = u(CLEAN_RO, CLEAN_RW, DIRTY_RO, DIRTY_RW)
    assert a.pte_mkwrite(v).tolist() == [DIRTY_RW, DIRTY_RW, DIRTY_RW_SW, DIRTY_RW]
    # the quirk through fork's any_writable: mkwrite then wrprotect sets PTE_DIRTY
    assert a.pte_wrprotect(a.pte_mkwrite(u(CLEAN_RO))).tolist() == [DIRTY_RO]


def test_mkwrite_v618_dirty_only() -> None:
    class Arm64Fixed(Arm64):
        mkwrite_dirty_only = True

    b = Arm64Fixed()
    v = u(CLEAN_RO, CLEAN_RW, DIRTY_RO, DIRTY_RW)
    assert b.pte_mkwrite(v).tolist() == [CLEAN_RW, CLEAN_RW, DIRTY_RW_SW, DIRTY_RW]
    assert b.pte_wrprotect(b.pte_mkwrite(u(CLEAN_RO))).tolist() == [CLEAN_RO]


def test_mkclean_mkdirty() -> None:
    v = u(CLEAN_RO, CLEAN_RW, DIRTY_RO, DIRTY_RW, DIRTY_RW_SW)
    assert a.pte_mkclean(v).tolist() == [CLEAN_RO, CLEAN_RW, CLEAN_RO, CLEAN_RW, CLEAN_RW]
    assert not a.pte_dirty(a.pte_mkclean(v)).any()
    # mkdirty: PTE_DIRTY always; RDONLY cleared only where writable
    assert a.pte_mkdirty(v).tolist() == [DIRTY_RO, DIRTY_RW_SW, DIRTY_RO, DIRTY_RW_SW, DIRTY_RW_SW]


def test_mkold_mkyoung_toggle_af_only() -> None:
    v = u(DIRTY_RW, CLEAN_RO)
    assert a.pte_mkold(v).tolist() == [DIRTY_RW & ~AF, CLEAN_RO & ~AF]
    assert a.pte_mkyoung(a.pte_mkold(v)).tolist() == v.tolist()
    assert a.pte_young(a.pte_mkold(v)).tolist() == [False, False]


def test_hw_access_with_hafdbs() -> None:
    old = u(CLEAN_RW & ~AF, CLEAN_RO & ~AF, PAGE_NONE & ~AF)
    assert a.pte_hw_access(old, write=False).tolist() == [CLEAN_RW, CLEAN_RO, PAGE_NONE & ~AF]
    # a store through DBM clears RDONLY (no software bit); not through a non-DBM entry
    assert a.pte_hw_access(old, write=True).tolist() == [DIRTY_RW, CLEAN_RO, PAGE_NONE & ~AF]


def test_hw_access_without_hafdbs_changes_nothing() -> None:
    b = Arm64(hafdbs=False)
    old = u(CLEAN_RW & ~AF, CLEAN_RO)
    assert b.pte_hw_access(old, write=True).tolist() == old.tolist()


def test_present_none_protnone() -> None:
    protnone = (PFN << 12) | PAGE_NONE
    v = u(0, CLEAN_RO, protnone, PROT_NONE, TABLE)
    assert a.pte_present(v).tolist() == [False, True, True, True, False]
    assert a.pte_none(v).tolist() == [True, False, False, False, False]
    assert one(a.pte_pfn(u(protnone))) == PFN  # no inversion on arm64


def test_soft_dirty_and_uffd_wp_are_absent() -> None:
    v = u(DIRTY_RW, PAGE_NONE | (1 << 57) | (1 << 63))
    assert not a.pte_soft_dirty(v).any() and not a.pte_uffd_wp(v).any()
    for f in (a.pte_mksoft_dirty, a.pte_clear_soft_dirty, a.pte_mkuffd_wp, a.pte_clear_uffd_wp):
        assert f(v).tolist() == v.tolist()


def test_special_and_cont() -> None:
    v = u(CLEAN_RO)
    assert a.pte_mkspecial(v).tolist() == [CLEAN_RO | SPECIAL]
    assert a.pte_special(a.pte_mkspecial(v)).tolist() == [True]
    assert a.pte_mkcont(v).tolist() == [CLEAN_RO | CONT]
    assert a.pte_cont(u(CLEAN_RO | CONT, CLEAN_RO)).tolist() == [True, False]
    assert a.pte_mknoncont(u(CLEAN_RO | CONT)).tolist() == [CLEAN_RO]
    assert a.cont_ptes == 16


def test_pte_modify() -> None:
    base = (PFN << 12) | SPECIAL | NG  # nG, AF, SH and the type bits are the entry's own
    # mprotect(rw -> r) of a private hw-dirty entry: dirtiness moves to PTE_DIRTY
    assert one(a.pte_modify(u(base | DIRTY_RW), PAGE_READONLY)) == base | PAGE_READONLY | SWDIRTY
    # clean shared entry to PAGE_SHARED stays clean; a sw-dirty one becomes hw-dirty again
    assert one(a.pte_modify(u(base | CLEAN_RO), PAGE_SHARED)) == base | PAGE_SHARED
    assert one(a.pte_modify(u(base | DIRTY_RO), PAGE_SHARED)) == base | (PAGE_SHARED & ~RDONLY) | SWDIRTY
    # old stays old (AF is not taken from the prot); PROT_NONE and back
    old = base | (CLEAN_RO & ~AF)
    pn = one(a.pte_modify(u(old), PAGE_NONE))
    assert pn == (base | TABLE | SH | PROT_NONE | RDONLY | NG | PXN | UXN)
    assert a.pte_present(u(pn)).tolist() == [True]
    assert one(a.pte_modify(u(pn), PAGE_READONLY)) == old | PXN | UXN
    # nG is not among the bits pte_modify takes from the protection
    assert one(a.pte_modify(u(PFN << 12 | CLEAN_RO), PAGE_READONLY)) == PFN << 12 | CLEAN_RO | PXN | UXN


def test_advance_pfn() -> None:
    v = u((PFN << 12) | DIRTY_RO, ((1 << 36) - 1) << 12 | CLEAN_RO)
    assert a.pte_advance_pfn(v, 3).tolist() == [((PFN + 3) << 12) | DIRTY_RO, (2 << 12) | CLEAN_RO]
    w = u((5 << 12) | CLEAN_RW)
    assert int(a.pte_advance_pfn(w, 1)[0]) - int(w[0]) == int(a.pte_pfn_unit)


# ---------------------------------------------------------------- batching key
def _entries(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 2**63, 4000, dtype=np.uint64)
    v[1::5] |= np.uint64(VALID)
    v[2::7] &= ~np.uint64(RDONLY)
    return v


@pytest.mark.parametrize("ignore_dirty", [False, True])
@pytest.mark.parametrize("ignore_soft_dirty", [False, True])
def test_batch_bits_equal_generic(ignore_dirty: bool, ignore_soft_dirty: bool) -> None:
    v = _entries(3)
    assert np.array_equal(a.pte_batch_bits(v, ignore_dirty, ignore_soft_dirty),
                          Arch.pte_batch_bits(a, v, ignore_dirty, ignore_soft_dirty))


def test_batch_bits_rules() -> None:
    p0 = (PFN << 12)
    key = lambda *vals: a.pte_batch_bits(u(*vals), False, False).tolist()  # noqa: E731
    # PFN, AF, write and clean-writable vs read-only are ignored
    k = key(p0 | CLEAN_RO, (p0 + 4096) | CLEAN_RW, p0 | (CLEAN_RO & ~AF))
    assert k[0] == k[1] == k[2]
    # hw-dirty and sw-dirty compare equal; dirty differs from clean unless ignored
    k = key(p0 | DIRTY_RW, p0 | DIRTY_RO, p0 | DIRTY_RW_SW, p0 | CLEAN_RW)
    assert k[0] == k[1] == k[2] != k[3]
    ki = a.pte_batch_bits(u(p0 | DIRTY_RW, p0 | CLEAN_RW), True, False).tolist()
    assert ki[0] == ki[1]
    # special, exec and user do matter
    k = key(p0 | CLEAN_RO, p0 | CLEAN_RO | SPECIAL, p0 | CLEAN_RO | UXN, p0 | (CLEAN_RO & ~USER))
    assert len(set(k)) == 4


# ---------------------------------------------------------------- tables and PMD blocks
def test_table_descriptor_round_trip() -> None:
    e = a.mk_table(np.array([7, (1 << 36) - 1], np.int64))
    assert e.tolist() == [(7 << 12) | VALID | TABLE | PXNTABLE, (((1 << 36) - 1) << 12) | VALID | TABLE | PXNTABLE]
    assert a.table_pfn(e).tolist() == [7, (1 << 36) - 1]
    assert not a.pmd_leaf(e).any()


def test_pmd_block_round_trip() -> None:
    pte = u((512 << 12) | DIRTY_RW, (1024 << 12) | PAGE_NONE)
    pmd = a.pte_to_pmd(pte)
    assert pmd.tolist() == [((512 << 12) | DIRTY_RW) & ~TABLE, ((1024 << 12) | PAGE_NONE) & ~TABLE]
    assert a.pmd_leaf(pmd).tolist() == [True, True]  # a block, and a PROT_NONE block
    assert a.pmd_to_pte(pmd).tolist() == pte.tolist()
    assert a.pmd_leaf(u(0, VALID | TABLE | (5 << 12))).tolist() == [False, False]
    assert a.pmd_to_pte(u(0)).tolist() == [0]
    assert a.pte_dirty(a.pmd_to_pte(pmd)).tolist() == [True, False]


# ---------------------------------------------------------------- TLB
def _counts(f: object, *args: object, arch: Arm64 = a, **kw: object) -> dict[str, int]:
    ops = Ops()
    getattr(arch, str(f))(None, *args, ops, **kw)
    return {k: v for k, v in ops.totals.items() if v}


def test_flush_tlb_mm_is_one_broadcast_tlbi() -> None:
    assert _counts("flush_tlb_mm") == {"tlb_flush_mm": 1, "tlbi_ops": 1}
    assert _counts("flush_tlb_mm", arch=Arm64(kpti=True)) == {"tlb_flush_mm": 1, "tlbi_ops": 2}


PAGE = 4096


@pytest.mark.parametrize(("start", "end", "want"), [
    (0, PAGE, {"tlb_flush_range": 1, "tlbi_ops": 1}),
    (0x10000, 0x10000 + 511 * PAGE, {"tlb_flush_range": 1, "tlbi_ops": 511}),
    (0x10800, 0x10000 + 511 * PAGE, {"tlb_flush_range": 1, "tlbi_ops": 511}),  # rounded down
    (0x10800, 0x10000 + 511 * PAGE + 1, {"tlb_flush_range": 1, "tlb_flush_mm": 1, "tlbi_ops": 1}),
    (0, 512 * PAGE, {"tlb_flush_range": 1, "tlb_flush_mm": 1, "tlbi_ops": 1}),
])
def test_flush_range_per_page_then_fallback(start: int, end: int, want: dict[str, int]) -> None:
    assert _counts("flush_tlb_range", start, end) == want


def test_flush_range_pmd_stride() -> None:
    assert _counts("flush_tlb_range", 0, 4 << 21, stride_shift=21) == {"tlb_flush_range": 1, "tlbi_ops": 4}
    assert _counts("flush_tlb_range", 0, 512 << 21, stride_shift=21) == {
        "tlb_flush_range": 1, "tlb_flush_mm": 1, "tlbi_ops": 1}


def test_flush_range_kpti_doubles() -> None:
    k = Arm64(kpti=True)
    assert _counts("flush_tlb_range", 0, 10 * PAGE, arch=k) == {"tlb_flush_range": 1, "tlbi_ops": 20}
    assert _counts("flush_tlb_page", 0, arch=k) == {"tlb_flush_range": 1, "tlbi_ops": 2}


@pytest.mark.parametrize(("pages", "ops"), [
    (1, 1),  # a lone page: one VALE1IS
    (2, 1),  # scale 0, num 0
    (3, 2),  # 2 by range, 1 single
    (64, 1),  # scale 1, num 0
    (512, 1),  # scale 1, num 7
    (513, 2),
    (2**16 * 32, 1),  # scale 3, num 31 = MAX_TLBI_RANGE_PAGES
    (2**16 + 2**11 + 2**6 + 2 + 1, 5),  # one op per scale, then the odd page
])
def test_flush_range_tlbirange(pages: int, ops: int) -> None:
    r = Arm64(tlbi_range=True)
    assert _counts("flush_tlb_range", 0, pages * PAGE, arch=r) == {"tlb_flush_range": 1, "tlbi_ops": ops}


def test_flush_range_tlbirange_fallback_above_max() -> None:
    r = Arm64(tlbi_range=True, kpti=True)
    assert _counts("flush_tlb_range", 0, (2**21 + 1) * PAGE, arch=r) == {
        "tlb_flush_range": 1, "tlb_flush_mm": 1, "tlbi_ops": 2}


def test_no_ipis_on_fork() -> None:
    m = mmuemu.Machine(arch="arm64", memory="64MiB", cpus=4)
    p = m.spawn()
    p.run_on(0, 1, 2, 3)
    a_ = p.mmap(1 << 21)
    p.populate(a_, 1 << 21)
    with m.measure() as t:
        c = p.fork()
    assert t.counts["ipis"] == 0 and t.counts["tlb_flush_mm"] == 1 and t.counts["tlbi_ops"] == 1
    c.write(a_, 5)
    assert p.read(a_) == 0 and c.read(a_) == 5
    m.check()


# ---------------------------------------------------------------- atomics
def test_zap_clears_are_atomic_even_when_full() -> None:
    store = u(0, CLEAN_RO | (3 << 12), DIRTY_RW | (4 << 12), 0)
    ops = Ops()
    out = a.get_and_clear_full_ptes(None, store, np.array([1]), np.array([2]), True, ops)
    assert store.tolist() == [0, 0, 0, 0]
    assert ops.totals["pte_clears"] == 2 and ops.totals["pte_atomics"] == 2
    assert a.pte_dirty(out).tolist() == [True] and one(a.pte_pfn(out)) == 3


# ---------------------------------------------------------------- options
def test_options_stored() -> None:
    d = Arm64()
    assert (d.hafdbs, d.tlbi_range, d.kpti) == (True, False, False)
    e = Arm64(hafdbs=False, tlbi_range=True, kpti=True)
    assert (e.hafdbs, e.tlbi_range, e.kpti) == (False, True, True)
    m = mmuemu.Machine(arch="arm64", memory="16MiB", kpti=True)
    assert isinstance(m.arch, Arm64) and m.arch.kpti


def test_unknown_option_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(InvalidArgument) as e:
        Arm64(bbml2=True)
    msg = str(e.value)
    assert "'bbml2'" in msg and "hafdbs" in msg and "kpti" in msg and "tlbi_range" in msg
    with pytest.raises(InvalidArgument, match="lpa2"):
        mmuemu.Machine(arch="arm64", memory="16MiB", lpa2=True)


def test_option_must_be_bool() -> None:
    with pytest.raises(InvalidArgument, match="kpti"):
        Arm64(kpti="yes")


def test_registered() -> None:
    assert "arm64" in mmuemu.available_arches()
    assert Arm64.name == "arm64" and Arm64.levels == 4 and Arm64.va_bits == 48 and Arm64.page_shift == 12
