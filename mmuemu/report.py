"""Tables of an experiment's records: the summary ``mmuemu run`` prints and the side-by-side
comparison of ``mmuemu compare`` (with ratios against a baseline column)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mmuemu.config import Config
from mmuemu.config.load import show

__all__ = ["compare_rows", "compare_table", "format_table", "summary_table"]

#: counters the summary shows next to the time, when a run has them
SUMMARY_COUNTERS = ("pte_writes", "folio_ref_ops", "contpte_unfolds", "tlbi_ops", "ipis", "lock_breaks")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the rest right-aligned."""
    cells = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(vals, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if v == int(v) and abs(v) < 1e12:
            return str(int(v))
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _row_name(rec: dict[str, Any]) -> str:
    return str(rec.get("row") or "-")


def _metric_value(metric: str, values: list[float]) -> float:
    v = _median(values)
    return v / 1e6 if metric == "time_ns" else v


def summary_table(records: Sequence[dict[str, Any]]) -> str:
    """Median time and key counters per point and family of fork, exit and munmap runs,
    and per-task latency and lock rows of SimPy runs."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("family") in ("fork", "exit", "munmap"):
            groups[(str(r.get("label") or r.get("arch")), _row_name(r), r["family"])].append(r)
    counters = [c for c in SUMMARY_COUNTERS if any(c in r for rs in groups.values() for r in rs)]
    out = []
    if groups:
        rows = []
        for (label, row, fam), rs in groups.items():
            rows.append([label, row, fam, len(rs), _metric_value("time_ns", [r["time_ns"] for r in rs]),
                         *(_median([r.get(c, 0) for r in rs]) for c in counters)])
        out.append(format_table(["run", "point", "family", "n", "ms (median)", *counters], rows))
    lat = [r for r in records if r.get("family") == "latency"]
    if lat:
        rows = [[r.get("label") or r.get("row") or "-", r["task"], r["wakeups"], r["latency_p50_ns"] / 1e3,
                 r["latency_p99_ns"] / 1e3, r["latency_max_ns"] / 1e3] for r in lat]
        out.append(format_table(["run", "task", "wakeups", "p50 us", "p99 us", "max us"], rows))
    locks = [r for r in records if r.get("family") == "lock" and r.get("holds")]
    if locks:
        rows = [[r.get("label") or r.get("row") or "-", r["lock"], r["path"], r["holds"], r["hold_p99_ns"] / 1e3,
                 r["hold_max_ns"] / 1e3, r["waits"], r["wait_max_ns"] / 1e3] for r in locks]
        out.append(format_table(["run", "lock", "path", "holds", "hold p99 us", "hold max us", "waits",
                                 "wait max us"], rows))
    return "\n\n".join(out) if out else "(no fork, munmap, latency or lock records)"


#: families whose rows leave zero counters out (a missing counter reads 0)
_COUNTED = ("fork", "exit", "munmap", "run")


def _subject(r: dict[str, Any]) -> str:
    """What a row of a family is about: its task (latency), its lock and path (lock)."""
    if r.get("family") == "latency":
        return str(r.get("task", ""))
    if r.get("family") == "lock":
        return f"{r.get('lock')} {r.get('path')}"
    return ""


def compare_rows(records: Sequence[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """The comparison as tidy rows: one per (point row, variant, family, subject) with one
    column per (metric, across combination), and ``speedup`` columns against the baseline."""
    cc = cfg.compare
    cells: dict[tuple[str, str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    combos: list[str] = []
    for r in records:
        fam = r.get("family")
        if fam not in cc.families:
            continue
        combo = str(r.get("combo", ""))
        if combo not in combos:
            combos.append(combo)
        key = (_row_name(r), str(r.get("variant", "")), fam, _subject(r))
        for m in cc.metrics:
            v = r.get(m, 0 if fam in _COUNTED and not m.endswith("_ns") else None)
            if isinstance(v, int | float) and not isinstance(v, bool):
                cells[key][f"{m}|{combo}"].append(float(v))
    base, others = _speedup_pairs(cfg, [r for r in records if r.get("family") in cc.families])
    out = []
    for (row, variant, fam, subject), vals in cells.items():
        rec: dict[str, Any] = {"point": row, "variant": variant, "family": fam}
        if subject:
            rec["of"] = subject
        for m in cc.metrics:
            for c in combos:
                rec[f"{m} {c}".strip()] = _median(vals.get(f"{m}|{c}", []))
        for b, o in zip(base, others, strict=True):
            tb, to = _median(vals.get(f"time_ns|{b}", [])), _median(vals.get(f"time_ns|{o}", []))
            rec["speedup" if len(base) == 1 else f"speedup {b} vs {o}"] = to / tb if tb > 0 else float("nan")
        out.append(rec)
    return out


def _speedup_pairs(cfg: Config, records: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(baseline combination, other combination) pairs that differ only in the speedup
    axis, whose first value is the baseline (read from the records' axis columns)."""
    cc = cfg.compare
    if cc.speedup is None or cc.speedup not in cc.across:
        return [], []
    keys = list(cc.across)
    axis = keys.index(cc.speedup)
    first = cc.across[cc.speedup][0]
    first = show(first) if isinstance(first, list | dict) else first  # as records spell it
    values: dict[str, tuple[Any, ...]] = {}
    for r in records:
        values.setdefault(str(r.get("combo", "")), tuple(r.get(k) for k in keys))
    base, others = [], []
    for c, cv in values.items():
        if cv[axis] != first:
            continue
        for o, ov in values.items():
            if ov[axis] != first and all(ov[i] == cv[i] for i in range(len(keys)) if i != axis):
                base.append(c)
                others.append(o)
    return base, others


def compare_table(records: Sequence[dict[str, Any]], cfg: Config) -> str:
    """The comparison as text: one table per family, rows = (point, variant), columns =
    each metric for each across combination, then the speedups."""
    rows = compare_rows(records, cfg)
    base, others = _speedup_pairs(cfg, records)
    if not rows:
        return f"(no records of the families {', '.join(cfg.compare.families)} to compare)"
    out = []
    for fam in cfg.compare.families:
        fam_rows = [r for r in rows if r["family"] == fam]
        if not fam_rows:
            continue
        value_cols = [k for k in fam_rows[0] if k not in ("point", "variant", "family", "of")
                      and any(r.get(k) == r.get(k) for r in fam_rows)]  # not all NaN
        subjects = any("of" in r for r in fam_rows)
        headers = ["point", "variant", *(["of"] if subjects else []), *(_header(k) for k in value_cols)]
        body = [[r["point"], r["variant"] or "-", *([r.get("of", "")] if subjects else []),
                 *(_scaled(k, r.get(k)) for k in value_cols)] for r in fam_rows]
        title = f"{fam}: median of {_reps(records)} run(s); ms = simulated milliseconds, us = microseconds"
        if base:
            title += f"; speedup = time at {others[0].split()[0] if len(base) == 1 else 'the other value'} / time at {base[0].split()[0] if len(base) == 1 else 'the first'}"
        out.append(f"{title}\n{format_table(headers, body)}")
    return "\n\n".join(out)


#: short column names for the text table (the CSV keeps the full ones)
_SHORT = {"time_ns": "ms", "contpte_unfolds": "unfolds", "contpte_folds": "folds", "tlbi_ops": "tlbi",
          "folio_ref_ops": "refs", "mapcount_ops": "mapcounts", "pte_writes": "pte wr", "pte_reads": "pte rd"}


def _scaled(col: str, v: Any) -> Any:
    """Times in ms for time_ns columns, µs for other *_ns columns."""
    if not isinstance(v, float) or v != v:
        return v
    if col.startswith("time_ns"):
        return v / 1e6
    if col.split(" ", 1)[0].endswith("_ns"):
        return v / 1e3
    return v


def _header(col: str) -> str:
    if col.startswith("speedup "):
        return col
    metric, _, combo = col.partition(" ")
    if metric not in _SHORT and metric.endswith("_ns"):
        metric = metric[:-3] + " us"
    return f"{_SHORT.get(metric, metric)} {combo}".strip()


def _reps(records: Sequence[dict[str, Any]]) -> int:
    return 1 + max((int(r.get("rep", 0)) for r in records), default=0)
