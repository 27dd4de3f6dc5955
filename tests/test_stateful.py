"""Stateful property tests: random mm syscall sequences against a plain-dict model.

A hypothesis ``RuleBasedStateMachine`` drives one small machine
(``Machine(arch="x86_64", memory="64MiB")``) with a root process and the children forked
from it (and from them), through random sequences of mmap (private, shared, 2 MiB aligned
THP candidates), populate, write, read, fork (batched and legacy), mprotect, mremap (grow,
shrink, move), madvise, munmap, FOLL_PIN longterm pins and FOLL_GET references with release,
exit, set_folio_orders and split_huge_pmd.

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
their PTE is present, so the check does not perturb THP allocation; a not-present private page
must be a zero page), write-protection of non-writable mappings, and every pin's contents.
At teardown every readable page of every process is compared, all handles released, all
processes exited, and every physical page must be free again.

Knobs (environment):

* ``MMUEMU_PROP_EXAMPLES``: examples of the main test (default 200; each runs
  ``MMUEMU_PROP_STEPS`` = 30 steps).  The long-sequence variant runs a quarter as many
  examples of 4x the steps.
* ``HYPOTHESIS_PROFILE=ci``: thousands of examples (2000 main + 500 long), for CI.
* ``HYPOTHESIS_PROFILE=quick``: a smoke run.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
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
PROTS = ("none", "r", "rw")
ADVICE = ("dontneed", "dontfork", "dofork", "wipeonfork", "keeponfork", "hugepage", "nohugepage")
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


_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
_DEFAULT_EXAMPLES = {"ci": 2000, "quick": 20}.get(_PROFILE, 200)
EXAMPLES = _int_env("MMUEMU_PROP_EXAMPLES", _DEFAULT_EXAMPLES)
STEPS = _int_env("MMUEMU_PROP_STEPS", 30)


def _settings(examples: int, steps: int) -> settings:
    return settings(max_examples=max(1, examples), stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


MAIN_SETTINGS = _settings(EXAMPLES, STEPS)
LONG_SETTINGS = _settings(EXAMPLES // 4, STEPS * 4)


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


class MmModel(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.m = mmuemu.Machine(arch="x86_64", memory="64MiB")
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

    # ---------------------------------------------------------------- model helpers
    def _tok(self, pm: ProcModel, a: int) -> int:
        at = pm.attrs[a]
        if at.shm is not None:
            return self.shms[at.shm].tok.get(at.idx, 0)
        return pm.mem.get(a, 0)

    def _beyond_eof(self, at: Attr) -> bool:
        return at.shm is not None and at.idx >= self.shms[at.shm].size

    def _access_error(self, pm: ProcModel, start: int, n: int, write: bool):  # type: ignore[no-untyped-def]
        """The error a CPU access (or GUP) of [start, start + n pages) must raise, or None."""
        for a in _pages(start, n):
            at = pm.attrs.get(a)
            if at is None or at.prot == "none" or (write and at.prot != "rw"):
                return mmuemu.SegmentationFault
            if self._beyond_eof(at):
                return mmuemu.SegmentationFault  # SIGBUS
        return None

    def _fully_mapped(self, pm: ProcModel, start: int, n: int) -> bool:
        return all(a in pm.attrs for a in _pages(start, n))

    def _pick(self, pi: int, need_pages: bool = True) -> ProcModel | None:
        cands = [pm for pm in self.procs if pm.attrs or not need_pages]
        return cands[pi % len(cands)] if cands else None

    def _has_pages(self) -> bool:
        return any(pm.attrs for pm in self.procs)

    def _draw_range(self, data, pm: ProcModel, max_pages: int = 64,  # type: ignore[no-untyped-def]
                    kinds: tuple[str, ...] = ("page", "run", "wild")) -> tuple[int, int]:
        """A page-aligned range near the process's mappings: (start, npages)."""
        keys = sorted(pm.attrs)
        kind = data.draw(st.sampled_from(kinds), label="range kind")
        if kind == "run":
            start, n = data.draw(st.sampled_from(_runs(keys)), label="run")
            return start, n
        start = data.draw(st.sampled_from(keys), label="page")
        if kind == "wild":
            start += data.draw(st.integers(-4, 4), label="shift") * PAGE
        n = data.draw(st.integers(1, max_pages), label="npages")
        return start, n

    def _clip_multi_vma(self, pm: ProcModel, start: int, n: int) -> int:
        """Pages of [start, +n) to access so that no two VMAs of it share a PMD slot.

        emulator bug: a fault over several VMAs under one PMD slot with no PTE table yet
        allocates one table per VMA and links each, so the first is leaked with its entries
        (fault.py _plan_vma decides need_table per VMA before any is applied).  Accesses that
        would hit it are clipped to their first VMA.
        """
        end = start + n * PAGE
        pieces = [(max(s, start), min(e, end)) for s, e, _ in pm.proc.vmas if s < end and e > start]
        for (_, e1), (s2, _) in itertools.pairwise(pieces):
            if (e1 - 1) // PMD_SIZE == s2 // PMD_SIZE:
                event("access clipped to one VMA (emulator bug workaround)")
                return (pieces[0][1] - start) // PAGE
        return n

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
    @rule(pi=PROC, n=st.integers(1, 64), shared=st.sampled_from([False, False, True]),
          prot=st.sampled_from(["rw", "rw", "rw", "r", "none"]))
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
            pm.attrs[a] = Attr(prot, sid, i)

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, data=st.data())
    @_step
    def munmap(self, pi: int, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm, max_pages=1100)
        pm.proc.munmap(start, n * PAGE)
        self._unmap_model(pm, _pages(start, n))

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, prot=st.sampled_from(PROTS), data=st.data())
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
            pm.attrs[a] = replace(base, idx=base.idx + i)

    # ---------------------------------------------------------------- rules: memory access
    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, write=st.booleans(), data=st.data())
    @_step
    def populate(self, pi: int, write: bool, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm)
        err = self._access_error(pm, start, n, write)
        if err is None:
            n = self._clip_multi_vma(pm, start, n)
        self._expect(err, lambda: pm.proc.populate(start, n * PAGE, write=write))

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, data=st.data())
    @_step
    def write(self, pi: int, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm)
        token = next(self.tokens)
        err = self._access_error(pm, start, n, True)
        if err is None:
            n = self._clip_multi_vma(pm, start, n)
        ok, _ = self._expect(err, lambda: pm.proc.write(start, token, length=n * PAGE))
        if not ok:
            return
        for a in _pages(start, n):
            at = pm.attrs[a]
            if at.shm is not None:
                self.shms[at.shm].tok[at.idx] = token
            else:
                pm.mem[a] = token
                for h, i in self.tracked.get((pm.pid, a), []):
                    h.expected[i] = token

    @precondition(lambda self: self._has_pages())
    @rule(pi=PROC, data=st.data())
    @_step
    def read(self, pi: int, data) -> None:  # type: ignore[no-untyped-def]
        pm = self._pick(pi)
        assert pm is not None
        start, n = self._draw_range(data, pm)
        err = self._access_error(pm, start, n, False)
        if err is None:
            n = self._clip_multi_vma(pm, start, n)
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
        start, n = self._draw_range(data, pm, max_pages=16, kinds=("page", "wild"))
        write = kind == "pin-rw"
        err = self._access_error(pm, start, n, write)
        if err is None:
            n = self._clip_multi_vma(pm, start, n)
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
            (inval, lambda: p.set_folio_orders([data.draw(st.sampled_from([-1, 10, 12]))])),
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
            keys = list(pm.attrs)
            for a in rng.sample(keys, min(3, len(keys))):
                self._check_page(pm, a)
        for hm in self.live_handles:
            self._check_handle(hm)
        self.busy = False

    def _check_vmas(self, pm: ProcModel) -> None:
        seen = 0
        for s, e, flags in pm.proc.vmas:
            f = _vm_flags(flags)
            for a in range(s, e, PAGE):
                at = pm.attrs.get(a)
                assert at is not None, f"{pm.proc.name}: VMA [{s:#x}, {e:#x}) maps {a:#x}, the model does not"
                assert at.vm_flags() == f, (f"{pm.proc.name}: page {a:#x} VMA flags {f:#x}, "
                                            f"model {at} ({at.vm_flags():#x})")
            seen += (e - s) // PAGE
        assert seen == len(pm.attrs), f"{pm.proc.name}: VMAs cover {seen} pages, model {len(pm.attrs)}"

    def _check_page(self, pm: ProcModel, a: int) -> None:
        at = pm.attrs[a]
        p = pm.proc
        pte = p.pte(a)
        if at.prot != "rw":
            assert not pte.write, f"{p.name}: writable PTE at {a:#x} in a {at.prot!r} mapping"
        if at.prot == "none" or self._beyond_eof(at):
            with pytest.raises(mmuemu.SegmentationFault):
                p.read(a)
            return
        want = self._tok(pm, a)
        if at.shm is None and not pte.present:
            assert want == 0, f"{p.name}: {a:#x} not mapped, but the model holds {want:#x}"
            return
        got = p.read(a)
        assert got == want, f"{p.name}: read {a:#x} = {got:#x}, model {want:#x} ({at})"

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
            for s, e, _ in pm.proc.vmas:  # one VMA at a time: see _clip_multi_vma
                for start, n in _runs([a for a in readable if s <= a < e]):
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


def test_mm_model() -> None:
    """Random syscall sequences of 30 steps against the model."""
    run_state_machine_as_test(MmModel, settings=MAIN_SETTINGS)


def test_mm_model_long() -> None:
    """Fewer, 4x longer sequences (deeper fork trees, more pins alive across forks)."""
    run_state_machine_as_test(MmModel, settings=LONG_SETTINGS)
