"""COW / GUP-pin semantics of private anonymous memory across fork().

The scenarios follow the anonymous-memory cases of the kernel selftest
tools/testing/selftests/mm/cow.c (written here from scratch against the mmuemu
API). Memory contents are modelled by per-page tokens: the tested range is filled with
distinct tokens (per page, or per run of pages for 2 MiB THPs) before the test, so
a child mapping the wrong part of a large folio is caught as well as a missed COW
break.

Everything runs in one Python process: "the child writes" is ``c.write(...)``
and "the parent checks" is ``p.read(...)``.

Setups (as in cow.c's run_with_base_page / do_run_with_thp):

* ``base``                  one small page (folio order 0)
* ``thp2m-pmd``             a PMD-mapped THP
* ``thp2m-pte``             the THP PTE-mapped with ``split_huge_pmd``
* ``thp2m-pte-mprotect``    the THP PTE-mapped by mprotect()ing one subpage R/O and back
* ``*-single-pte``          all but the first page of the (PTE-mapped) THP discarded
* ``*-partial-mremap``      the upper half of the THP mremap()ed elsewhere
* ``*-partial-shared``      only the first page shared with a short-lived child
                            (MADV_DONTFORK on the rest, then MADV_DOFORK)
* ``mthp<N>k-*``            the same with mTHP folios of orders 2..8

Not modelled (no API): swapped-out variants, hugetlb, GUP-fast pins (the emulator
has a single pin path, so the "fast" variants are the same test), MADV_COLLAPSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import mmuemu

PAGE = 4096
PMD_ORDER = 9
THP_SIZE = PAGE << PMD_ORDER
MTHP_ORDERS = range(2, 9)
FORK_MODES = ("batched", "legacy")
ARCHES = ("x86_64", "arm64", "arm64-contpte")

INIT_TOKEN = 0x1000  # first token of the fill (see _fill_distinct)
MOD_TOKEN = 0xFF  # cow.c's memset(mem, 0xff, size)
CHILD_TOKEN = 0xC0DE


# --------------------------------------------------------------------------------------
# helpers


def _machine(fork_mode: str, arch: str = "x86_64"):
    """``arch`` is a platform: an architecture, "arm64-contpte" for arm64's contpte layer."""
    name, _, layer = arch.partition("-")
    return mmuemu.Machine(arch=name, memory="256MiB", cpus=4, fork_mode=fork_mode,
                          **({"contpte": True} if layer == "contpte" else {}))


def _npages(size: int) -> int:
    return size // PAGE


FILL_CHUNKS = 64  # at most this many stores per fill (each store costs ~0.5 ms)


def _fill_distinct(p, mem: int, size: int) -> np.ndarray:
    """Store distinct tokens into the range: every page gets its own token when the
    range has at most FILL_CHUNKS pages, else each run of npages/FILL_CHUNKS pages
    does. Return the expected per-page tokens."""
    n = _npages(size)
    chunk = -(-n // FILL_CHUNKS)
    for k, first in enumerate(range(0, n, chunk)):
        p.write(mem + first * PAGE, INIT_TOKEN + k, length=min(chunk, n - first) * PAGE)
    return INIT_TOKEN + np.arange(n, dtype=np.int64) // chunk


def _tokens(arr) -> np.ndarray:
    return np.asarray(arr, dtype=np.int64).reshape(-1)


def _assert_tokens(actual, expected, what: str) -> None:
    actual = _tokens(actual)
    expected = _tokens(expected)
    assert actual.shape == expected.shape, f"{what}: got {actual.size} pages, want {expected.size}"
    bad = np.flatnonzero(actual != expected)
    assert bad.size == 0, (
        f"{what}: {bad.size} of {actual.size} pages differ; first at page {bad[0]}: "
        f"got {actual[bad[0]]:#x}, want {expected[bad[0]]:#x}"
    )


def _assert_all(actual, token: int, what: str) -> None:
    _assert_tokens(actual, np.full(_tokens(actual).size, token, dtype=np.int64), what)


def _mprotect_dance(p, mem: int, size: int) -> None:
    """cow.c's mprotect(PROT_READ) + mprotect(PROT_READ|PROT_WRITE): the PTEs may be
    made writable again directly by mprotect, which must not break COW."""
    p.mprotect(mem, size, "r")
    p.mprotect(mem, size, "rw")


# --------------------------------------------------------------------------------------
# setups


@dataclass
class Region:
    m: object
    p: object
    mem: int  # start of the tested range
    size: int  # bytes tested
    order: int  # folio order backing the range
    init: np.ndarray  # tokens of [mem, mem + size) after the setup

    @property
    def npages(self) -> int:
        return _npages(self.size)


def _setup_base(fork_mode: str, arch: str = "x86_64") -> Region:
    m = _machine(fork_mode, arch)
    p = m.spawn(name="parent")
    p.set_folio_orders([0])
    mem = p.mmap(PAGE, prot="rw")
    p.madvise(mem, PAGE, "nohugepage")
    init = _fill_distinct(p, mem, PAGE)
    f = p.folio(mem)
    assert f.order == 0 and f.anon and f.anon_exclusive
    return Region(m, p, mem, PAGE, 0, init)


def _setup_thp(fork_mode: str, order: int, run: str, arch: str = "x86_64") -> Region:
    m = _machine(fork_mode, arch)
    p = m.spawn(name="parent")
    p.set_folio_orders([order])
    fsize = PAGE << order
    # cow.c maps twice the THP size for alignment; we ask for the alignment directly
    # and keep the spare upper half so the VMA extends past the THP.
    mem = p.mmap(2 * fsize, prot="rw", align=fsize)
    assert mem % fsize == 0
    p.madvise(mem, fsize, "hugepage")
    p.populate(mem, fsize, write=True)
    head = p.folio(mem)
    assert head.order == order, f"setup: wanted an order-{order} folio, got order {head.order}"
    assert p.folio(mem + fsize - PAGE).pfn == head.pfn, "setup: range not backed by one folio"
    init = _fill_distinct(p, mem, fsize)
    assert p.folio(mem).pfn == head.pfn, "setup: writing an exclusive folio must not move it"
    size = fsize

    if run == "pmd":
        assert order == PMD_ORDER
    elif run == "pte":
        if order == PMD_ORDER:
            p.split_huge_pmd(mem, fsize)
        # smaller folios are PTE-mapped already
    elif run == "pte-mprotect":
        # PTE-map the THP the way cow.c does: one subpage R/O and back.
        p.mprotect(mem + PAGE, PAGE, "r")
        p.mprotect(mem + PAGE, PAGE, "rw")
    elif run == "single-pte":
        if order == PMD_ORDER:
            p.split_huge_pmd(mem, fsize)
        # Discard everything but the first subpage: one PTE maps one subpage.
        p.madvise(mem + PAGE, fsize - PAGE, "dontneed")
        size = PAGE
        init = init[:1]
    elif run == "partial-mremap":
        half = fsize // 2
        target = p.mmap(half, prot="none")
        got = p.mremap(mem + half, half, half, new_addr=target)
        assert got == target
        _assert_tokens(p.read(target, length=half), init[half // PAGE :], "setup: moved half")
        size = half
        init = init[: half // PAGE]
    elif run == "partial-shared":
        # Share only the first page with a child that exits at once: the rest of
        # the folio is never shared.
        p.madvise(mem + PAGE, fsize - PAGE, "dontfork")
        c = p.fork()
        c.exit()
        p.madvise(mem + PAGE, fsize - PAGE, "dofork")
    else:  # pragma: no cover - table error
        raise AssertionError(run)

    assert p.folio(mem).order == order, "setup: the folio must stay large"
    if run == "pmd":
        assert p.pte(mem).pmd, "setup: THP not PMD-mapped"
    else:
        assert not p.pte(mem).pmd, "setup: THP still PMD-mapped"
    return Region(m, p, mem, size, order, init)


PMD_RUNS = ("pmd", "pte", "pte-mprotect", "single-pte", "partial-mremap", "partial-shared")
MTHP_RUNS = ("pte", "single-pte", "partial-mremap", "partial-shared")

SETUPS: list[tuple[str, int, str]] = [("base", 0, "base")]
SETUPS += [(f"thp2m-{run}", PMD_ORDER, run) for run in PMD_RUNS]
SETUPS += [(f"mthp{4 << k}k-{run}", k, run) for k in MTHP_ORDERS for run in MTHP_RUNS]


def _make_region(fork_mode: str, order: int, run: str, arch: str = "x86_64") -> Region:
    r = _setup_base(fork_mode, arch) if run == "base" else _setup_thp(fork_mode, order, run, arch)
    _assert_tokens(r.p.read(r.mem, length=r.size), r.init, "setup: parent contents")
    r.m.check()
    return r


@pytest.fixture(
    params=[(arch, mode, s) for arch in ARCHES for mode in FORK_MODES for s in SETUPS],
    ids=[f"{arch}-{mode}-{s[0]}" for arch in ARCHES for mode in FORK_MODES for s in SETUPS],
)
def region(request) -> Region:
    arch, fork_mode, (_name, order, run) = request.param
    return _make_region(fork_mode, order, run, arch)


# --------------------------------------------------------------------------------------
# anon_test_cases of cow.c


def _cow_in_parent(r: Region, do_mprotect: bool) -> None:
    p, mem, size = r.p, r.mem, r.size
    c = p.fork()
    _assert_tokens(c.read(mem, length=size), r.init, "child after fork")
    if do_mprotect:
        _mprotect_dance(p, mem, size)
    p.write(mem, MOD_TOKEN, length=size)
    _assert_all(p.read(mem, length=size), MOD_TOKEN, "parent after its write")
    _assert_tokens(c.read(mem, length=size), r.init, "leak from parent into child")
    r.m.check()
    c.exit()
    r.m.check()


def test_cow_in_parent(region: Region) -> None:
    """Basic COW after fork(): the parent's write must not reach the child."""
    _cow_in_parent(region, do_mprotect=False)


def test_cow_in_parent_mprotect(region: Region) -> None:
    """Same, with mprotect(R) + mprotect(RW) in the parent before writing."""
    _cow_in_parent(region, do_mprotect=True)


def test_cow_in_child(region: Region) -> None:
    """The other direction: the child's write must not reach the parent, and the
    parent's later write must not reach the child."""
    r = region
    p, mem, size = r.p, r.mem, r.size
    c = p.fork()
    c.write(mem, CHILD_TOKEN, length=size)
    _assert_all(c.read(mem, length=size), CHILD_TOKEN, "child after its write")
    _assert_tokens(p.read(mem, length=size), r.init, "leak from child into parent")
    p.write(mem, MOD_TOKEN, length=size)
    _assert_all(p.read(mem, length=size), MOD_TOKEN, "parent after its write")
    _assert_all(c.read(mem, length=size), CHILD_TOKEN, "leak from parent into child")
    r.m.check()
    c.exit()
    r.m.check()


def _vmsplice_in_child(r: Region, do_mprotect: bool) -> None:
    p, mem, size = r.p, r.mem, r.size
    c = p.fork()
    ref = c.get_pages(mem, size)  # vmsplice(): R/O FOLL_GET references
    old = _tokens(ref.read()).copy()
    _assert_tokens(old, r.init, "child's references at first")
    c.munmap(mem, size)
    if do_mprotect:
        _mprotect_dance(p, mem, size)
    p.write(mem, MOD_TOKEN, length=size)
    _assert_all(p.read(mem, length=size), MOD_TOKEN, "parent after its write")
    _assert_tokens(ref.read(), old, "leak from parent into child's references")
    r.m.check()
    ref.release()
    c.exit()
    r.m.check()


def test_vmsplice_in_child(region: Region) -> None:
    """vmsplice() + unmap in the child, write in the parent (CVE-2020-29374)."""
    _vmsplice_in_child(region, do_mprotect=False)


def test_vmsplice_in_child_mprotect(region: Region) -> None:
    _vmsplice_in_child(region, do_mprotect=True)


def _vmsplice_in_parent(r: Region, before_fork: bool) -> None:
    p, mem, size = r.p, r.mem, r.size
    ref = p.get_pages(mem, size) if before_fork else None
    c = p.fork()
    if ref is None:
        ref = p.get_pages(mem, size)
    old = _tokens(ref.read()).copy()
    _assert_tokens(old, r.init, "parent's references at first")
    p.munmap(mem, size)
    c.write(mem, CHILD_TOKEN, length=size)
    _assert_all(c.read(mem, length=size), CHILD_TOKEN, "child after its write")
    _assert_tokens(ref.read(), old, "leak from child into parent's references")
    r.m.check()
    ref.release()
    c.exit()
    r.m.check()


def test_vmsplice_before_fork(region: Region) -> None:
    """vmsplice() in the parent before fork(), unmap in the parent, write in the child."""
    _vmsplice_in_parent(region, before_fork=True)


def test_vmsplice_after_fork(region: Region) -> None:
    """vmsplice() in the parent after fork(), unmap in the parent, write in the child."""
    _vmsplice_in_parent(region, before_fork=False)


def test_iouring_ro(region: Region) -> None:
    """R/W longterm pin (io_uring fixed buffer), then map R/O and back: the write
    through the page tables must be visible through the pin."""
    r = region
    p, mem, size = r.p, r.mem, r.size
    pin = p.pin(mem, size, write=True, longterm=True)
    _assert_tokens(pin.read(), r.init, "pin at first")
    _mprotect_dance(p, mem, size)
    p.write(mem, MOD_TOKEN, length=size)
    _assert_all(p.read(mem, length=size), MOD_TOKEN, "parent after its write")
    _assert_all(pin.read(), MOD_TOKEN, "R/W longterm pin lost the write")
    r.m.check()
    pin.release()
    r.m.check()


def test_iouring_fork(region: Region) -> None:
    """R/W longterm pin, then fork(): the pinned pages are not shared with the child,
    so the parent's write is seen by the pin and not by the child."""
    r = region
    p, mem, size = r.p, r.mem, r.size
    pin = p.pin(mem, size, write=True, longterm=True)
    _assert_tokens(pin.read(), r.init, "pin at first")
    c = p.fork()
    assert c.pte(mem).pfn != p.pte(mem).pfn, "a pinned page was shared with the child"
    p.write(mem, MOD_TOKEN, length=size)
    _assert_all(p.read(mem, length=size), MOD_TOKEN, "parent after its write")
    _assert_all(pin.read(), MOD_TOKEN, "R/W longterm pin lost the write")
    _assert_tokens(c.read(mem, length=size), r.init, "leak from parent into child")
    r.m.check()
    c.exit()
    pin.release()
    r.m.check()


def test_ro_pin_on_shared(region: Region) -> None:
    """R/O longterm pin on a page COW-shared with a live child: the pin must unshare,
    so the parent's later write is visible through it (and not in the child)."""
    r = region
    p, mem, size = r.p, r.mem, r.size
    c = p.fork()
    pin = p.pin(mem, size, write=False, longterm=True)
    _assert_tokens(pin.read(), r.init, "pin at first")
    p.write(mem, MOD_TOKEN, length=size)
    _assert_all(pin.read(), MOD_TOKEN, "R/O longterm pin is not reliable")
    _assert_tokens(c.read(mem, length=size), r.init, "leak from parent into child")
    r.m.check()
    pin.release()
    c.exit()
    r.m.check()


def test_ro_pin_on_ro_previously_shared(region: Region) -> None:
    """R/O longterm pin on a R/O-mapped page whose sharer has exited."""
    r = region
    p, mem, size = r.p, r.mem, r.size
    c = p.fork()
    c.exit()
    pin = p.pin(mem, size, write=False, longterm=True)
    _assert_tokens(pin.read(), r.init, "pin at first")
    p.write(mem, MOD_TOKEN, length=size)
    _assert_all(p.read(mem, length=size), MOD_TOKEN, "parent after its write")
    _assert_all(pin.read(), MOD_TOKEN, "R/O longterm pin is not reliable")
    r.m.check()
    pin.release()
    r.m.check()


def test_ro_pin_on_ro_exclusive(region: Region) -> None:
    """R/O longterm pin on an exclusive page mapped R/O by mprotect."""
    r = region
    p, mem, size = r.p, r.mem, r.size
    _mprotect_dance(p, mem, size)
    pin = p.pin(mem, size, write=False, longterm=True)
    _assert_tokens(pin.read(), r.init, "pin at first")
    p.write(mem, MOD_TOKEN, length=size)
    _assert_all(p.read(mem, length=size), MOD_TOKEN, "parent after its write")
    _assert_all(pin.read(), MOD_TOKEN, "R/O longterm pin is not reliable")
    r.m.check()
    pin.release()
    r.m.check()


# --------------------------------------------------------------------------------------
# folio / PTE state after fork


EXCL_SETUPS = [
    ("base", 0, "base"),
    ("mthp64k-pte", 4, "pte"),
    ("thp2m-pte", PMD_ORDER, "pte"),
    ("thp2m-pmd", PMD_ORDER, "pmd"),
]


@pytest.mark.parametrize("fork_mode", FORK_MODES)
@pytest.mark.parametrize(
    ("order", "run"), [s[1:] for s in EXCL_SETUPS], ids=[s[0] for s in EXCL_SETUPS]
)
def test_fork_clears_anon_exclusive(arch: str, fork_mode: str, order: int, run: str) -> None:
    """After fork no page of the folio is AnonExclusive, on either side; both map the
    same page read-only. The first write then gives the writer its own page."""
    r = _make_region(fork_mode, order, run, arch)
    p, mem, size = r.p, r.mem, r.size
    samples = sorted({mem, mem + (size // 2 // PAGE) * PAGE, mem + size - PAGE})
    for a in samples:
        assert p.folio(a).anon_exclusive, f"page {a:#x} not exclusive before fork"
    c = p.fork()
    for a in samples:
        pf, cf = p.folio(a), c.folio(a)
        assert not pf.anon_exclusive, f"parent page {a:#x} still AnonExclusive after fork"
        assert not cf.anon_exclusive, f"child page {a:#x} AnonExclusive after fork"
        assert pf.pfn == cf.pfn, f"page {a:#x} not shared with the child"
        assert pf.order == cf.order == order
        assert pf.mapcount == 2 and cf.mapcount == 2, (pf.mapcount, cf.mapcount)
        assert pf.refcount >= 2
        pp, cp = p.pte(a), c.pte(a)
        assert pp.pfn == cp.pfn == pf.pfn + (a - mem) // PAGE
        assert not pp.write, f"parent PTE {a:#x} still writable after fork"
        assert not cp.write, f"child PTE {a:#x} writable after fork"
    r.m.check()

    p.write(mem, MOD_TOKEN)
    assert p.folio(mem).anon_exclusive, "the written page must be exclusive"
    assert p.pte(mem).write, "the written page must be mapped writable"
    assert p.pte(mem).pfn != c.pte(mem).pfn, "write to a shared page did not copy"
    assert p.read(mem) == MOD_TOKEN
    assert c.read(mem) == r.init[0]
    r.m.check()
    c.exit()
    r.m.check()


PIN_SETUPS = [
    ("base", 0, "base", 0),
    ("mthp64k-pte", 4, "pte", 1),
    ("thp2m-pte", PMD_ORDER, "pte", 1),
    ("thp2m-pmd", PMD_ORDER, "pmd", 1),
]


@pytest.mark.parametrize("pin_write", [False, True], ids=["ro-pin", "rw-pin"])
@pytest.mark.parametrize("fork_mode", FORK_MODES)
@pytest.mark.parametrize(
    ("order", "run", "index"), [s[1:] for s in PIN_SETUPS], ids=[s[0] for s in PIN_SETUPS]
)
def test_pinned_exclusive_page_copied_at_fork(
    arch: str, fork_mode: str, order: int, run: str, index: int, pin_write: bool
) -> None:
    """A longterm-pinned exclusive page is copied for the child at fork; the parent
    keeps the page and its writable PTE untouched (copy_present_page)."""
    r = _make_region(fork_mode, order, run, arch)
    p = r.p
    a = r.mem + index * PAGE
    pin = p.pin(a, PAGE, write=pin_write, longterm=True)
    assert p.folio(a).pinned, "pin did not mark the folio pinned"
    assert p.folio(a).anon_exclusive
    pfn = p.folio(a).pfn + index  # the pinned subpage
    assert p.pte(a).pfn == pfn
    assert p.pte(a).write

    c = p.fork()
    pp, cp = p.pte(a), c.pte(a)
    assert pp.present and cp.present
    assert pp.pfn == pfn, "the parent lost its pinned page"
    assert pp.write, "the parent's PTE of a pinned page was write-protected"
    assert p.folio(a).anon_exclusive, "the parent's pinned page lost AnonExclusive"
    assert cp.pfn != pfn, "the pinned page was shared with the child"
    assert cp.write, "the child's copy must be mapped writable (VM_WRITE)"
    cf = c.folio(a)
    assert cf.anon_exclusive and cf.order == 0 and not cf.pinned
    assert c.read(a) == r.init[index], "the child's copy has the wrong content"
    r.m.check()

    p.write(a, MOD_TOKEN)
    assert p.pte(a).pfn == pfn, "writing a pinned exclusive page must not move it"
    _assert_all(pin.read(), MOD_TOKEN, "pin lost the parent's write")
    assert c.read(a) == r.init[index], "leak from parent into child"
    c.write(a, CHILD_TOKEN)
    assert p.read(a) == MOD_TOKEN, "leak from child into parent"
    _assert_all(pin.read(), MOD_TOKEN, "child's write reached the parent's pin")
    r.m.check()
    pin.release()
    c.exit()
    r.m.check()


@pytest.mark.parametrize("fork_mode", FORK_MODES)
def test_small_page_reuse_and_copy(arch: str, fork_mode: str) -> None:
    """Small folio: a write while the child still maps the page copies it; once the
    sharer is gone, the write fault reuses the page in place."""
    r = _make_region(fork_mode, 0, "base", arch)
    p, mem = r.p, r.mem
    pfn = p.pte(mem).pfn

    c = p.fork()
    assert c.pte(mem).pfn == pfn
    p.write(mem, MOD_TOKEN)
    assert p.pte(mem).pfn != pfn, "write with a live sharer must copy"
    assert c.pte(mem).pfn == pfn and c.read(mem) == r.init[0]
    # The child is now the only mapper of the old page: its write reuses it.
    c.write(mem, CHILD_TOKEN)
    assert c.pte(mem).pfn == pfn, "sole mapper must reuse the page"
    assert c.folio(mem).anon_exclusive and c.pte(mem).write
    assert p.read(mem) == MOD_TOKEN
    c.exit()

    c2 = p.fork()
    c2.exit()
    pfn2 = p.pte(mem).pfn
    assert not p.pte(mem).write and not p.folio(mem).anon_exclusive
    p.write(mem, 0x77)
    assert p.pte(mem).pfn == pfn2, "previously shared page must be reused"
    assert p.folio(mem).anon_exclusive and p.pte(mem).write
    r.m.check()


# --------------------------------------------------------------------------------------
# non-anonymous: the shared zero page (cow.c's run_with_zeropage)


def test_zeropage_cow(arch: str) -> None:
    """Writing a private page that maps the shared zero page must not change what
    another mapping of the zero page reads."""
    m = _machine("batched", arch)
    p = m.spawn(name="parent")
    mem = p.mmap(PAGE, prot="rw")
    smem = p.mmap(PAGE, prot="r")
    p.populate(mem, PAGE, write=False)
    p.populate(smem, PAGE, write=False)
    assert p.read(mem) == 0 and p.read(smem) == 0
    assert p.pte(mem).pfn == p.pte(smem).pfn, "read faults should map the shared zero page"
    p.write(mem, MOD_TOKEN)
    assert p.read(mem) == MOD_TOKEN
    assert p.read(smem) == 0, "write leaked into the shared zero page"
    assert p.pte(mem).pfn != p.pte(smem).pfn
    m.check()


def test_zeropage_ro_longterm_pin(arch: str) -> None:
    """A R/O longterm pin of the zero page in a private writable mapping unshares it
    (gup_must_unshare on a COW mapping), so the later write is seen by the pin."""
    m = _machine("batched", arch)
    p = m.spawn(name="parent")
    mem = p.mmap(PAGE, prot="rw")
    p.populate(mem, PAGE, write=False)
    pin = p.pin(mem, PAGE, write=False, longterm=True)
    _assert_all(pin.read(), 0, "pin at first")
    p.write(mem, MOD_TOKEN)
    _assert_all(pin.read(), MOD_TOKEN, "R/O longterm pin of the zero page is not reliable")
    m.check()
    pin.release()
    m.check()
