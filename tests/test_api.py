"""The public API of DESIGN.md, exactly as written there, on x86_64."""

from __future__ import annotations

import numpy as np
import pytest

import mmuemu
from mmuemu.workload import populated

MiB = 1 << 20


def test_available_arches() -> None:
    assert "x86_64" in mmuemu.available_arches()


def test_design_walkthrough(m: mmuemu.Machine) -> None:
    p = m.spawn(name="parent")
    n = 4 * MiB
    a = p.mmap(n, prot="rw")
    p.madvise(a, n, "hugepage")
    p.set_folio_orders([4, 2])
    p.populate(a, n, write=True)
    assert p.read(a) == 0
    p.write(a, 0xC0FFEE)
    p.write(a, 7, length=n)
    assert p.read(a) == 7
    assert (p.read(a, length=n) == 7).all()
    c = p.fork()
    assert p.rss["anon"] == n // 4096 == c.rss["anon"]
    p.mprotect(a, n, "r")
    b = p.mremap(a, n, 2 * n)
    ref = p.get_pages(b, n)
    pin = p.pin(b, n, write=False, longterm=True)
    assert (pin.read() == 7).all() and (ref.read() == 7).all()
    pin.release()
    ref.release()
    p.munmap(b, 2 * n)
    c.exit()
    m.check()


def test_measure_and_stats(m: mmuemu.Machine) -> None:
    p = m.spawn()
    a = p.mmap(2 * MiB)
    p.populate(a, 2 * MiB)
    with m.measure() as t:
        c = p.fork()
    assert t.ns > 0
    assert t.counts["fork_batches"] == 512
    assert t.counts["tlb_flush_mm"] == 1
    assert m.stats["fork_batches"] == 512
    c.exit()


def test_pte_and_folio_info(m: mmuemu.Machine) -> None:
    p = m.spawn()
    a = p.mmap(64 * 1024)
    p.set_folio_orders([4])
    p.write(a, 1)
    pte = p.pte(a)
    assert pte.present and pte.write and pte.dirty and pte.young and not pte.special
    f = p.folio(a)
    assert f.order == 4 and f.refcount == 16 and f.mapcount == 1 and f.anon and f.anon_exclusive
    c = p.fork()
    assert not p.pte(a).write and not c.pte(a).write
    assert not c.pte(a).young and p.pte(a).young  # the child's entries are made old
    assert p.pte(a).dirty and c.pte(a).dirty  # private: dirty kept (SavedDirty / PTE_DIRTY)
    raw = p.pte(a).raw
    if m.kernel.arch.name == "x86_64":  # Dirty moved to SavedDirty (bit 58)
        assert raw >> 58 & 1 and not raw >> 6 & 1
    else:  # hardware dirty (DBM, RDONLY clear) moved to PTE_DIRTY (bit 55), RDONLY set
        assert raw >> 55 & 1 and raw >> 7 & 1 and not raw >> 51 & 1
    f = p.folio(a)
    assert f.refcount == 32 and f.mapcount == 2 and not f.anon_exclusive
    m.check()


def test_read_fault_maps_zero_page(m: mmuemu.Machine) -> None:
    p = m.spawn()
    a = p.mmap(8192)
    assert p.read(a) == 0
    assert p.pte(a).special and not p.pte(a).write
    assert p.rss["anon"] == 0
    p.write(a, 3)
    assert p.rss["anon"] == 1 and p.folio(a).order == 0
    m.check()


def test_pmd_thp_and_split(m: mmuemu.Machine) -> None:
    p, a = populated(m, 4 * MiB, 9, pte_mapped=False)
    f = p.folio(a + 8192)
    assert f.order == 9 and f.entire_mapcount == 1 and f.refcount == 1
    assert p.pte(a).pmd
    c = p.fork()
    assert p.folio(a).refcount == 2
    c.write(a + 4096, 5)  # PMD COW: split, then a 4K copy
    assert p.read(a + 4096) == 0 and c.read(a + 4096) == 5
    assert not c.pte(a).pmd and c.folio(a).order == 9 and c.folio(a + 4096).order == 0
    m.check()
    p.split_huge_pmd(a, 4 * MiB)
    assert not p.pte(a).pmd and p.folio(a).order == 9
    m.check()


def test_shared_anon_is_shared_after_fork(m: mmuemu.Machine) -> None:
    p = m.spawn()
    a = p.mmap(16384, shared=True)
    p.write(a, 1, length=16384)
    c = p.fork()
    c.write(a, 2)
    assert p.read(a) == 2
    assert p.rss["shmem"] == 4
    c.exit()
    p.munmap(a, 16384)
    m.check()
    assert p.rss["shmem"] == 0


def test_file_mappings(m: mmuemu.Machine) -> None:
    f = m.file("data.bin", 8 * 4096)
    p = m.spawn()
    a = p.mmap(8 * 4096, prot="r", file=f)
    q = m.spawn()
    b = q.mmap(8 * 4096, prot="rw", shared=True, file=f)
    q.write(b, 9)
    assert p.read(a) == 9 and p.rss["file"] == 1
    c = m.spawn()
    d = c.mmap(8 * 4096, prot="rw", file=f)
    c.write(d, 4)  # private COW of a file page
    assert c.rss == {"anon": 1, "file": 0, "shmem": 0, "swap": 0}
    assert p.read(a) == 9
    m.check()


@pytest.mark.parametrize("mode", ["batched", "legacy"])
def test_wipeonfork_dontfork(m: mmuemu.Machine, mode: str) -> None:
    p = m.spawn()
    a = p.mmap(3 * 8192)
    p.write(a, 1, length=3 * 8192)
    p.madvise(a, 8192, "dontfork")
    p.madvise(a + 8192, 8192, "wipeonfork")
    c = p.fork(mode=mode)
    with pytest.raises(mmuemu.SegmentationFault):
        c.read(a)
    assert c.read(a + 8192) == 0 and c.read(a + 16384) == 1
    m.check()


def test_exit_frees_everything(m: mmuemu.Machine) -> None:
    free0 = m.free_pages
    p = m.spawn()
    p.set_folio_orders([9, 4])
    a = p.mmap(8 * MiB, align=2 * MiB)
    p.populate(a, 8 * MiB)
    c = p.fork()
    c.write(a, 3, length=MiB)
    c.exit()
    p.exit()
    m.check()
    assert m.free_pages == free0
    # the buddy merged everything back: the same block layout as a new machine
    fresh = mmuemu.Machine(arch="x86_64", memory="256MiB").kernel.phys.free_lists
    assert [len(s) for s in m.kernel.phys.free_lists] == [len(s) for s in fresh]


def test_tokens_array(m: mmuemu.Machine) -> None:
    p = m.spawn()
    a = p.mmap(5 * 4096)
    for i in range(5):
        p.write(a + i * 4096, 100 + i)
    assert np.array_equal(p.read(a, length=5 * 4096), np.arange(100, 105))


def test_fault_range_across_vmas_sharing_a_table(m: mmuemu.Machine) -> None:
    """Two VMAs in one PMD, faulted in one call: one PTE table, every page accounted."""
    p = m.spawn()
    a = p.mmap(8192, "rw", addr=0x200000)
    p.mmap(8192, "r", addr=0x202000)
    free = m.free_pages
    p.populate(a, 4 * 4096, write=False)
    m.check()
    f = m.file("f", 8192)
    q = m.spawn()
    b = q.mmap(8192, "rw", addr=0x400000, file=f, shared=True)
    q.mmap(8192, "rw", addr=0x402000)
    q.populate(b, 4 * 4096, write=True)
    assert q.rss == {"anon": 2, "file": 2, "shmem": 0, "swap": 0}
    m.check()
    assert free - m.free_pages >= 3


def test_stats_names_every_design_counter(m: mmuemu.Machine) -> None:
    for name in ("contpte_unfolds", "lock_breaks", "ipis", "fork_page_copies", "cow_reuses"):
        assert m.stats[name] == 0


@pytest.mark.parametrize("cpus", [(), (1,), (1, 2, 3)])
def test_fork_ipis_per_other_cpu(m: mmuemu.Machine, cpus: tuple[int, ...]) -> None:
    """flush_tlb_mm at the end of fork: on x86 one IPI to every other CPU the parent ran
    on; on arm64 one broadcast TLBI and no IPIs, however many CPUs."""
    p = m.spawn()
    a = p.mmap(MiB)
    p.populate(a, MiB)
    p.run_on(*cpus)
    with m.measure() as t:
        p.fork()
    assert t.counts["tlb_flush_mm"] == 1
    if m.kernel.arch.name == "x86_64":
        assert t.counts["ipis"] == len(cpus)
    else:
        assert t.counts["ipis"] == 0 and t.counts["tlbi_ops"] == 1
    with pytest.raises(mmuemu.InvalidArgument, match="do not exist"):
        p.run_on(4)


def test_shared_file_write_notify(m: mmuemu.Machine) -> None:
    """A shared writable mapping of a regular file maps pages read-only until written."""
    f = m.file("data", 4 * 4096)
    p = m.spawn()
    a = p.mmap(4 * 4096, "rw", shared=True, file=f)
    assert p.read(a) == 0 and not p.pte(a).write
    with m.measure() as t:
        p.write(a, 5)
    assert t.counts["page_faults"] == 1 and p.pte(a).write and p.pte(a).dirty
    shm = p.mmap(4096, "rw", shared=True)  # shmem: no write-notify
    p.read(shm)
    assert p.pte(shm).write
    m.check()


def test_sigbus_past_shmem_end_leaves_nothing(m: mmuemu.Machine) -> None:
    """A fault that fails with SIGBUS after allocating a page table gives it back."""
    p = m.spawn()
    a = p.mmap(4096, shared=True, align=2 * MiB)
    a = p.mremap(a, 4096, 2 * 4096)
    free = m.free_pages
    with pytest.raises(mmuemu.SegmentationFault, match="beyond the end"):
        p.read(a + 4096)
    assert m.free_pages == free
    m.check()


def test_zap_of_a_page_mapped_twice(m: mmuemu.Machine) -> None:
    p = m.spawn()
    s = p.mmap(2 * 4096, shared=True)
    r = p.mremap(s, 4096, 2 * 4096)  # moves page 0, grows over shmem page 1
    p.write(s + 4096, 7)
    assert p.read(r + 4096) == 7  # the same shmem page at two addresses
    assert p.folio(r + 4096).mapcount == 2
    lo, hi = min(r, s), max(r, s) + 2 * 4096
    p.munmap(lo, hi - lo)
    m.check()


def test_failed_fault_rolls_back_the_right_table(m: mmuemu.Machine) -> None:
    """A fault failing after it allocated upper tables unlinks those tables, not a stale
    copy of their entry elsewhere in the pool."""
    p = m.spawn()
    s = p.mmap(4096, shared=True)
    c = p.fork()
    p.read(s)
    c.read(s)
    c.exit()
    r = p.mremap(s, 4096, 2 * 4096, s - 3 * 4096)
    c = p.fork()
    with pytest.raises(mmuemu.SegmentationFault):
        c.read(r + 4096)
    m.check()
