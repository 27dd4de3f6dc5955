"""Bad input: the error classes of DESIGN.md, messages naming the value, state unchanged."""

from __future__ import annotations

import pytest

import mmuemu
from mmuemu.workload import populated

MiB = 1 << 20


@pytest.fixture
def proc(m: mmuemu.Machine) -> tuple[mmuemu.Machine, mmuemu.Process, int]:
    p = m.spawn()
    a = p.mmap(4 * MiB, align=2 * MiB)
    p.write(a, 1, length=MiB)
    return m, p, a


@pytest.mark.parametrize(
    ("call", "exc", "needle"),
    [
        (lambda p, a: p.mmap(4096, prot="rwz"), mmuemu.InvalidArgument, "'rwz'"),
        (lambda p, a: p.mmap(0), mmuemu.InvalidArgument, "length 0"),
        (lambda p, a: p.mmap(4096, align=3000), mmuemu.InvalidArgument, "align 3000"),
        (lambda p, a: p.mmap(4096, addr=a), mmuemu.InvalidArgument, "overlaps"),
        (lambda p, a: p.mmap(4096, addr=a + 1), mmuemu.InvalidArgument, "not page aligned"),
        (lambda p, a: p.munmap(a + 5, 4096), mmuemu.InvalidArgument, "not page aligned"),
        (lambda p, a: p.mprotect(a, 4096, "bogus"), mmuemu.InvalidArgument, "'bogus'"),
        (lambda p, a: p.mprotect(a, 8 * MiB, "r"), mmuemu.InvalidArgument, "not fully mapped"),
        (lambda p, a: p.madvise(a, 4096, "willneed"), mmuemu.InvalidArgument, "'willneed'"),
        (lambda p, a: p.mremap(a, 8 * MiB, 9 * MiB), mmuemu.InvalidArgument, "not inside one mapping"),
        (lambda p, a: p.write(a - 4096 * 1000, 1), mmuemu.SegmentationFault, "no mapping"),
        (lambda p, a: p.read(1 << 46), mmuemu.SegmentationFault, "no mapping"),
        (lambda p, a: p.set_folio_orders([10]), mmuemu.InvalidArgument, "[10]"),
        (lambda p, a: p.set_folio_orders([1]), mmuemu.InvalidArgument, "allowed: 0 and 2..9"),
        (lambda p, a: p.fork(mode="fast"), mmuemu.InvalidArgument, "'fast'"),
        (lambda p, a: p.folio(a + 3 * MiB), mmuemu.InvalidArgument, "no folio"),
    ],
)
def test_bad_input(proc, call, exc, needle: str) -> None:
    m, p, a = proc
    before = (m.free_pages, dict(p.rss), p.vmas)
    with pytest.raises(exc) as info:
        call(p, a)
    assert needle in str(info.value)
    assert isinstance(info.value, mmuemu.MmuEmuError)
    assert (m.free_pages, dict(p.rss), p.vmas) == before
    m.check()


def test_write_to_read_only(proc) -> None:
    m, p, a = proc
    p.mprotect(a, MiB, "r")
    with pytest.raises(mmuemu.SegmentationFault, match="does not allow"):
        p.write(a, 2)
    assert p.read(a) == 1
    p.mprotect(a, 4096, "none")
    with pytest.raises(mmuemu.SegmentationFault):
        p.read(a)
    p.mprotect(a, MiB, "rw")
    assert p.read(a) == 1
    assert p.pte(a).write  # exclusive anon pages become writable again (can_change_pte_writable)
    m.check()


def test_builtin_bases() -> None:
    assert issubclass(mmuemu.InvalidArgument, ValueError)
    assert issubclass(mmuemu.ConfigError, ValueError)
    assert issubclass(mmuemu.OutOfMemory, MemoryError)
    assert issubclass(mmuemu.InvariantError, AssertionError)


@pytest.mark.parametrize("bad", ["1GB", "-4GiB", "lots", 0, True])
def test_bad_memory_size(bad) -> None:
    with pytest.raises(mmuemu.InvalidArgument, match="memory"):
        mmuemu.Machine(memory=bad)


def test_unknown_arch() -> None:
    with pytest.raises(mmuemu.InvalidArgument, match="x86_64"):
        mmuemu.Machine(arch="sparc")


def test_released_twice(proc) -> None:
    m, p, a = proc
    ref = p.get_pages(a, 4096)
    ref.release()
    with pytest.raises(mmuemu.InvalidArgument, match="twice"):
        ref.release()
    m.check()


def test_mprotect_keeps_exclusive_thp_writable(m: mmuemu.Machine) -> None:
    """change_huge_pmd: an exclusive anon THP stays writable across rw -> rwx."""
    p, a = populated(m, 2 * MiB, 9, pte_mapped=False)
    assert p.pte(a).pmd and p.pte(a).write
    p.mprotect(a, 2 * MiB, "rwx")
    assert p.pte(a).write
    with m.measure() as t:
        p.write(a, 1)
    assert t.counts["page_faults"] == 0
    m.check()


def test_mprotect_same_flags_is_a_no_op(m: mmuemu.Machine) -> None:
    p = m.spawn()
    a = p.mmap(MiB)
    p.populate(a, MiB)
    with m.measure() as t:
        p.mprotect(a, MiB, "rw")
    assert sum(t.counts.values()) == 0
    with m.measure() as t:
        p.mprotect(a + MiB // 2, MiB // 2, "r")
    assert t.counts["pte_clears"] == 128
    m.check()


@pytest.mark.parametrize(("arch", "opts", "needle"), [
    ("x86_64", {"kpti": True}, "'kpti'"),
    ("arm64", {"contpte_fold": True}, "'contpte_fold'"),
    ("arm64", {"hafdbs": "yes"}, "'hafdbs'"),
])
def test_unknown_or_bad_arch_options(arch: str, opts: dict[str, object], needle: str) -> None:
    with pytest.raises(mmuemu.InvalidArgument, match=needle):
        mmuemu.Machine(arch=arch, memory="64MiB", **opts)
