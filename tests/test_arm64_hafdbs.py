"""arm64 without FEAT_HAFDBS: first accesses to old entries and first writes to clean
writable entries fault, and software sets what the hardware would have."""

from __future__ import annotations

import pytest

import mmuemu

MiB = 1 << 20
PAGE = 4096
AF, RDONLY, DBM, SW_DIRTY = 1 << 10, 1 << 7, 1 << 51, 1 << 55


@pytest.mark.parametrize("hafdbs", [True, False])
def test_read_of_an_old_entry(hafdbs: bool) -> None:
    m = mmuemu.Machine(arch="arm64", memory="64MiB", hafdbs=hafdbs)
    p = m.spawn()
    a = p.mmap(MiB)
    p.populate(a, MiB)
    c = p.fork()
    assert not c.pte(a).raw & AF  # the child's entries are made old
    with m.measure() as t:
        c.read(a, length=MiB)
    assert c.pte(a).raw & AF
    assert t.counts["page_faults"] == (0 if hafdbs else MiB // PAGE)
    with m.measure() as again:
        c.read(a, length=MiB)
    assert again.counts["page_faults"] == 0
    m.check()


@pytest.mark.parametrize("hafdbs", [True, False])
def test_write_to_a_clean_writable_shared_entry(hafdbs: bool) -> None:
    m = mmuemu.Machine(arch="arm64", memory="64MiB", hafdbs=hafdbs)
    p = m.spawn()
    a = p.mmap(16 * PAGE, shared=True)
    p.read(a, length=16 * PAGE)  # maps the shmem pages clean: DBM set, RDONLY set
    raw = p.pte(a).raw
    assert raw & DBM and raw & RDONLY and not raw & SW_DIRTY
    with m.measure() as t:
        p.write(a, 5, length=16 * PAGE)
    raw = p.pte(a).raw
    assert p.pte(a).dirty and not raw & RDONLY
    if hafdbs:  # the MMU made it hardware-dirty
        assert t.counts["page_faults"] == 0 and not raw & SW_DIRTY
    else:  # a permission fault, fixed up with pte_mkdirty
        assert t.counts["page_faults"] == 16 and raw & SW_DIRTY
    assert p.read(a) == 5
    m.check()


def test_x86_never_takes_access_faults() -> None:
    m = mmuemu.Machine(arch="x86_64", memory="64MiB")
    p = m.spawn()
    a = p.mmap(MiB)
    p.populate(a, MiB)
    c = p.fork()
    with m.measure() as t:
        c.read(a, length=MiB)
    assert t.counts["page_faults"] == 0 and c.pte(a).young


def test_ptep_set_access_flags_merges_and_flushes_on_write() -> None:
    """__ptep_set_access_flags only ever sets AF/dirty/write (RDONLY inverted); unchanged
    entries cost nothing; a write fault also flushes the stale read-only entry."""
    import numpy as np

    from mmuemu.arch.arm64 import Arm64
    from mmuemu.mm.work import Ops

    a = Arm64()
    clean = np.uint64((5 << 12) | 0b11 | RDONLY | DBM)  # valid page, writable, clean, old
    store = np.array([clean, clean | AF], dtype=np.uint64)
    ops = Ops()
    a.ptep_set_access_flags(None, store, np.array([1]), store[1:2].copy(), ops, dirty=True)
    assert not ops.totals  # unchanged: nothing
    ops = Ops()
    a.ptep_set_access_flags(None, store, np.array([0]), np.array([clean | AF]), ops, dirty=False)
    assert store[0] == clean | AF and ops.totals == {"pte_atomics": 1}
    ops = Ops()
    # a write: entry young and dirty; RDONLY cleared, and an entry that lacks AF cannot clear it
    want = np.array([(clean & ~np.uint64(RDONLY)) | SW_DIRTY], dtype=np.uint64)
    a.ptep_set_access_flags(None, store, np.array([0]), want, ops, dirty=True)
    assert store[0] == (clean | AF | SW_DIRTY) & ~np.uint64(RDONLY)
    assert ops.totals["pte_atomics"] == 1 and ops.totals["tlbi_ops"] == 1
