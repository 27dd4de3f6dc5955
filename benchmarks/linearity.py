"""bench_fork row 8: fork wall time per PTE from 1 to 16 GiB, forked in rounds (see
:func:`linearity_rows` and README.md)."""

from __future__ import annotations

import gc
import math
import resource
import statistics
import time
from typing import Any

from benchlib import GIB, PAGE, Row, build, collector_off, cpu_note, err

__all__ = ["LINEARITY_ROUNDS", "linearity_rows"]

#: the least number of rounds of the linearity row (each round is one sample of every size).
#: The host is shared: in a loaded stretch one size's median over 31 rounds moved by up to 10%
#: between the two halves of a run, which alone decides a 20% max/min.  Resampling the rounds
#: of one loaded 61-round run (per-round spreads up to 2.5; its max/min 1.114) gave max/min
#: 1.146 +- 0.045 (95th percentile 1.227) for 61 rounds, 1.127 +- 0.032 (1.185) for 121 and
#: 1.120 +- 0.020 (1.151) for 241: the noise of the medians alone could fail the row, and it
#: also biases max/min up.  121 rounds take about 55 s.
LINEARITY_ROUNDS = 121


def linearity_rows(
    mmuemu: Any, sizes_gib: list[int], repeat: int, budget: float, kernel_ms: float | None
) -> list[Row]:
    """Fork time per PTE at each size. All sizes are built first and then forked in rounds
    (in turn smallest and largest first), so that a change in the host's load during the run
    falls on every size alike instead of on whichever size was being measured.  Each timed
    sample follows an untimed fork of the same process: after another size's fork the host's
    caches hold that size's data, which costs the next fork about 1.3 ms (measured: 1 GiB
    after an 8 GiB fork 7.2 ms, after its own 6.0 ms), a fixed cost that would count against
    the small sizes only.

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
            m, p, _ = build(mmuemu, g * GIB, [0], memory=f"{g + 2}GiB")
            p.fork().exit()  # untimed warm-up: the first fork also clears AnonExclusive
            built[g] = (m, p)
        except Exception as e:
            errors[g] = e
    largest = max(built, default=1)
    group = {g: max(1, largest // g) for g in sizes_gib}  # forks per sample
    single: dict[int, list[float]] = {g: [] for g in sizes_gib}
    spent = 0.0
    order = list(built.items())
    for rnd in range(max(repeat, LINEARITY_ROUNDS)):
        # smallest first in even rounds, largest first in odd ones: no size always follows
        # the same other size, or always comes first after the previous round's exits
        for g, (_m, p) in order[:: -1 if rnd % 2 else 1]:
            # untimed: one fork of the same size just before, as rows 1-5 fork back to back,
            # so each size starts with its own data in the host caches, not another size's.
            # The collection comes before the warm-up, and none while timing (collector_off)
            gc.collect()
            p.fork().exit()
            forks = group[g]
            children: list[Any] = []
            with collector_off():
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                children.append(p.fork())
                t_first = time.perf_counter()
                children.extend(p.fork() for _ in range(forks - 1))
                t1 = time.perf_counter()
                r1 = resource.getrusage(resource.RUSAGE_SELF)
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
            err(r, errors[g])
        else:
            r.samples = samples[g]
            r.runs = len(samples[g])
            r.emu = statistics.median(samples[g])
            r.cpu = {k: statistics.median(c[i] for c in cpu[g])
                     for i, k in enumerate(("user_ms", "sys_ms", "minflt"))}
            r.note = cpu_note(r.cpu) + (
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
        # Each round measures every size within about half a second, under one host load;
        # the load changes between rounds, and it does not slow every size alike (a 1 GiB
        # fork's data fits the host's L3, a 16 GiB fork streams from DRAM).  So each sample
        # is first taken relative to its round (its ns/PTE over the geometric mean of the
        # round's), and the figure is max/min of the sizes' median relatives.  The ratio of
        # the sizes' plain medians is shown too: with a load that came or went mid-run, each
        # size's median falls between the two regimes wherever its samples happen to split
        # (measured: 1.234 with a neighbour streaming 64 MiB for the first part of the run,
        # its halves 1.113 and 1.242).
        ok = [g for g in sizes_gib if g in per_pte]
        rounds = min(len(samples[g]) for g in ok)
        ns = {g: [samples[g][i] * 1e6 / (g * GIB // PAGE) for i in range(rounds)] for g in ok}
        spreads = [max(ns[g][i] for g in ok) / min(ns[g][i] for g in ok) for i in range(rounds)]

        def relative_spread(part: range) -> tuple[float, dict[int, float]]:
            mean = [math.exp(statistics.fmean(math.log(ns[g][i]) for g in ok)) for i in part]
            rel = {g: statistics.median(ns[g][i] / m for i, m in zip(part, mean, strict=True)) for g in ok}
            return max(rel.values()) / min(rel.values()), rel

        summary.metric, rel = relative_spread(range(rounds))
        plain = max(per_pte.values()) / min(per_pte.values())
        # the same figure over each half of the rounds: how far the host's load moved it
        half = rounds // 2
        halves = (f"{relative_spread(range(half))[0]:.3f}, {relative_spread(range(half, rounds))[0]:.3f}"
                  if half else "-")
        summary.note = ("ns/PTE (medians): " + ", ".join(f"{g} GiB {v:.2f}" for g, v in per_pte.items())
                        + f" (max/min {plain:.3f}); relative to their rounds (medians): "
                        + ", ".join(f"{g} GiB {v:.3f}" for g, v in rel.items())
                        + f"; max/min of those over the first and the second half of the rounds: {halves}"
                        + "; per-round max/min " + ", ".join(f"{x:.2f}" for x in spreads))
        if len(per_pte) < len(sizes_gib):
            summary.note += " (some sizes failed, see their rows)"
        summary.judge()
    else:
        summary.status = "ERROR" if any(r.status == "ERROR" for r in rows) else "SKIP"
        summary.note = "fewer than two sizes measured"
    rows.append(summary)
    return rows
