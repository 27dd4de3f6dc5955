"""Stateful property tests: random mm syscall sequences against a plain-dict model.

A hypothesis ``RuleBasedStateMachine`` drives one small machine
(``Machine(arch="x86_64", memory="64MiB")``; :class:`Arm64MmModel` and
:class:`Arm64ContpteMmModel` the same on arm64, without and with contpte) with a
root process and the children forked from it (and from them), through random sequences of
mmap (private, shared, 2 MiB aligned THP candidates), populate, write, read, fork (batched
and legacy), mprotect, mremap (grow, shrink, move), madvise, munmap, FOLL_PIN longterm pins
and FOLL_GET references with release, exit, set_folio_orders and split_huge_pmd.

The model keeps, for every process, ``attrs``: page address -> the page's VMA attributes
(protection, shared-memory object and index, dontfork, wipeonfork) and ``mem``: page address
-> token of its private pages (absent: never written, reads 0).  Shared mappings point into a
shared-memory object (``Shm``) that every process mapping it sees.  Kernel semantics kept by
the model:

* fresh anon pages read 0; ``MADV_DONTNEED`` makes private pages read 0 again and keeps
  shared (shmem) contents;
* fork copies private pages (a snapshot), drops dontfork VMAs, gives wipeonfork VMAs zero
  pages and keeps shared mappings shared;
* mremap moves contents (and a shared mapping grown past its shmem object SIGBUSes);
* prot "none" faults reads and writes, "r" faults writes;
* a longterm pin (R/O or R/W) sees the owner's later writes to the pinned page until the
  owner stops mapping it (munmap, dontneed, exit), follows it across mremap, and never sees
  another process's writes; pins of shared memory see every write to the shmem page.

After every step: ``m.check()``, the VMAs against the model, a few random pages (read when
their PTE is present, so the check does not perturb THP allocation; a private page without
one must read 0 in the model), write-protection of non-writable mappings, and every pin's contents.
At teardown every readable page of every process is compared, all handles released, all
processes exited, and every physical page must be free again.

Emulator bugs this machine found have a probe (their minimal reproducer) below; while the
installed mmuemu still has one, the scenario that hits it is skipped (``# emulator bug:``),
and the workaround switches itself off once the probe passes.

Knobs (environment); default run: about 100 s on a 2-core machine:

* ``MMUEMU_PROP_EXAMPLES``: examples of ``test_mm_model`` (default 200, each of
  ``MMUEMU_PROP_STEPS`` = 30 steps);
* ``MMUEMU_PROP_LONG_EXAMPLES``: examples of ``test_mm_model_long`` (default 100, each of
  4 x 30 steps: deeper fork trees, pins alive across many forks);
* with ``CI`` set (as in .ci/run): 1000 + 250 examples, about 6 minutes;
* ``HYPOTHESIS_PROFILE=ci``: thousands of examples (2000 + 500, about 12 minutes);
  ``HYPOTHESIS_PROFILE=quick``: a smoke run (20 + 5).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, event, reject, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import mmuemu

PAGE = 4096
PMD_SIZE = 2 << 20
MAX_PROCS = 4  # live processes
MAX_MAPPED = 2048  # pages mapped per process (keeps the 64 MiB machine out of OOM)
MAX_HANDLES = 6  # live pins/refs
CHECK_PAGES = 4  # random pages compared with the model after every step
ADVICE = ("dontneed", "dontneed", "dontneed", "dontfork", "dofork", "wipeonfork", "keeponfork",
          "hugepage", "nohugepage")  # dontneed weighted: it changes contents
ORDERS = ([0], [2], [4], [9], [4, 2])

# VmFlag bits as shown by Process.vmas (include/linux/mm.h names)
VM_READ, VM_WRITE, VM_SHARED = 1 << 0, 1 << 1, 1 << 3
VM_DONTCOPY, VM_WIPEONFORK = 1 << 8, 1 << 9
VM_NAMES = {"READ": VM_READ, "WRITE": VM_WRITE, "SHARED": VM_SHARED, "DONTCOPY": VM_DONTCOPY,
            "WIPEONFORK": VM_WIPEONFORK}
MODELLED = VM_READ | VM_WRITE | VM_SHARED | VM_DONTCOPY | VM_WIPEONFORK


def _vm_flags(text: str) -> int:
    """The modelled bits of a ``Process.vmas`` flags string (``"251"`` or ``"READ|WRITE|..."``)."""
    text = text.split(".")[-1]
    if text.isdigit():
        return int(text) & MODELLED
    return functools.reduce(lambda f, name: f | VM_NAMES.get(name, 0), text.split("|"), 0)


# --------------------------------------------------------------------------------------
# settings


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


# CI (the CI variable set) runs 1000 examples on x86_64 and 250 on each arm64 variant
# (1500 in all, about 6 minutes on a 2-core machine)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("cirun" if os.environ.get("CI") else "default")
# (main examples, long-sequence examples) per profile
_PROFILES = {"default": (200, 100), "cirun": (800, 200), "ci": (2000, 500), "quick": (20, 5)}
_MAIN, _LONG = _PROFILES.get(_PROFILE, _PROFILES["default"])
EXAMPLES = _int_env("MMUEMU_PROP_EXAMPLES", _MAIN)
LONG_EXAMPLES = _int_env("MMUEMU_PROP_LONG_EXAMPLES", _LONG)
STEPS = _int_env("MMUEMU_PROP_STEPS", 30)
LONG_STEPS = 4 * STEPS


def _settings(examples: int, steps: int) -> settings:
    return settings(max_examples=max(1, examples), stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


MAIN_SETTINGS = _settings(EXAMPLES, STEPS)
LONG_SETTINGS = _settings(LONG_EXAMPLES, LONG_STEPS)


# --------------------------------------------------------------------------------------
# emulator bugs found by this machine, each probed with its minimal reproducer so its
# workaround switches itself off once the emulator is fixed


def _sigbus_leak() -> None:
    """emulator bug: a SIGBUS (access past the end of a shmem object) leaks the PTE table
    the fault allocated (fault_range rolls back only on OutOfMemory)."""
    m = mmuemu.Machine(arch="x86_64", memory="64MiB")
    p = m.spawn()
    a = p.mmap(PAGE, shared=True, align=PMD_SIZE)  # a shmem object of one page
    a = p.mremap(a, PAGE, 2 * PAGE)  # its second page is past the object's end
    with contextlib.suppress(mmuemu.SegmentationFault):
        p.read(a + PAGE)
    m.check()


def _sigbus_rollback() -> None:
    """emulator bug: when a fault fails (SIGBUS), the rollback of the page tables it made
    looks a new table's parent entry up by value in the whole table pool, so a stale entry in
    a freed table can match: that one is cleared, and the live parent entry is left pointing
    at the table being freed (fault.py _parents)."""
    m = mmuemu.Machine(arch="x86_64", memory="64MiB")
    p = m.spawn()
    s = p.mmap(PAGE, shared=True)  # a shmem object of one page
    c = p.fork()
    p.read(s)
    c.read(s)
    c.exit()  # frees c's tables (their rows keep stale entries)
    r = p.mremap(s, PAGE, 2 * PAGE, s - 3 * PAGE)  # moved, grown past the object's end
    c = p.fork()
    with contextlib.suppress(mmuemu.SegmentationFault):
        c.read(r + PAGE)  # SIGBUS: its new tables are rolled back
    m.check()


def _zap_dup_mapcount() -> None:
    """emulator bug: one zap of two PTEs mapping the same shmem page drops its mapcount once
    (zap.py: ``ph.mapcount[pfn[ent]] -= 1`` with repeated PFNs)."""
    m = mmuemu.Machine(arch="x86_64", memory="64MiB")
    p = m.spawn()
    s = p.mmap(2 * PAGE, shared=True)
    r = p.mremap(s, PAGE, 2 * PAGE)  # moves page 0 and grows over shmem page 1
    p.write(s + PAGE, 7)
    p.read(r + PAGE)  # shmem page 1 is now mapped at s+PAGE and r+PAGE
    lo, hi = min(r, s), max(r, s) + 2 * PAGE
    p.munmap(lo, hi - lo)
    m.check()


def _alloc_out_of_order() -> None:
    """emulator bug: PhysMem.new_folios takes its one-contiguous-run fast path when only the
    first and last heads are (n-1) folios apart, so blocks the buddy allocator returns out
    of address order are set up wrongly (one left looking free, a neighbour re-initialised)."""
    from mmuemu.mm.physmem import F_ALLOC, F_ANON, PhysMem  # internal: the bug is below the API

    ph = PhysMem(1024)
    got = ph.new_folios(0, ph.nr_free, F_ANON)  # every free page
    a = int(got[(got % 4 == 0) & (got > 16)][0])
    ph.ref_sub_and_free(np.array([a, a + 2, a + 3, a + 100]), 1)  # a + 1 stays allocated
    heads = ph.new_folios(0, 4, F_ANON)  # [a, a + 100, a + 2, a + 3]
    if not (ph.flags[heads] & F_ALLOC).all():
        raise mmuemu.InvariantError(f"allocated {heads.tolist()} but not all are set up")


@functools.cache
def emulator_bugs() -> dict[str, bool]:
    """Which known emulator bugs the installed mmuemu still has."""
    found = {}
    for name, probe in (("sigbus-leak", _sigbus_leak), ("sigbus-rollback", _sigbus_rollback),
                        ("zap-dup-mapcount", _zap_dup_mapcount),
                        ("alloc-out-of-order", _alloc_out_of_order)):
        try:
            probe()
            found[name] = False
        except mmuemu.InvariantError:
            found[name] = True
        except Exception:  # internals changed: assume fixed
            found[name] = False
    return found


@contextlib.contextmanager
def _skip_out_of_order_allocations() -> Iterator[None]:
    """emulator bug (alloc-out-of-order): discard an example when the buddy allocator returns
    blocks that new_folios would set up wrongly.  It only observes: the allocation itself is
    unchanged, the example is rejected before the damage can be reported as a failure."""
    if not emulator_bugs()["alloc-out-of-order"]:
        yield
        return
    from mmuemu.mm import physmem

    orig = physmem.PhysMem.alloc

    def alloc(self, order: int, n: int = 1):  # type: ignore[no-untyped-def]
        heads = orig(self, order, n)
        nr = 1 << order
        if (len(heads) > 2 and int(heads[-1]) - int(heads[0]) == (len(heads) - 1) * nr
                and (np.diff(heads) != nr).any()):
            event("example rejected: out-of-order allocation (emulator bug workaround)")
            reject()
        return heads

    physmem.PhysMem.alloc = alloc  # type: ignore[method-assign]
    try:
        yield
    finally:
        physmem.PhysMem.alloc = orig  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class Attr:
    """What the model knows of the VMA mapping one page."""

    prot: str
    shm: int | None = None  # shared-memory object (shared=True mappings)
    idx: int = 0  # page index in that object
    dontfork: bool = False
    wipeonfork: bool = False

    def vm_flags(self) -> int:
        f = {"none": 0, "r": VM_READ, "rw": VM_READ | VM_WRITE}[self.prot]
        if self.shm is not None:
            f |= VM_SHARED
        if self.dontfork:
            f |= VM_DONTCOPY
        if self.wipeonfork:
            f |= VM_WIPEONFORK
        return f


@dataclass
class Shm:
    """Shared anonymous memory (a shmem file of ``size`` pages)."""

    size: int
    tok: dict[int, int] = field(default_factory=dict)


@dataclass(eq=False)
class ProcModel:
    proc: mmuemu.Process
    pid: int
    attrs: dict[int, Attr] = field(default_factory=dict)
    mem: dict[int, int] = field(default_factory=dict)  # private pages; absent = 0
    alive: bool = True


@dataclass(eq=False)
class HandleModel:
    """A pin or reference and what each of its pages must read.

    ``track[i]``: ``("shm", obj, idx)`` (always the object's token), ``("priv", pid, addr)``
    (the owner still maps the pinned page there; ``expected`` follows the owner's writes),
    ``"frozen"`` (nobody maps the page any more: ``expected`` for ever) or ``"unknown"``.
    """

    handle: object
    kind: str
    owner: int
    addrs: list[int]
    expected: list[int]
    track: list[object]
    released: bool = False


def _pages(start: int, n: int) -> list[int]:
    return [start + i * PAGE for i in range(n)]


def _runs(addrs: list[int]) -> list[tuple[int, int]]:
    """Maximal runs (start, npages) of consecutive pages in a sorted list."""
    out: list[tuple[int, int]] = []
    for a in addrs:
        if out and out[-1][0] + out[-1][1] * PAGE == a:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((a, 1))
    return out


def _step(fn):  # type: ignore[no-untyped-def]
    """Mark the machine busy until the next invariant pass (so teardown knows a step failed)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.busy = True
        return fn(self, *args, **kwargs)

    return wrapper


PROC = st.integers(0, MAX_PROCS - 1)
SIGBUS = "SIGBUS"  # an access past the end of a shmem object


class MmModel(RuleBasedStateMachine):
    handles = Bundle("handles")
    #: the architecture the machine emulates, and its options
    ARCH = "x86_64"
    OPTIONS: dict[str, bool] = {}  # noqa: RUF012

    def __init__(self) -> None:
        super().__init__()
        self.m = mmuemu.Machine(arch=self.ARCH, memory="64MiB", **self.OPTIONS)
        self.free0 = self.m.free_pages
        self.procs: list[ProcModel] = [ProcModel(self.m.spawn("root"), 0)]
        self.pids = itertools.count(1)
        self.shms: dict[int, Shm] = {}
        self.shm_ids = itertools.count(1)
        self.tokens = itertools.count(0x1000)
        self.tracked: dict[tuple[int, int], list[tuple[HandleModel, int]]] = defaultdict(list)
        self.live_handles: list[HandleModel] = []
        self.steps = 0
        self.busy = False
        self.bugs = emulator_bugs()

    # ---------------------------------------------------------------- model helpers
    def _tok(self, pm: ProcModel, a: int) -> int:
        at = pm.attrs[a]
        if at.shm is not None:
            return self.shms[at.shm].tok.get(at.idx, 0)
        return pm.mem.get(a, 0)

    def _beyond_eof(self, at: Attr) -> bool:
        return at.shm is not None and at.idx >= self.shms[at.shm].size

    def _access_error(self, pm: ProcModel, start: int, n: int, write: bool):  # type: ignore[no-untyped-def]
        """The error a CPU access (or GUP) of [start, start + n pages) must raise, or None.

        VMA permissions are checked over the whole range first (SIGSEGV), then the pages
        are faulted (``SIGBUS`` past the end of a shmem object)."""
        ats = [pm.attrs.get(a) for a in _pages(start, n)]
        for at in ats:
            if at is None or at.prot == "none" or (write and at.prot != "rw"):
                return mmuemu.SegmentationFault
        if any(self._beyond_eof(at) for at in ats if at is not None):
            return SIGBUS
        return None

    def _prepare_access(self, pm: ProcModel, start: int, n: int, write: bool):  # type: ignore[no-untyped-def]
        """(expected error, pages to access), or None to skip the access."""
        err = self._access_error(pm, start, n, write)
        if err == SIGBUS:
            if self.bugs["sigbus-leak"] or self.bugs["sigbus-rollback"]:
                # emulator bug: a fault failing with SIGBUS leaks its new tables (_sigbus_leak) or
                # rolls them back wrongly (_sigbus_rollback)
                event("SIGBUS access skipped (emulator bug workaround)")
                return None
            err = mmuemu.SegmentationFault  # the emulator's SIGBUS
        return err, n

    def _fully_mapped(self, pm: ProcModel, start: int, n: int) -> bool:
        return all(a in pm.attrs for a in _pages(start, n))

    def _pick(self, pi: int, need_pages: bool = True) -> ProcModel | None:
        cands = [pm for pm in self.procs if pm.attrs or not need_pages]
        return cands[pi % len(cands)] if cands else None

    def _has_pages(self) -> bool:
        return any(pm.attrs for pm in self.procs)

    def _draw_range(self, data, pm: ProcModel, max_pages: int = 64,  # type: ignore[no-untyped-def]
                    kinds: tuple[str, ...] = ("page", "page", "run", "wild")) -> tuple[int, int]:
        """A page-aligned range of the process's mappings: (start, npages).

        "run": a whole run of consecutive mapped pages; "page": up to ``max_pages`` pages
        inside one run; "wild": anywhere near a mapping, holes included."""
        keys = sorted(pm.attrs)
        kind = data.draw(st.sampled_from(kinds), label="range kind")
        if kind == "wild":
            start = data.draw(st.sampled_from(keys), label="page")
            start += data.draw(st.integers(-4, 4), label="shift") * PAGE
            return start, data.draw(st.integers(1, max_pages), label="npages")
        start, rn = data.draw(st.sampled_from(_runs(keys)), label="run")
        if kind == "run":
            return start, rn
        off = data.draw(st.integers(0, rn - 1), label="offset")
        return start + off * PAGE, data.draw(st.integers(1, min(max_pages, rn - off)), label="npages")

    def _vma_pieces(self, pm: ProcModel, start: int, n: int) -> list[tuple[int, int]]:
        """[s, e) of each VMA's part of [start, start + n pages)."""
        end = start + n * PAGE
        return [(max(s, start), min(e, end)) for s, e, _ in pm.proc.vmas if s < end and e > start]

    def _dup_shm(self, pm: ProcModel, start: int, n: int) -> bool:
        """Does the range map one shmem page at two addresses (mremap can do that)?"""
        seen = [(at.shm, at.idx) for a in _pages(start, n)
                if (at := pm.attrs.get(a)) is not None and at.shm is not None]
        return len(seen) != len(set(seen))

    def _expect(self, err, fn):  # type: ignore[no-untyped-def]
        """Run ``fn``; it must raise ``err`` (None: must succeed).  Returns (ok, result).

        OutOfMemory is accepted (a failed operation changes nothing) only on a nearly full
        machine."""
        if err is not None:
            with pytest.raises(err):
                fn()
            event(f"expected {err.__name__}")
            return False, None
        try:
            return True, fn()
        except mmuemu.OutOfMemory:
            assert self.m.free_pages < 4096, f"OutOfMemory with {self.m.free_pages} pages free"
            event("out of memory")
            return False, None

    def _unmap_model(self, pm: ProcModel, addrs) -> None:  # type: ignore[no-untyped-def]
        """The process stops mapping these pages."""
        for a in addrs:
            if pm.attrs.pop(a, None) is not None:
                pm.mem.pop(a, None)
                self._freeze(pm, a)

    def _freeze(self, pm: ProcModel, a: int) -> None:
        for h, i in self.tracked.pop((pm.pid, a), []):
            h.track[i] = "frozen"

    # ---------------------------------------------------------------- rules: mappings
    @initialize(orders=st.sampled_from(ORDERS))
    @_step
    def init_orders(self, orders: list[int]) -> None:
        self.procs[0].proc.set_folio_orders(orders)

    @rule(pi=PROC, n=st.integers(1, 64), shared=st.sampled_from([False, False, True]),
          prot=st.sampled_from(["rw"] * 6 + ["r", "none"]))
    @_step
    def mmap(self, pi: int, n: int, shared: bool, prot: str) -> None:
        self._mmap(self._pick(pi, need_pages=False), n, prot, shared, None)

    @rule(pi=PROC, n=st.integers(512, 1024), prot=st.sampled_from(["rw", "rw", "r"]))
    @_step
    def mmap_thp(self, pi: int, n: int, prot: str) -> None:
        self._mmap(self._pick(pi, need_pages=False), n, prot, False, PMD_SIZE)

    def _mmap(self, pm: ProcModel | None, n: int, prot: str, shared: bool, align: int | None) -> None:
        assert pm is not None
        if len(pm.attrs) + n > MAX_MAPPED:
            event("mmap skipped: process full")
            return
        addr = pm.proc.mmap(n * PAGE, prot, shared=shared, align=align)
        assert addr % (align or PAGE) == 0, f"mmap returned misaligned {addr:#x}"
        sid = None
        if shared:
            sid = next(self.shm_ids)
            self.shms[sid] = Shm(n)
        for i, a in enumerate(_pages(addr, n)):
            assert a not in pm.attrs, f"mmap returned {addr:#x} overlapping page {a:#x}"
            pm.attrs[a] = Attr(prot, sid, i if shared else 0)

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, data=st.data())
    @_step
    def munmap(self, pi: int, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm, max_pages=1100)
        if self.bugs["zap-dup-mapcount"] and self._dup_shm(pm, start, n):
            # emulator bug: one zap of two PTEs mapping the same shmem page drops its mapcount once
            event("munmap split per VMA (emulator bug workaround)")
            for s, e in self._vma_pieces(pm, start, n):
                pm.proc.munmap(s, e - s)
        else:
            pm.proc.munmap(start, n * PAGE)
        self._unmap_model(pm, _pages(start, n))

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, prot=st.sampled_from(["rw", "rw", "r", "none"]), data=st.data())
    @_step
    def mprotect(self, pi: int, prot: str, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm)
        err = None if self._fully_mapped(pm, start, n) else mmuemu.InvalidArgument
        ok, _ = self._expect(err, lambda: pm.proc.mprotect(start, n * PAGE, prot))
        if ok:
            for a in _pages(start, n):
                pm.attrs[a] = replace(pm.attrs[a], prot=prot)

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, advice=st.sampled_from(ADVICE), data=st.data())
    @_step
    def madvise(self, pi: int, advice: str, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm, max_pages=1100)
        pages = _pages(start, n)
        err = None
        if not self._fully_mapped(pm, start, n):
            err = mmuemu.InvalidArgument
        elif advice == "wipeonfork" and any(pm.attrs[a].shm is not None for a in pages):
            err = mmuemu.InvalidArgument  # only private anonymous memory
        if (err is None and advice == "dontneed" and self.bugs["zap-dup-mapcount"]
                and self._dup_shm(pm, start, n)):
            # emulator bug: one zap of two PTEs mapping the same shmem page drops its mapcount once
            event("dontneed split per VMA (emulator bug workaround)")
            for s, e in self._vma_pieces(pm, start, n):
                pm.proc.madvise(s, e - s, advice)
            ok = True
        else:
            ok, _ = self._expect(err, lambda: pm.proc.madvise(start, n * PAGE, advice))
        if not ok:
            return
        if advice == "dontneed":
            for a in pages:
                if pm.attrs[a].shm is None:  # shmem keeps its contents
                    pm.mem.pop(a, None)
                    self._freeze(pm, a)
            return
        change = {"dontfork": {"dontfork": True}, "dofork": {"dontfork": False},
                  "wipeonfork": {"wipeonfork": True}, "keeponfork": {"wipeonfork": False}}
        if advice in change:
            for a in pages:
                pm.attrs[a] = replace(pm.attrs[a], **change[advice])

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, kind=st.sampled_from(["grow", "shrink", "same", "move", "move-grow",
                                         "move-shrink"]), data=st.data())
    @_step
    def mremap(self, pi: int, kind: str, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        vmas = pm.proc.vmas
        vs, ve, _ = data.draw(st.sampled_from(vmas), label="vma")
        vn = (ve - vs) // PAGE
        off = data.draw(st.integers(0, vn - 1), label="offset")
        old_n = data.draw(st.integers(1, vn - off), label="old pages")
        addr = vs + off * PAGE
        if kind.endswith("grow"):
            new_n = old_n + data.draw(st.integers(1, 64), label="grow by")
        elif kind.endswith("shrink"):
            new_n = data.draw(st.integers(1, old_n), label="new pages")
        else:
            new_n = old_n
        if len(pm.attrs) - old_n + new_n > MAX_MAPPED:
            event("mremap skipped: process full")
            return
        new_addr = None
        if kind.startswith("move"):
            where = data.draw(st.sampled_from(["below", "onto"]), label="destination")
            if where == "below":  # a free range below every mapping (mmap is top-down)
                gap = data.draw(st.integers(1, 600), label="gap")
                align = data.draw(st.sampled_from([PAGE, PMD_SIZE]), label="dest align")
                new_addr = (min(pm.attrs) - (new_n + gap) * PAGE) & ~(align - 1)
            else:  # onto other mappings of the process: they are unmapped first
                new_addr = data.draw(st.sampled_from(sorted(pm.attrs)), label="dest page")
                if new_addr < addr + old_n * PAGE and addr < new_addr + new_n * PAGE:
                    with pytest.raises(mmuemu.InvalidArgument):
                        pm.proc.mremap(addr, old_n * PAGE, new_n * PAGE, new_addr)
                    event("mremap onto itself refused")
                    return
                if self.bugs["zap-dup-mapcount"] and self._dup_shm(pm, new_addr, new_n):
                    # emulator bug: one zap of two PTEs mapping the same shmem page drops its mapcount once
                    event("mremap onto a doubly mapped shmem page skipped (emulator bug workaround)")
                    return
        in_place = (new_addr is None and new_n > old_n and addr + old_n * PAGE == ve
                    and all(a not in pm.attrs for a in _pages(ve, new_n - old_n)))
        ok, r = self._expect(None, lambda: pm.proc.mremap(addr, old_n * PAGE, new_n * PAGE, new_addr))
        if not ok:
            return
        assert r % PAGE == 0
        if new_addr is not None:
            assert r == new_addr, f"MREMAP_FIXED to {new_addr:#x} returned {r:#x}"
        elif new_n <= old_n or in_place:
            assert r == addr, f"mremap should have stayed at {addr:#x}, returned {r:#x}"
        else:
            assert r != addr
        self._apply_mremap(pm, addr, old_n, new_n, new_addr, r)

    def _apply_mremap(self, pm: ProcModel, addr: int, old_n: int, new_n: int,
                      new_addr: int | None, r: int) -> None:
        base = pm.attrs[addr]
        if new_addr is not None:
            self._unmap_model(pm, _pages(new_addr, new_n))
        move = min(old_n, new_n)
        if r != addr:
            for a in _pages(r, new_n):
                assert a not in pm.attrs, f"mremap moved onto mapped page {a:#x}"
            for i in range(move):
                src, dst = addr + i * PAGE, r + i * PAGE
                pm.attrs[dst] = pm.attrs.pop(src)
                if src in pm.mem:
                    pm.mem[dst] = pm.mem.pop(src)
                moved = self.tracked.pop((pm.pid, src), [])
                for h, j in moved:
                    h.track[j] = ("priv", pm.pid, dst)
                if moved:
                    self.tracked[(pm.pid, dst)].extend(moved)
        self._unmap_model(pm, _pages(addr + move * PAGE, old_n - move))
        for i in range(move, new_n):
            a = r + i * PAGE
            assert a not in pm.attrs, f"mremap grew onto mapped page {a:#x}"
            pm.attrs[a] = replace(base, idx=base.idx + i) if base.shm is not None else base

    # ---------------------------------------------------------------- rules: memory access
    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, write=st.booleans(), data=st.data())
    @_step
    def populate(self, pi: int, write: bool, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm)
        prep = self._prepare_access(pm, start, n, write)
        if prep is None:
            return
        err, n = prep
        self._expect(err, lambda: pm.proc.populate(start, n * PAGE, write=write))

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, data=st.data())
    @_step
    def write(self, pi: int, data) -> None:  # type: ignore[no-untyped-def]
        self._write(pi, data, ("page", "page", "run", "wild"))

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, data=st.data())
    @_step
    def write_run(self, pi: int, data) -> None:  # type: ignore[no-untyped-def]
        """Writes of whole runs (a 2 MiB-aligned one can get a PMD-mapped THP)."""
        self._write(pi, data, ("run",))

    def _write(self, pi: int, data, kinds: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
        """One store over the range (one token), or a store per page (a token per page)."""
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm, kinds=kinds)
        prep = self._prepare_access(pm, start, n, True)
        if prep is None:
            return
        err, n = prep
        pages = _pages(start, n)
        if err is None and n <= 64 and data.draw(st.booleans(), label="token per page"):
            tokens = [next(self.tokens) for _ in pages]

            def store() -> None:
                for a, t in zip(pages, tokens, strict=True):
                    pm.proc.write(a, t)
        else:
            tokens = [next(self.tokens)] * n

            def store() -> None:
                pm.proc.write(start, tokens[0], length=n * PAGE)
        ok, _ = self._expect(err, store)
        if not ok:
            return
        for a, t in zip(pages, tokens, strict=True):
            at = pm.attrs[a]
            if at.shm is not None:
                self.shms[at.shm].tok[at.idx] = t
            else:
                pm.mem[a] = t
                for h, i in self.tracked.get((pm.pid, a), []):
                    h.expected[i] = t

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, data=st.data())
    @_step
    def read(self, pi: int, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm)
        prep = self._prepare_access(pm, start, n, False)
        if prep is None:
            return
        err, n = prep
        ok, got = self._expect(err, lambda: pm.proc.read(start, length=n * PAGE))
        if ok:
            want = [self._tok(pm, a) for a in _pages(start, n)]
            _assert_tokens(got, want, f"{pm.proc.name} read [{start:#x}, +{n} pages)")

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, data=st.data())
    @_step
    def split_huge_pmd(self, pi: int, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm, max_pages=1100)
        pm.proc.split_huge_pmd(start, n * PAGE)

    @rule(pi=PROC, orders=st.sampled_from(ORDERS))
    @_step
    def set_folio_orders(self, pi: int, orders: list[int]) -> None:
        pm = self._pick(pi, need_pages=False)
        assert pm is not None
        pm.proc.set_folio_orders(orders)

    # ---------------------------------------------------------------- rules: processes
    @precondition(lambda self: len(self.procs) < MAX_PROCS)
    @rule(pi=PROC, mode=st.sampled_from(["batched", "legacy"]))
    @_step
    def fork(self, pi: int, mode: str) -> None:
        parent = self._pick(pi, need_pages=False)
        assert parent is not None
        ok, c = self._expect(None, lambda: parent.proc.fork(mode=mode))
        if not ok:
            return
        child = ProcModel(c, next(self.pids))
        for a, at in parent.attrs.items():
            if at.dontfork:
                continue
            child.attrs[a] = at
            if at.shm is None and not at.wipeonfork and a in parent.mem:
                child.mem[a] = parent.mem[a]
        self.procs.append(child)

    @precondition(lambda self: len(self.procs) > 1)
    @rule(pi=PROC)
    @_step
    def exit(self, pi: int) -> None:
        pm = self.procs[1 + pi % (len(self.procs) - 1)]  # never the root
        pm.proc.exit()
        self._unmap_model(pm, list(pm.attrs))
        pm.alive = False
        self.procs.remove(pm)
        with pytest.raises(mmuemu.InvalidArgument):
            pm.proc.read(0x10000)

    # ---------------------------------------------------------------- rules: GUP
    @precondition(lambda self: self._has_pages() and len(self.live_handles) < MAX_HANDLES)
    @rule(target=handles, pi=PROC, kind=st.sampled_from(["pin-ro", "pin-rw", "ref"]),
          data=st.data())
    @_step
    def gup(self, pi: int, kind: str, data):  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm, max_pages=16, kinds=("page", "page", "page", "wild"))
        write = kind == "pin-rw"
        prep = self._prepare_access(pm, start, n, write)
        if prep is None:
            return multiple()
        err, n = prep
        if kind == "ref":
            ok, h = self._expect(err, lambda: pm.proc.get_pages(start, n * PAGE))
        else:
            ok, h = self._expect(err, lambda: pm.proc.pin(start, n * PAGE, write=write, longterm=True))
        if not ok:
            return multiple()
        addrs = _pages(start, n)
        expected = [self._tok(pm, a) for a in addrs]
        _assert_tokens(h.read(), expected, f"{kind} of [{start:#x}, +{n} pages) right after taking it")
        hm = HandleModel(h, kind, pm.pid, addrs, expected, [])
        for i, a in enumerate(addrs):
            at = pm.attrs[a]
            if at.shm is not None:
                hm.track.append(("shm", at.shm, at.idx))
            elif kind == "ref":
                hm.track.append("unknown")
            else:
                hm.track.append(("priv", pm.pid, a))
                self.tracked[(pm.pid, a)].append((hm, i))
        self.live_handles.append(hm)
        return hm

    @rule(hm=consumes(handles))
    @_step
    def release(self, hm: HandleModel) -> None:
        self._check_handle(hm)
        hm.handle.release()
        self._forget(hm)
        with pytest.raises(mmuemu.InvalidArgument):
            hm.handle.release()
        with pytest.raises(mmuemu.InvalidArgument):
            hm.handle.read()

    def _forget(self, hm: HandleModel) -> None:
        hm.released = True
        self.live_handles.remove(hm)
        for tr in hm.track:
            if isinstance(tr, tuple) and tr[0] == "priv":
                key = (tr[1], tr[2])
                self.tracked[key] = [e for e in self.tracked[key] if e[0] is not hm]
                if not self.tracked[key]:
                    del self.tracked[key]

    # ---------------------------------------------------------------- rules: bad inputs
    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, which=st.integers(0, 13), data=st.data())
    @_step
    def bad_input(self, pi: int, which: int, data) -> None:  # type: ignore[no-untyped-def]
        """Requests the kernel refuses: they raise and change nothing."""
        pm = self._pick(pi)
        assert pm is not None
        p = pm.proc
        a = data.draw(st.sampled_from(sorted(pm.attrs)), label="page")
        bad_str = data.draw(st.sampled_from(["", "rwz", "w", "free", "RW", "cold"]), label="bad string")
        inval = mmuemu.InvalidArgument
        calls = [
            (inval, lambda: p.mmap(PAGE, prot=bad_str)),
            (inval, lambda: p.mprotect(a, PAGE, bad_str)),
            (inval, lambda: p.madvise(a, PAGE, bad_str)),
            (inval, lambda: p.munmap(a + 1, PAGE)),
            (inval, lambda: p.mprotect(a + 123, PAGE, "r")),
            (inval, lambda: p.madvise(a, 0, "dontneed")),
            (inval, lambda: p.mmap(0)),
            (inval, lambda: p.mmap(PAGE, align=3 * PAGE)),
            (inval, lambda: p.set_folio_orders([data.draw(st.sampled_from([-1, 1, 10, 12]))])),
            (inval, lambda: p.fork(mode="eager")),
            (inval, lambda: p.mmap(PAGE, addr=a)),  # MAP_FIXED_NOREPLACE onto a mapping
            (inval, lambda: p.mremap(a, PAGE, 2 * PAGE, a - PAGE)),  # overlapping MREMAP_FIXED
            (inval, lambda: p.mremap(a + 7, PAGE, 2 * PAGE)),
            (inval, lambda: self._mremap_across(p)),
        ]
        err, fn = calls[which]
        assert issubclass(err, mmuemu.MmuEmuError)
        with pytest.raises(err):
            fn()
        self.m.check()

    @staticmethod
    def _mremap_across(p: mmuemu.Process) -> None:
        """mremap of a range running past the end of its VMA (EFAULT)."""
        e = p.vmas[-1][1]
        p.mremap(e - PAGE, 2 * PAGE, 2 * PAGE)

    # ---------------------------------------------------------------- checks
    @invariant()
    def consistent(self) -> None:
        self.steps += 1
        self.m.check()
        rng = random.Random(self.steps)
        for pm in self.procs:
            self._check_vmas(pm)
        mapped = [pm for pm in self.procs if pm.attrs]
        for _ in range(CHECK_PAGES if mapped else 0):
            pm = rng.choice(mapped)
            self._check_page(pm, rng.choice(list(pm.attrs)))
        for hm in self.live_handles:
            self._check_handle(hm)
        self.busy = False

    def _check_vmas(self, pm: ProcModel) -> None:
        """The VMAs cover exactly the model's pages; their flags match at both ends of each
        (the model's attributes are uniform inside a VMA unless a boundary is wrong)."""
        seen = 0
        for s, e, flags in pm.proc.vmas:
            f = _vm_flags(flags)
            assert all(map(pm.attrs.__contains__, range(s, e, PAGE))), (
                f"{pm.proc.name}: VMA [{s:#x}, {e:#x}) maps pages the model does not")
            for a in (s, e - PAGE):
                at = pm.attrs[a]
                assert at.vm_flags() == f, (f"{pm.proc.name}: VMA [{s:#x}, {e:#x}) flags {f:#x}, "
                                            f"model page {a:#x}: {at} ({at.vm_flags():#x})")
            seen += (e - s) // PAGE
        assert seen == len(pm.attrs), f"{pm.proc.name}: VMAs cover {seen} pages, model {len(pm.attrs)}"

    def _check_page(self, pm: ProcModel, a: int) -> None:
        at = pm.attrs[a]
        p = pm.proc
        pte = p.pte(a)
        if at.prot != "rw":
            assert not pte.write, f"{p.name}: writable PTE at {a:#x} in a {at.prot!r} mapping"
        if at.prot == "none":
            with pytest.raises(mmuemu.SegmentationFault):
                p.read(a)
            return
        if self._beyond_eof(at):
            if self.bugs["sigbus-leak"] or self.bugs["sigbus-rollback"]:
                return  # emulator bug: a fault failing with SIGBUS breaks page tables (_sigbus_*)
            with pytest.raises(mmuemu.SegmentationFault):
                p.read(a)
            return
        want = self._tok(pm, a)
        if at.shm is None and not pte.present:
            assert want == 0, f"{p.name}: {a:#x} not mapped, but the model holds {want:#x}"
            return
        got = p.read(a)
        assert got == want, f"{p.name}: read {a:#x} = {got:#x}, model {want:#x} ({at})"
        if pte.present and not pte.special:
            event(f"page checked: folio order {p.folio(a).order}{' PMD-mapped' if pte.pmd else ''}")

    def _check_handle(self, hm: HandleModel) -> None:
        got = hm.handle.read()
        for i, tr in enumerate(hm.track):
            if tr == "unknown":
                continue
            if isinstance(tr, tuple) and tr[0] == "shm":
                want = self.shms[tr[1]].tok.get(tr[2], 0)
            else:
                want = hm.expected[i]
            assert int(got[i]) == want, (
                f"{hm.kind} taken by pid {hm.owner} at {hm.addrs[i]:#x} ({tr}): reads "
                f"{int(got[i]):#x}, want {want:#x}")

    def teardown(self) -> None:
        if self.busy:  # a step failed: report that, not a follow-up
            return
        for pm in self.procs:
            readable = [a for a in sorted(pm.attrs)
                        if pm.attrs[a].prot != "none" and not self._beyond_eof(pm.attrs[a])]
            for start, n in _runs(readable):
                got = pm.proc.read(start, length=n * PAGE)
                _assert_tokens(got, [self._tok(pm, a) for a in _pages(start, n)],
                               f"teardown: {pm.proc.name} [{start:#x}, +{n} pages)")
        for hm in list(self.live_handles):
            self._check_handle(hm)
            hm.handle.release()
            self._forget(hm)
        for pm in reversed(self.procs):
            pm.proc.exit()
        self.m.check()
        assert self.m.free_pages == self.free0, (
            f"{self.free0 - self.m.free_pages} pages leaked after every process exited")


def _assert_tokens(got, want, what: str) -> None:  # type: ignore[no-untyped-def]
    got = np.asarray(got, dtype=np.int64).reshape(-1)
    want = np.asarray(want, dtype=np.int64).reshape(-1)
    assert got.shape == want.shape, f"{what}: {got.size} pages, want {want.size}"
    bad = np.flatnonzero(got != want)
    assert not bad.size, (f"{what}: {bad.size} pages differ; first page {bad[0]}: "
                          f"got {got[bad[0]]:#x}, want {want[bad[0]]:#x}")


# --------------------------------------------------------------------------------------
# tests


class Arm64MmModel(MmModel):
    """The same model on arm64 (DBM dirty model, TLBI flushes)."""

    ARCH = "arm64"


class Arm64ContpteMmModel(MmModel):
    """The same model on arm64 with the contpte layer (check() verifies every CONT block)."""

    ARCH = "arm64"
    OPTIONS = {"contpte": True}  # noqa: RUF012


#: each arm64 variant runs a quarter as many examples as x86_64 (the suite must stay
#: under 10 minutes on two cores)
ARM64_SETTINGS = _settings(EXAMPLES // 4, STEPS)
ARM64_LONG_SETTINGS = _settings(LONG_EXAMPLES // 4, LONG_STEPS)


def test_mm_model() -> None:
    """Random syscall sequences of 30 steps against the model."""
    with _skip_out_of_order_allocations():
        run_state_machine_as_test(MmModel, settings=MAIN_SETTINGS)


def test_mm_model_long() -> None:
    """Fewer, 4x longer sequences (deeper fork trees, more pins alive across forks)."""
    with _skip_out_of_order_allocations():
        run_state_machine_as_test(MmModel, settings=LONG_SETTINGS)


def test_mm_model_arm64() -> None:
    """The random sequences on arm64."""
    with _skip_out_of_order_allocations():
        run_state_machine_as_test(Arm64MmModel, settings=ARM64_SETTINGS)


def test_mm_model_long_arm64() -> None:
    """The long sequences on arm64."""
    with _skip_out_of_order_allocations():
        run_state_machine_as_test(Arm64MmModel, settings=ARM64_LONG_SETTINGS)


def test_mm_model_arm64_contpte() -> None:
    """The random sequences on arm64 with contpte."""
    with _skip_out_of_order_allocations():
        run_state_machine_as_test(Arm64ContpteMmModel, settings=ARM64_SETTINGS)


def test_mm_model_long_arm64_contpte() -> None:
    """The long sequences on arm64 with contpte."""
    with _skip_out_of_order_allocations():
        run_state_machine_as_test(Arm64ContpteMmModel, settings=ARM64_LONG_SETTINGS)
