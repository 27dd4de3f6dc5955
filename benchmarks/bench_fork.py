"""Speed benchmark of mmuemu's fork() path against the real kernel, same machine, same run.

Every figure is wall-clock time of the *emulator itself* (not its simulated nanoseconds), set
next to a baseline measured in this very process a moment earlier: the Linux kernel forking the
same amount of memory. Targets come from the project's issue and are ratios

    emulator wall time / kernel fork wall time (same machine, same run)

so that they do not depend on how fast the box is.

Kernel baseline (no subprocess): mmap 1 GiB anonymous private memory with Python's ``mmap``
module, ``madvise`` it MADV_NOHUGEPAGE (order-0 pages) or MADV_HUGEPAGE (PMD THP), write one byte
to every 4K page, then time ``os.fork()`` in the parent, from just before the call to just after
it returns (the child ``os._exit(0)``s at once, the parent then ``waitpid``s). The median of
``--kernel-repeat`` forks is used. It is measured before mmuemu is imported, while this process is
still small, so the parent's own memory does not inflate it.

Emulator rows (median of ``--repeat`` runs; the populated machine is built outside the timed
region, each run forks a fresh child and ``c.exit()``s it afterwards, outside the timing):

  1. fork of 1 GiB order-0, x86_64, batched fork          ratio vs kernel order-0 fork  <= 0.5
  2. the same with fork_mode="legacy"                      informational
  3. fork of 1 GiB of 64K folios (order 4)                 ratio vs kernel order-0 fork  <= 0.5
  4. fork of 1 GiB of PTE-mapped 2M folios                 ratio vs kernel order-0 fork  <= 0.5
     (order 9 + MADV_HUGEPAGE, populated, then split_huge_pmd over the range)
  5. fork of 1 GiB of PMD-mapped THP                       ratio vs kernel THP fork      <= 3.0
  6. populate of 1 GiB order-0 (timed: p.populate)         ratio vs kernel order-0 fork  <= 3
  7. memory: growth of VmRSS per emulated 4K page, in a fresh subprocess, from before the
     machine is built to after populating 1 GiB order-0 and forking once; divided by the
     262144 populated pages                                                              <= 64 B
  9. fork of 1 GiB of 64K folios on arm64 with contpte, batched, against the x86_64 64K
     fork forked in the same rounds                                       ratio vs x86 <= 1.2
  8. linearity: fork wall time per PTE at 1, 2, 4, 8, 16 GiB order-0 (``--quick`` stops at
     4 GiB, ``--sizes`` chooses), all sizes forked in rounds, each sample of a smaller size
     timing several forks back to back so that every sample spans the same wall time;
     max/min of the per-size median ns/PTE                                               <= 1.2

Usage::

    python benchmarks/bench_fork.py [--quick] [--repeat N] [--sizes 1,2,4] [--rows 1,5]
                                    [--json PATH] [--strict]

The script is a report: it exits 0 whatever the results, unless ``--strict`` is given, in which
case any FAIL (or ERROR) row makes it exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import mmap
import os
import platform
import resource
import statistics
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 1 << 30
MIB = 1 << 20
PAGE = 4096
PMD_SIZE = 2 << 20
#: the least number of rounds of the linearity row (each round is one sample of every size).
#: The host is shared: in a loaded stretch one size's median over 31 rounds moved by up to 10%
#: between the two halves of a run, which alone decides a 20% max/min; 61 rounds (about 25 s)
#: halve that stretch's weight.
LINEARITY_ROUNDS = 61
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# results


@dataclass
class Row:
    key: str  # "1".."9", or "8@4GiB" for a linearity point
    name: str
    emu: float | None = None  # emulator figure (ms, or the row's unit)
    kernel: float | None = None  # kernel figure (ms)
    metric: float | None = None  # the figure compared with the target
    target: float | None = None  # metric <= target passes
    unit: str = "ms"
    status: str = "INFO"  # PASS, FAIL, INFO, ERROR, SKIP
    runs: int = 0
    note: str = ""
    samples: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    def judge(self) -> None:
        if self.status in ("ERROR", "SKIP"):
            return
        if self.target is None or self.metric is None:
            self.status = "INFO"
        else:
            self.status = "PASS" if self.metric <= self.target else "FAIL"


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def print_table(rows: list[Row], kernel: dict[str, Any]) -> None:
    head = ("row", "emulator", "kernel", "ratio", "target", "result")
    body = []
    for r in rows:
        emu = _fmt(r.emu) + ("" if r.emu is None else f" {r.unit}")
        ker = _fmt(r.kernel) + ("" if r.kernel is None else " ms")
        metric = _fmt(r.metric, 3)
        target = "-" if r.target is None else f"<= {r.target:g}"
        body.append((f"{r.key}. {r.name}", emu, ker, metric, target, r.status))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:5], widths[1:5], strict=True)]
        out.append(cells[5].ljust(widths[5]))
        return "  ".join(out).rstrip()

    print()
    print(f"kernel {platform.release()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    for k, v in kernel.items():
        if isinstance(v, dict) and "median_ms" in v:
            thp = v.get("anon_huge_kib")
            extra = "" if thp is None else f", AnonHugePages {thp // 1024} MiB"
            print(
                f"kernel baseline {k}: median {v['median_ms']:.3f} ms over {v['runs']} forks{extra}"
            )
    print()
    print(line(head))
    print(line(tuple("-" * w for w in widths)))  # type: ignore[arg-type]
    for b in body:
        print(line(b))
    notes = [r for r in rows if r.note]
    if notes:
        print()
        for r in notes:
            print(f"  [{r.key}] {r.note}")
    print()


# --------------------------------------------------------------------------------------------
# kernel baseline


def _anon_huge_kib() -> int | None:
    try:
        with open("/proc/self/smaps_rollup") as f:
            for ln in f:
                if ln.startswith("AnonHugePages:"):
                    return int(ln.split()[1])
    except OSError:
        return None
    return None


def kernel_fork(size: int, huge: bool, repeat: int) -> dict[str, Any]:
    """Time os.fork() of this process with `size` bytes of populated anonymous memory."""
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)
    if advice is None:
        raise OSError("mmap.MADV_%sHUGEPAGE not available here" % ("" if huge else "NO"))
    buf = mmap.mmap(
        -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
    )
    try:
        buf.madvise(advice)
        for off in range(0, size, PAGE):
            buf[off] = 1
        thp = _anon_huge_kib()
        samples: list[int] = []
        for _ in range(repeat):
            gc.collect()
            t0 = time.perf_counter_ns()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            t1 = time.perf_counter_ns()
            os.waitpid(pid, 0)
            samples.append(t1 - t0)
    finally:
        buf.close()
    return {
        "size": size,
        "huge": huge,
        "runs": len(samples),
        "samples_ms": [s / 1e6 for s in samples],
        "median_ms": statistics.median(samples) / 1e6,
        "anon_huge_kib": thp,
    }


# --------------------------------------------------------------------------------------------
# emulator helpers


def _median_wall(
    setup: Callable[[], Any],
    timed: Callable[[Any], Any],
    after: Callable[[Any, Any], None],
    repeat: int,
    budget_s: float,
) -> tuple[list[float], dict[str, float]]:
    """Run `timed(state)` up to `repeat` times; return the wall times in ms and CPU medians.

    One untimed warm-up run comes first. Per run: `state = setup()` (untimed), then
    `timed(state)` between two perf_counter reads with the garbage collector off (as timeit
    does; a gc.collect() just before would chill the caches, see linearity_rows), then
    `after(state, result)` (untimed). Stops early once `budget_s` seconds of timed work are spent
    (at least one run always happens). The CPU figures (getrusage just outside the timed
    region: user ms, sys ms, minor page faults) are diagnostics: a large sys share means the
    emulator's time goes into the host kernel faulting in fresh memory.
    """
    samples: list[float] = []
    user: list[float] = []
    sys_: list[float] = []
    minflt: list[float] = []
    spent = 0.0
    state = setup()  # one untimed warm-up run: the first fork also grows the table pool
    after(state, timed(state))
    for _ in range(repeat):
        state = setup()
        gc.disable()
        try:
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            res = timed(state)
            t1 = time.perf_counter()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            gc.enable()
        after(state, res)
        samples.append((t1 - t0) * 1e3)
        user.append((r1.ru_utime - r0.ru_utime) * 1e3)
        sys_.append((r1.ru_stime - r0.ru_stime) * 1e3)
        minflt.append(float(r1.ru_minflt - r0.ru_minflt))
        spent += t1 - t0
        if spent > budget_s:
            break
    cpu = {
        "user_ms": statistics.median(user),
        "sys_ms": statistics.median(sys_),
        "minflt": statistics.median(minflt),
    }
    return samples, cpu


def _cpu_note(cpu: dict[str, float]) -> str:
    return "cpu user {:.1f} ms, sys {:.1f} ms, {:.0f} minor faults (medians)".format(
        cpu["user_ms"], cpu["sys_ms"], cpu["minflt"]
    )


def _build(
    mmuemu: Any,
    size: int,
    orders: list[int],
    *,
    huge: bool = False,
    split: bool = False,
    fork_mode: str = "batched",
    memory: str | None = None,
    populate: bool = True,
) -> tuple[Any, Any, int]:
    mem = memory or f"{max(4, size // GIB + 2)}GiB"
    m = mmuemu.Machine(arch="x86_64", memory=mem, fork_mode=fork_mode)
    p = m.spawn()
    p.set_folio_orders(orders)
    a = p.mmap(size, prot="rw", align=PMD_SIZE)
    if huge:
        p.madvise(a, size, "hugepage")
    if populate:
        p.populate(a, size, write=True)
    if split:
        p.split_huge_pmd(a, size)
    return m, p, a


def _describe(p: Any, a: int) -> str:
    """A one-line check of what the populated memory looks like (folio order, PTE), best effort."""
    try:
        f = p.folio(a)
        t = p.pte(a)
        return f"folio order {f.order}, pte present={t.present} write={t.write}"
    except Exception as e:
        return f"(folio/pte check failed: {type(e).__name__}: {e})"


def _err(row: Row, e: BaseException) -> Row:
    row.status = "ERROR"
    tb = traceback.extract_tb(e.__traceback__)
    where = ""
    if tb:
        fr = tb[-1]
        where = f" at {Path(fr.filename).name}:{fr.lineno}"
    row.note = f"{type(e).__name__}: {e}{where}"
    return row


def fork_row(
    mmuemu: Any,
    key: str,
    name: str,
    kernel_ms: float | None,
    target: float | None,
    repeat: int,
    budget: float,
    *,
    size: int = GIB,
    orders: list[int] | None = None,
    huge: bool = False,
    split: bool = False,
    fork_mode: str = "batched",
    memory: str | None = None,
) -> Row:
    row = Row(key, name, kernel=kernel_ms, target=target)
    keep: dict[str, Any] = {}  # the machine lives here so that it can be dropped in `finally`
    try:
        m, p, a = _build(
            mmuemu,
            size,
            orders if orders is not None else [0],
            huge=huge,
            split=split,
            fork_mode=fork_mode,
            memory=memory,
        )
        keep.update(m=m, p=p)
        del m
        desc = _describe(p, a)

        def setup() -> Any:
            return keep["p"]

        def timed(proc: Any) -> Any:
            return proc.fork()

        def after(_proc: Any, child: Any) -> None:
            child.exit()

        samples, row.cpu = _median_wall(setup, timed, after, repeat, budget)
        row.samples = samples
        row.runs = len(samples)
        row.emu = statistics.median(samples)
        if kernel_ms:
            row.metric = row.emu / kernel_ms
        row.note = (desc + "; " if key in ("3", "4", "5") else "") + _cpu_note(row.cpu)
        row.judge()
    except Exception as e:
        _err(row, e)
    finally:
        keep.clear()
        gc.collect()
    return row


def populate_row(mmuemu: Any, kernel_ms: float | None, repeat: int, budget: float) -> Row:
    row = Row("6", "populate 1 GiB order-0", kernel=kernel_ms, target=3.0)
    try:
        holder: dict[str, Any] = {}

        def setup() -> tuple[Any, int]:
            holder.clear()
            gc.collect()
            m, p, a = _build(mmuemu, GIB, [0], memory="4GiB", populate=False)
            holder["m"] = m
            return p, a

        def timed(st: tuple[Any, int]) -> None:
            p, a = st
            p.populate(a, GIB, write=True)

        samples, row.cpu = _median_wall(setup, timed, lambda _s, _r: None, repeat, budget)
        row.note = _cpu_note(row.cpu)
        holder.clear()
        row.samples = samples
        row.runs = len(samples)
        row.emu = statistics.median(samples)
        if kernel_ms:
            row.metric = row.emu / kernel_ms
        row.judge()
    except Exception as e:
        _err(row, e)
    finally:
        gc.collect()
    return row


_MEM_PROBE = textwrap.dedent("""
    import gc, json, sys

    def rss(key="VmRSS:"):
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith(key):
                    return int(ln.split()[1]) * 1024
        raise RuntimeError("no " + key)

    import mmuemu
    # warm-up on a small machine first, so that the baseline already holds the code pages
    # of numpy and mmuemu and the modules a Machine loads: they are not per emulated page
    w = mmuemu.Machine(arch="x86_64", memory="64MiB")
    wp = w.spawn()
    wa = wp.mmap(8 << 20, prot="rw", align=2 << 20)
    wp.populate(wa, 8 << 20, write=True)
    wp.fork().exit()
    del w, wp
    gc.collect()
    r0 = rss()
    m = mmuemu.Machine(arch="x86_64", memory="4GiB")
    p = m.spawn()
    p.set_folio_orders([0])
    a = p.mmap(1 << 30, prot="rw", align=2 << 20)
    r1 = rss()
    p.populate(a, 1 << 30, write=True)
    r2 = rss()
    c = p.fork()
    gc.collect()
    r3 = rss()
    hwm = rss("VmHWM:")
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the allocator's cache of freed temporaries back
    r4 = rss()
    print(json.dumps({"before": r0, "machine": r1, "populated": r2, "forked": r3, "hwm": hwm,
                      "live": r4}))
""")


def memory_row(timeout: float) -> Row:
    row = Row("7", "RSS per emulated 4K page (1 GiB + fork)", unit="B/pg", target=64.0)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    try:
        cp = subprocess.run(
            [sys.executable, "-c", _MEM_PROBE],
            capture_output=True,
            text=True,
            cwd=str(REPO),
            env=env,
            timeout=timeout,
            check=False,
        )
        if cp.returncode != 0:
            last = (cp.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise RuntimeError(f"probe exited {cp.returncode}: {last}")
        d = json.loads(cp.stdout.strip().splitlines()[-1])
        pages = GIB // PAGE
        per_page = (d["forked"] - d["before"]) / pages
        row.emu = per_page
        row.metric = per_page
        row.note = (
            "VmRSS MiB: before machine {:.0f}, after Machine+mmap {:.0f}, after populate "
            "{:.0f}, after fork {:.0f}, peak (VmHWM) {:.0f}; populate alone {:.1f} B/pg, "
            "peak {:.1f} B/pg; live state after malloc_trim(0) {:.1f} B/pg"
        ).format(
            d["before"] / MIB,
            d["machine"] / MIB,
            d["populated"] / MIB,
            d["forked"] / MIB,
            d["hwm"] / MIB,
            (d["populated"] - d["before"]) / pages,
            (d["hwm"] - d["before"]) / pages,
            (d["live"] - d["before"]) / pages,
        )
        row.runs = 1
        row.judge()
    except Exception as e:
        _err(row, e)
    return row


def arm64_row(mmuemu: Any, repeat: int, budget: float) -> Row:
    """Fork of 1 GiB of 64K folios on arm64 with contpte (batched), against the same fork
    on x86_64 forked in the same rounds: the contpte bookkeeping must not cost more than
    20% over x86's."""
    row = Row("9", "fork 1 GiB 64K folios, arm64 contpte (vs x86 64K, same rounds)", target=1.2)
    try:
        procs = {}
        for arch, opts in (("x86_64", {}), ("arm64", {"contpte": True})):
            m = mmuemu.Machine(arch=arch, memory="4GiB", **opts)
            p = m.spawn()
            p.set_folio_orders([4])
            a = p.mmap(GIB, prot="rw", align=PMD_SIZE)
            p.populate(a, GIB, write=True)
            p.fork().exit()  # untimed warm-up
            procs[arch] = (m, p)
        samples: dict[str, list[float]] = {arch: [] for arch in procs}
        spent = 0.0
        for r in range(repeat):
            order = list(procs.items())
            for arch, (_m, p) in order[:: -1 if r % 2 else 1]:  # each goes first in turn
                gc.disable()  # (as in _median_wall)
                try:
                    t0 = time.perf_counter()
                    child = p.fork()
                    t1 = time.perf_counter()
                finally:
                    gc.enable()
                child.exit()
                samples[arch].append((t1 - t0) * 1e3)
                spent += t1 - t0
            if spent > budget:
                break
        x86, arm = statistics.median(samples["x86_64"]), statistics.median(samples["arm64"])
        row.emu, row.kernel = arm, None
        row.samples, row.runs = samples["arm64"], len(samples["arm64"])
        row.metric = arm / x86
        row.note = f"arm64 contpte {arm:.2f} ms, x86_64 {x86:.2f} ms (medians of {row.runs} rounds)"
        row.judge()
    except Exception as e:
        _err(row, e)
    finally:
        gc.collect()
    return row


def linearity_rows(
    mmuemu: Any, sizes_gib: list[int], repeat: int, budget: float, kernel_ms: float | None
) -> list[Row]:
    """Fork time per PTE at each size. All sizes are built first and then forked in rounds,
    so that a change in the host's load during the run falls on every size alike instead of
    on whichever size was being measured.  Each timed sample follows an untimed fork of the
    same process: after another size's fork the host's caches hold that size's data, which
    costs the next fork about 1.3 ms (measured: 1 GiB after an 8 GiB fork 7.2 ms, after its
    own 6.0 ms), a fixed cost that would count against the small sizes only.

    A sample of a size below the largest times ``largest // size`` forks of it back to back
    (the children live until the sample ends, then exit untimed) and divides by their number,
    so that every sample spans the same wall time.  The host is shared: load from other
    tenants comes in bursts of a few milliseconds, which swallow a whole 5 ms fork of 1 GiB
    but only part of an 80 ms fork of 16 GiB, so single-fork samples of the small sizes
    spread far wider (measured: 1 GiB 15.7-24.7 ns/PTE over 7 rounds, 16 GiB 12.2-17.5) and
    their medians drift up with the load.  Each fork still pays its own fixed costs; the
    single-fork medians are shown too."""
    rows: list[Row] = []
    per_pte: dict[int, float] = {}
    built: dict[int, Any] = {}
    samples: dict[int, list[float]] = {g: [] for g in sizes_gib}
    cpu: dict[int, list[tuple[float, float, float]]] = {g: [] for g in sizes_gib}
    errors: dict[int, Exception] = {}
    for g in sizes_gib:
        try:
            m, p, _ = _build(mmuemu, g * GIB, [0], memory=f"{g + 2}GiB")
            p.fork().exit()  # untimed warm-up: the first fork also clears AnonExclusive
            built[g] = (m, p)
        except Exception as e:
            errors[g] = e
    largest = max(built, default=1)
    group = {g: max(1, largest // g) for g in sizes_gib}  # forks per sample
    single: dict[int, list[float]] = {g: [] for g in sizes_gib}
    spent = 0.0
    for _ in range(max(repeat, LINEARITY_ROUNDS)):
        for g, (_m, p) in built.items():
            # untimed: one fork of the same size just before, as rows 1-5 fork back to back,
            # so each size starts with its own data in the host caches, not another size's.
            # The collection comes first and the collector is off while timing, as timeit
            # does: a gc.collect() between the warm-up and the timed forks walks every object
            # and chills the caches again (the next fork of 4 KiB took 561 us, 195 us warm)
            gc.collect()
            p.fork().exit()
            forks = group[g]
            children: list[Any] = []
            gc.disable()
            try:
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                children.append(p.fork())
                t_first = time.perf_counter()
                children.extend(p.fork() for _ in range(forks - 1))
                t1 = time.perf_counter()
                r1 = resource.getrusage(resource.RUSAGE_SELF)
            finally:
                gc.enable()
            for child in children:
                child.exit()
            samples[g].append((t1 - t0) * 1e3 / forks)
            single[g].append((t_first - t0) * 1e3)
            cpu[g].append(((r1.ru_utime - r0.ru_utime) * 1e3 / forks,
                           (r1.ru_stime - r0.ru_stime) * 1e3 / forks,
                           float(r1.ru_minflt - r0.ru_minflt) / forks))
            spent += t1 - t0
        if spent > budget * max(1, len(built)):
            break
    built.clear()
    gc.collect()
    for g in sizes_gib:
        size = g * GIB
        r = Row(f"8@{g}GiB", f"fork {g} GiB order-0 (ns/PTE in ratio col)")
        if g in errors:
            _err(r, errors[g])
        else:
            r.samples = samples[g]
            r.runs = len(samples[g])
            r.emu = statistics.median(samples[g])
            r.cpu = {k: statistics.median(c[i] for c in cpu[g])
                     for i, k in enumerate(("user_ms", "sys_ms", "minflt"))}
            r.note = _cpu_note(r.cpu) + (
                f"; per fork, {group[g]} forks a sample; the first fork of each sample: "
                f"median {statistics.median(single[g]):.2f} ms"
            )
            ns = r.emu * 1e6 / (size // PAGE)
            per_pte[g] = ns
            r.metric = ns
            r.status = "INFO"
        if g == 1 and kernel_ms is not None:
            r.kernel = kernel_ms
        rows.append(r)
    summary = Row(
        "8",
        "linearity max/min ns/PTE over " + ",".join(f"{g}" for g in sizes_gib) + " GiB",
        unit="",
        target=1.2,
    )
    if len(per_pte) >= 2:
        # sizes are forked in rounds, so a drift in host load falls on all of them alike;
        # the spread within each round is shown too
        ok = [g for g in sizes_gib if g in per_pte]
        rounds = min(len(samples[g]) for g in ok)
        spreads = []
        for i in range(rounds):
            ns_i = [samples[g][i] * 1e6 / (g * GIB // PAGE) for g in ok]
            spreads.append(max(ns_i) / min(ns_i))
        lo, hi = min(per_pte.values()), max(per_pte.values())
        summary.metric = hi / lo  # (a single round's spread is biased up by its noise)

        def ratio_of(part: slice) -> float:
            med = [statistics.median(samples[g][part]) / (g * GIB // PAGE) for g in ok]
            return max(med) / min(med)

        # the same figure over each half of the rounds: how far the host's load moved it
        half = rounds // 2
        halves = f"{ratio_of(slice(0, half)):.3f}, {ratio_of(slice(half, rounds)):.3f}" if half else "-"
        summary.note = ("ns/PTE (medians): " + ", ".join(f"{g} GiB {v:.2f}" for g, v in per_pte.items())
                        + f"; max/min over the first and the second half of the rounds: {halves}"
                        + "; per-round max/min " + ", ".join(f"{x:.2f}" for x in spreads))
        if len(per_pte) < len(sizes_gib):
            summary.note += " (some sizes failed, see their rows)"
        summary.judge()
    else:
        summary.status = "ERROR" if any(r.status == "ERROR" for r in rows) else "SKIP"
        summary.note = "fewer than two sizes measured"
    rows.append(summary)
    return rows


# --------------------------------------------------------------------------------------------
# main


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="mmuemu fork() speed vs the real kernel's fork (same machine, same run)."
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=5,
        metavar="N",
        help="emulator runs per row, median reported (default 5)",
    )
    ap.add_argument(
        "--kernel-repeat",
        type=int,
        default=7,
        metavar="N",
        help="kernel forks per baseline, median used (default 7)",
    )
    ap.add_argument("--quick", action="store_true", help="linearity only up to 4 GiB")
    ap.add_argument(
        "--sizes",
        type=_int_list,
        default=None,
        metavar="G,G,...",
        help="linearity sizes in GiB (default 1,2,4,8,16; --quick: 1,2,4)",
    )
    ap.add_argument(
        "--rows",
        type=_int_list,
        default=None,
        metavar="R,R,...",
        help="only these rows (1-9); default all",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=60.0,
        metavar="S",
        help="stop repeating a row once its timed runs exceed S seconds (default 60)",
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the rows and baselines as JSON to PATH",
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 if any row is FAIL or ERROR")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.kernel_repeat < 1:
        ap.error("--repeat and --kernel-repeat must be >= 1")
    if args.sizes is None:
        args.sizes = [1, 2, 4] if args.quick else [1, 2, 4, 8, 16]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    want = set(args.rows) if args.rows else set(range(1, 10))

    # 1) kernel baselines, while this process is still small (before importing mmuemu/numpy);
    #    THP first: right after 1 GiB of order-0 pages is freed, THP forks measure noisier
    kernel: dict[str, Any] = {}
    for label, huge in (("thp", True), ("order0", False)):
        try:
            kernel[label] = kernel_fork(GIB, huge, args.kernel_repeat)
        except Exception as e:
            kernel[label] = {"error": f"{type(e).__name__}: {e}"}
            print(f"kernel baseline {label} failed: {kernel[label]['error']}", file=sys.stderr)
    k0 = kernel["order0"].get("median_ms")
    kthp = kernel["thp"].get("median_ms")
    thp_kib = kernel["thp"].get("anon_huge_kib")
    if kthp is not None and (thp_kib is None or thp_kib < GIB // 1024 // 2):
        print(
            f"warning: kernel THP baseline got only {thp_kib} KiB of AnonHugePages; THP may be "
            "disabled (/sys/kernel/mm/transparent_hugepage/enabled)",
            file=sys.stderr,
        )

    # 2) emulator
    rows: list[Row] = []
    sys.path.insert(0, str(REPO))
    try:
        import mmuemu

        mmuemu.Machine  # noqa: B018  (fail here, once, if the package is not ready)
    except Exception as e:
        r = _err(Row("-", "import mmuemu"), e)
        rows.append(r)
        mmuemu = None

    if mmuemu is not None:
        R, B = args.repeat, args.budget
        if 1 in want:
            rows.append(
                fork_row(mmuemu, "1", "fork 1 GiB order-0 (batched)", k0, 0.5, R, B, orders=[0])
            )
        if 2 in want:
            rows.append(
                fork_row(
                    mmuemu,
                    "2",
                    "fork 1 GiB order-0 (legacy)",
                    k0,
                    None,
                    R,
                    B,
                    orders=[0],
                    fork_mode="legacy",
                )
            )
        if 3 in want:
            rows.append(fork_row(mmuemu, "3", "fork 1 GiB 64K folios", k0, 0.5, R, B, orders=[4]))
        if 4 in want:
            rows.append(
                fork_row(
                    mmuemu,
                    "4",
                    "fork 1 GiB PTE-mapped 2M folios",
                    k0,
                    0.5,
                    R,
                    B,
                    orders=[9],
                    huge=True,
                    split=True,
                )
            )
        if 5 in want:
            rows.append(
                fork_row(
                    mmuemu,
                    "5",
                    "fork 1 GiB PMD THP (vs kernel THP)",
                    kthp,
                    3.0,
                    R,
                    B,
                    orders=[9],
                    huge=True,
                )
            )
        if 6 in want:
            rows.append(populate_row(mmuemu, k0, R, B))
    if 7 in want:
        rows.append(memory_row(timeout=max(600.0, args.budget * 5)))
    if mmuemu is not None and 8 in want:
        rows.extend(linearity_rows(mmuemu, args.sizes, args.repeat, args.budget, k0))
    if mmuemu is not None and 9 in want:
        rows.append(arm64_row(mmuemu, args.repeat, args.budget))

    print_table(rows, kernel)

    if args.json is not None:
        doc = {
            "host": {
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "kernel_baseline": kernel,
            "rows": [asdict(r) for r in rows],
        }
        with contextlib.suppress(OSError):
            args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")

    bad = [r for r in rows if r.status in ("FAIL", "ERROR")]
    return 1 if (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
