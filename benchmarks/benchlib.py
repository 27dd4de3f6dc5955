"""What the benchmark scripts share: result rows and their table, the kernel's fork
baseline, and the emulator timing protocol (see README.md).  Standard library only: the
kernel baseline runs before numpy and mmuemu are imported, while the process is small."""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import platform
import resource
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GIB", "MIB", "PAGE", "PMD_SIZE", "REPO", "Row", "build", "collector_off", "cpu_note", "describe",
           "err", "fmt", "kernel_fork", "median_wall", "print_table"]

GIB = 1 << 30
MIB = 1 << 20
PAGE = 4096
PMD_SIZE = 2 << 20
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


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def print_table(rows: list[Row], kernel: dict[str, Any]) -> None:
    head = ("row", "emulator", "kernel", "ratio", "target", "result")
    body = []
    for r in rows:
        emu = fmt(r.emu) + ("" if r.emu is None else f" {r.unit}")
        ker = fmt(r.kernel) + ("" if r.kernel is None else " ms")
        metric = fmt(r.metric, 3)
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


def anon_huge_kib() -> int | None:
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
        thp = anon_huge_kib()
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


def median_wall(
    setup: Callable[[], Any],
    timed: Callable[[Any], Any],
    after: Callable[[Any, Any], None],
    repeat: int,
    budget_s: float,
) -> tuple[list[float], dict[str, float]]:
    """Run `timed(state)` up to `repeat` times; return the wall times in ms and CPU medians.

    One untimed warm-up run comes first. Per run: `state = setup()` (untimed), then
    `timed(state)` between two perf_counter reads with the garbage collector off (as timeit
    does: :func:`collector_off`), then
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
        with collector_off():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            res = timed(state)
            t1 = time.perf_counter()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
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


def cpu_note(cpu: dict[str, float]) -> str:
    return "cpu user {:.1f} ms, sys {:.1f} ms, {:.0f} minor faults (medians)".format(
        cpu["user_ms"], cpu["sys_ms"], cpu["minflt"]
    )


def build(
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


def describe(p: Any, a: int) -> str:
    """A one-line check of what the populated memory looks like (folio order, PTE), best effort."""
    try:
        f = p.folio(a)
        t = p.pte(a)
        return f"folio order {f.order}, pte present={t.present} write={t.write}"
    except Exception as e:
        return f"(folio/pte check failed: {type(e).__name__}: {e})"


def err(row: Row, e: BaseException) -> Row:
    row.status = "ERROR"
    tb = traceback.extract_tb(e.__traceback__)
    where = ""
    if tb:
        fr = tb[-1]
        where = f" at {Path(fr.filename).name}:{fr.lineno}"
    row.note = f"{type(e).__name__}: {e}{where}"
    return row


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """Python's garbage collector off for a timed region, as ``timeit`` does.  Callers do not
    ``gc.collect()`` just before timing: a collection walks every object and leaves the
    caches cold (a 4 KiB fork took 561 us right after one, 195 us warm)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
