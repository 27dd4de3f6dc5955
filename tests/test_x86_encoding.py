"""x86_64 encodings: the vectorised fast forms agree with the generic compositions."""

from __future__ import annotations

import numpy as np
import pytest

from mmuemu.arch.base import Arch
from mmuemu.arch.x86_64 import X86_64

a = X86_64()


def _entries(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 2**63, 4000, dtype=np.uint64)
    v[::3] |= np.uint64(1)  # present
    v[1::7] &= ~np.uint64(1)  # not present (L1TF-inverted PFN when non-zero)
    return v


@pytest.mark.parametrize("ignore_dirty", [False, True])
@pytest.mark.parametrize("ignore_soft_dirty", [False, True])
def test_batch_bits_same_relation_as_generic(ignore_dirty: bool, ignore_soft_dirty: bool) -> None:
    """Two entries batch together under x86's mask form iff they do under the generic
    __pte_batch_clear_ignored composition."""
    v = _entries(1)
    rng = np.random.default_rng(2)
    i, j = rng.integers(0, len(v), 8000), rng.integers(0, len(v), 8000)
    w = v.copy()
    flips = np.uint64(1 << 5) | np.uint64(1 << 6) | np.uint64(1 << 1) | np.uint64(1 << 11) | np.uint64(1 << 58)
    w[j[:4000]] = v[i[:4000]] ^ (flips & rng.integers(0, 2**63, 4000, dtype=np.uint64))
    g = Arch.pte_batch_bits(a, w, ignore_dirty, ignore_soft_dirty)
    x = a.pte_batch_bits(w, ignore_dirty, ignore_soft_dirty)
    assert np.array_equal(g[i] == g[j], x[i] == x[j])


def test_saved_dirty_round_trip() -> None:
    v = np.array([0x67, 0x65 | (1 << 58), 0x25], dtype=np.uint64)  # RW+D, RO+SavedDirty, RO clean
    wp = a.pte_wrprotect(v)
    assert not (wp & np.uint64(0x42)).any()  # no RW, no Dirty
    assert ((wp >> np.uint64(58)) & np.uint64(1)).tolist() == [1, 1, 0]
    mk = a.pte_mkwrite(wp)
    assert mk.tolist() == [0x67, 0x67, 0x27]
    assert a.pte_dirty(wp).tolist() == [True, True, False]


def test_l1tf_inverted_pfn() -> None:
    prot_none = a.vm_get_page_prot(__import__("mmuemu.arch.base", fromlist=["Prot"]).Prot(False, False, False, False))
    pte = a.pfn_pte(np.array([12345], np.int64), prot_none)
    assert not pte[0] & np.uint64(1) and a.pte_present(pte)[0]
    assert ((pte[0] >> np.uint64(12)) & np.uint64(0xFFFFFF)) != 12345  # stored inverted
    assert a.pte_pfn(pte)[0] == 12345
    assert a.pte_pfn(a.pte_advance_pfn(pte, 3))[0] == 12348


@pytest.mark.parametrize("name", ["x86_64", "arm64"])
def test_single_table_entries_match_the_vector_forms(name: str) -> None:
    """mk_table_of / table_pfn_of (plain ints, for walks) encode and decode exactly as the
    vector forms do, and the base class's generic versions agree with the overrides."""
    from mmuemu.arch import make_arch

    arch = make_arch(name)
    rng = np.random.default_rng(3)
    pfns = np.concatenate([rng.integers(0, 1 << 36, 500), [0, 1, (1 << 36) - 1]]).astype(np.int64)
    vec = arch.mk_table(pfns)
    for pfn, e in zip(pfns.tolist(), vec.tolist(), strict=True):
        assert arch.mk_table_of(pfn) == e == Arch.mk_table_of(arch, pfn)
        assert arch.table_pfn_of(e) == pfn == Arch.table_pfn_of(arch, e)
    # decoding ignores the attribute bits around the address, as the vector form does
    noisy = vec | np.uint64(0xFFF) | np.uint64(1 << 63)
    assert [arch.table_pfn_of(e) for e in noisy.tolist()] == arch.table_pfn(noisy).tolist()
