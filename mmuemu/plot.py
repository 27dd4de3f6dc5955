"""matplotlib figures of experiment records and SimPy results (the optional ``plot`` extra).

matplotlib is imported only when a figure is drawn, and figures are built on
``matplotlib.figure.Figure`` directly: no pyplot, no global backend state.  Every function
saves one figure to ``path`` (the format comes from its suffix; no suffix means ``.png``) and
returns the path written.  Missing data raises ValueError saying what was missing.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmuemu.sim.locks import quantile

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from mmuemu.results import Results

__all__ = ["available", "fork_times", "latency_cdf", "lock_holds", "timeline", "tlb_misses", "write_plots"]

_MISSING = "plots need matplotlib: pip install 'mmuemu[plot]'"
_TLB = ("tlb_l1_misses", "tlb_walks")
_TLB_NAMES = {"tlb_l1_misses": "L1 TLB misses", "tlb_walks": "page walks"}
_CATEGORY = {"user": "#b0b0b0", "kernel": "#d62728", "lock wait": "#9467bd"}
_PATHS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
_MAX_LOCK_ROWS = 24

Records = Iterable[Mapping[str, Any]]


def available() -> bool:
    """Whether matplotlib can be imported (the ``plot`` extra is installed)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ helpers
def _require() -> None:
    """Fail early, before looking at the data, when matplotlib is missing."""
    if not available():
        raise ImportError(_MISSING)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: str | Path) -> Path:
    p = Path(path)
    if not p.suffix:
        p = p.with_suffix(".png")
    fmt = p.suffix[1:].lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"cannot write {str(p)!r}: unknown figure format {fmt!r}; "
                         f"use one of {', '.join(sorted(supported))}")
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format=fmt, dpi=120)
    return p


def _rows(records: Records | Any) -> list[Mapping[str, Any]]:
    """Records as a list of mappings (a pandas DataFrame is accepted too)."""
    if hasattr(records, "to_dict") and not isinstance(records, Mapping):
        records = records.to_dict("records")
    return list(records)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _label(row: Mapping[str, Any]) -> str:
    """The row's comparison label, or one made from its arch, contpte and fork mode."""
    if row.get("label"):
        return str(row["label"])
    contpte = "+contpte" if row.get("contpte") else ""
    return f"{row.get('arch', '?')}{contpte} {row.get('fork_mode', '')}".strip()


def _kib(k: int) -> str:
    return f"{k // 1024}M" if k >= 1024 and k % 1024 == 0 else f"{k}K"


def _trace_events(res: Results) -> list[dict[str, Any]]:
    """The run's Chrome trace events, lock holds included."""
    if not res.has_trace:
        raise ValueError("this run kept no trace: make it with Machine.simulation(trace=True)")
    return res.trace_events()


def _has_spans(res: Results) -> bool:
    return res.has_trace and any(e["ph"] == "X" for e in res.trace_events())


# ------------------------------------------------------------------ fork times
def _fork_rows(records: Records, families: Iterable[str]) -> list[Mapping[str, Any]]:
    fams = set(families)
    return [r for r in _rows(records) if r.get("family") in fams
            and _present(r.get("time_ns")) and _present(r.get("folio_kib"))]


def _fork_times_figure(records: Records, families: tuple[str, ...] = ("fork", "munmap")) -> Figure:
    """The figure of :func:`fork_times` (one axes per family present, one line per label)."""
    _require()
    rows = _fork_rows(records, families)
    present = [f for f in families if any(r["family"] == f for r in rows)]
    if not present:
        raise ValueError(f"no {' or '.join(map(repr, families))} rows with time_ns and folio_kib "
                         "in the records")
    labels = list(dict.fromkeys(_label(r) for r in rows))
    variants = list(dict.fromkeys((r.get("arch"), bool(r.get("contpte"))) for r in rows))
    style: dict[str, dict[str, Any]] = {}
    for r in rows:
        style.setdefault(_label(r), {
            "color": f"C{variants.index((r.get('arch'), bool(r.get('contpte')))) % 10}",
            "linestyle": "--" if r.get("fork_mode") == "legacy" else "-"})
    fig = _figure(4.2 * len(present) + 0.4, 3.8)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, fam in zip(axes, present, strict=True):
        times: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["family"] == fam:
                times[_label(r)][int(r["folio_kib"])].append(float(r["time_ns"]))
        for label in labels:
            if label in times:
                xs = sorted(times[label])
                ys = [statistics.median(times[label][x]) / 1e6 for x in xs]
                ax.plot(xs, ys, marker="o", markersize=4, label=label, **style[label])
        ticks = sorted({int(r["folio_kib"]) for r in rows if r["family"] == fam})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [_kib(k) for k in ticks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_title(fam)
        ax.set_xlabel("folio size")
        ax.set_ylabel("median time (ms)")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes for h in ax.lines}
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=min(4, len(handles)), fontsize="small")
    return fig


def fork_times(records: Records, path: str | Path, *,
               families: tuple[str, ...] = ("fork", "munmap")) -> Path:
    """Median time (ms) against folio size, one subplot per family and one line per label
    (legacy fork dashed; one colour per arch variant)."""
    return _save(_fork_times_figure(records, tuple(families)), path)


# ------------------------------------------------------------------ ECDFs
def _ecdf(ax: Axes, series: Mapping[str, np.ndarray], unit: str) -> bool:
    """Draw an ECDF per series on a log x axis (zeros are counted but cannot be drawn).
    Returns whether the axis is logarithmic."""
    log = any(bool((v > 0).any()) for v in series.values())
    for i, (label, values) in enumerate(series.items()):
        v = np.sort(values)
        y = np.arange(1, len(v) + 1) / len(v)
        zeros = int((v <= 0).sum())
        keep = v > 0 if log else np.ones(len(v), dtype=bool)
        note = f", {zeros} at 0" if log and zeros else ""
        ax.step(v[keep], y[keep], where="post", color=f"C{i % 10}", label=f"{label} (n={len(v)}{note})")
    if log:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction ≤ x")
    ax.set_xlabel(unit)
    ax.grid(alpha=0.3, which="both")
    return log


def _need(results: Mapping[str, Results]) -> None:
    _require()
    if not results:
        raise ValueError("no results to plot: pass a mapping of label -> Results")


def _lock_holds_figure(results: Mapping[str, Results], lock: str = "ptl",
                       path_name: str | None = None) -> Figure:
    _need(results)
    series = {label: res.hold_times_ns(lock, path_name) / 1000 for label, res in results.items()}
    series = {k: v for k, v in series.items() if len(v)}
    where = "" if path_name is None else f" on path {path_name!r}"
    if not series:
        raise ValueError(f"no holds of lock {lock!r}{where} in any of the results")
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    _ecdf(ax, series, "hold time (µs)")
    ax.set_title(f"{lock} hold times{where}")
    ax.legend(fontsize="small")
    return fig


def lock_holds(results: Mapping[str, Results], path: str | Path, *, lock: str = "ptl",
               path_name: str | None = None) -> Path:
    """ECDF (log x, µs) of the hold times of a lock class (on one kernel path) per label."""
    return _save(_lock_holds_figure(results, lock, path_name), path)


def _latency_cdf_figure(results: Mapping[str, Results], task: str | None = None) -> Figure:
    _need(results)
    series = {label: res.latency_ns(task) / 1000 for label, res in results.items()}
    series = {k: v for k, v in series.items() if len(v)}
    if not series:
        who = "" if task is None else f" of task {task!r}"
        raise ValueError(f"no wakeups{who} in any of the results (latency is recorded when a "
                         "Sleep ends)")
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    log = _ecdf(ax, series, "scheduling latency (µs)")
    for i, v in enumerate(series.values()):
        p99 = quantile(np.sort(v), 0.99)
        if p99 > 0 or not log:
            ax.axvline(p99, color=f"C{i % 10}", linestyle=":", linewidth=1)
            ax.annotate(f"p99 {p99:.3g} µs", (p99, 0.99), xytext=(-3, -12 - 10 * i), ha="right",
                        textcoords="offset points", color=f"C{i % 10}", fontsize="x-small")
    ax.axhline(0.99, color="0.5", linewidth=0.5)
    ax.set_title("scheduling latency" + ("" if task is None else f" of {task}"))
    ax.legend(fontsize="small", loc="lower right")
    return fig


def latency_cdf(results: Mapping[str, Results], path: str | Path, *, task: str | None = None) -> Path:
    """ECDF (log x, µs) of the scheduling latency of every wakeup (of ``task``) per label,
    with each label's p99 marked."""
    return _save(_latency_cdf_figure(results, task), path)


# ------------------------------------------------------------------ TLB misses
def _tlb_rows(records: Records) -> list[Mapping[str, Any]]:
    return [r for r in _rows(records)
            if r.get("family") == "run" and any(_present(r.get(k)) for k in _TLB)]


def _tlb_misses_figure(records: Records) -> Figure:
    _require()
    rows = _tlb_rows(records)
    if not rows:
        raise ValueError("no 'run' rows with tlb_l1_misses or tlb_walks in the records "
                         "(SimPy runs whose tasks access memory produce them)")
    by_label: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_label[_label(r)].append(r)
    labels = list(by_label)
    x = np.arange(len(labels))
    width = 0.38
    fig = _figure(max(4.8, 1.3 * len(labels) + 2), 4.0)
    ax = fig.subplots()
    for j, key in enumerate(_TLB):
        vals = [statistics.median(float(r[key]) if _present(r.get(key)) else 0.0 for r in by_label[lb])
                for lb in labels]
        bars = ax.bar(x + (j - 0.5) * width, vals, width, label=_TLB_NAMES[key], color=f"C{j}")
        ax.bar_label(bars, fmt="{:,.0f}", fontsize="x-small")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # room for the legend
    ax.set_xticks(x, labels, rotation=20 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    ax.set_ylabel("count (median over reps)")
    ax.set_title("TLB misses")
    ax.legend(fontsize="small", ncols=2, loc="upper center")
    ax.grid(alpha=0.3, axis="y")
    return fig


def tlb_misses(records: Records, path: str | Path) -> Path:
    """Grouped bars of ``tlb_l1_misses`` and ``tlb_walks`` (median over reps) per label,
    from the "run" rows."""
    return _save(_tlb_misses_figure(records), path)


# ------------------------------------------------------------------ timeline
def _timeline_figure(res: Results, start_ns: float | None = None, end_ns: float | None = None) -> Figure:
    _require()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    events = _trace_events(res)
    lo = 0.0 if start_ns is None else start_ns / 1000  # trace times are in µs
    hi = (max([res.end_ns / 1000] + [e["ts"] + e["dur"] for e in events if e["ph"] == "X"])
          if end_ns is None else end_ns / 1000)
    if hi <= lo:
        raise ValueError(f"empty time window: start_ns {lo * 1000:g} is not before end_ns {hi * 1000:g}")
    spans = [e for e in events if e["ph"] == "X" and e["ts"] < hi and e["ts"] + e["dur"] > lo]
    if not spans:
        raise ValueError(f"no trace spans between {lo * 1000:g} and {hi * 1000:g} ns")
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    cpus = sorted({t for p, t in names if p == 1} | {e["tid"] for e in spans if e["pid"] == 1})
    locks = list(dict.fromkeys(sorted(e["tid"] for e in spans if e["pid"] == 2)))
    hidden = max(0, len(locks) - _MAX_LOCK_ROWS)
    locks = locks[:_MAX_LOCK_ROWS]
    row: dict[tuple[int, int], float] = {(1, c): i for i, c in enumerate(cpus)}
    row.update({(2, t): len(cpus) + 0.5 + j for j, t in enumerate(locks)})
    scale, unit = (1000.0, "ms") if hi - lo >= 10_000 else (1.0, "µs")

    bars: dict[tuple[float, str, str], list[tuple[float, float]]] = defaultdict(list)
    for e in spans:
        if (y := row.get((e["pid"], e["tid"]))) is None:
            continue
        s, t = max(e["ts"], lo), min(e["ts"] + e["dur"], hi)
        kind = "task" if e.get("cat") == "task" else "lock" if e["pid"] == 2 else "cat"
        key = e["name"] if kind != "cat" else e.get("cat", "kernel")
        bars[(y, kind, key)].append(((s - lo) / scale, (t - s) / scale))
    shown = {k for _, kind, k in bars if kind == "task"}  # colours follow the whole run's order
    tasks = [k for k in dict.fromkeys(e["name"] for e in events if e.get("cat") == "task") if k in shown]
    paths = list(dict.fromkeys(k for _, kind, k in bars if kind == "lock"))
    colour = {("task", k): f"C{i % 10}" for i, k in enumerate(tasks)}
    colour.update({("lock", k): _PATHS[i % len(_PATHS)] for i, k in enumerate(paths)})
    colour.update({("cat", k): c for k, c in _CATEGORY.items()})

    nrows = len(cpus) + (len(locks) + 0.5 if locks else 0)
    fig = _figure(10.0, 1.6 + 0.32 * nrows)
    ax = fig.subplots()
    for (y, kind, key), xr in bars.items():
        if kind == "task":  # what ran: a pale full-height band under the kernel/user spans
            ax.broken_barh(xr, (y - 0.4, 0.8), facecolors=colour[(kind, key)], alpha=0.35)
        elif kind == "lock":
            ax.broken_barh(xr, (y - 0.35, 0.7), facecolors=colour[(kind, key)])
        else:
            ax.broken_barh(xr, (y - 0.2, 0.4), facecolors=colour.get((kind, key), "k"))
    marks = {"lock break": ("v", "k"), "TLB shootdown IPI": ("x", "#17becf")}
    handles: list[Any] = []
    for prefix, (marker, c) in marks.items():
        pts = [((e["ts"] - lo) / scale, row[(1, e["tid"])] - 0.3) for e in events
               if e["ph"] == "i" and e["name"].startswith(prefix) and lo <= e["ts"] <= hi
               and (1, e["tid"]) in row]
        if pts:
            ax.plot(*zip(*pts, strict=True), linestyle="none", marker=marker, color=c, markersize=5)
            handles.append(Line2D([], [], linestyle="none", marker=marker, color=c, label=prefix))
    handles += [Patch(color=colour[("task", k)], alpha=0.35, label=f"task {k}") for k in tasks]
    handles += [Patch(color=c, label=k) for k, c in _CATEGORY.items()
                if any(kind == "cat" and key == k for _, kind, key in bars)]
    handles += [Patch(color=colour[("lock", k)], label=f"hold: {k}") for k in paths]
    ticks = sorted(set(row.values()))
    ax.set_yticks(ticks, [names.get(k, f"cpu{k[1]}" if k[0] == 1 else f"lock {k[1]}")
                          for k in sorted(row, key=row.__getitem__)])
    ax.set_ylim(nrows - 0.4, -0.6)
    ax.set_xlim(0, (hi - lo) / scale)
    ax.set_xlabel(f"time since {lo * 1000:g} ns ({unit})")
    more = f" (+{hidden} lock instances not shown)" if hidden else ""
    ax.set_title(f"timeline: CPUs and lock instances{more}")
    ax.grid(alpha=0.3, axis="x")
    fig.legend(handles=handles, loc="outside right upper", fontsize="x-small")
    return fig


def timeline(res: Results, path: str | Path, *, start_ns: float | None = None,
             end_ns: float | None = None) -> Path:
    """A Gantt chart of a traced SimPy run: one row per CPU (tasks, and their user, kernel
    and lock-wait spans by category), then one row per lock instance (its holds)."""
    return _save(_timeline_figure(res, start_ns, end_ns), path)


# ------------------------------------------------------------------ all of them
def write_plots(out_dir: str | Path, records: Records,
                sim_results: Mapping[str, Results] | None = None) -> list[Path]:
    """Write every figure whose data is present into ``out_dir`` (fork_times.png,
    tlb_misses.png, latency_cdf.png, lock_holds.png, timeline.png) and return their paths.

    Returns [] without matplotlib: callers that need the figures check :func:`available`.
    The timeline is drawn for the first result that kept a trace.
    """
    if not available():
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(records)
    written = []
    if len({int(r["folio_kib"]) for r in _fork_rows(rows, ("fork", "munmap"))}) >= 2:
        written.append(fork_times(rows, out / "fork_times.png"))
    if _tlb_rows(rows):
        written.append(tlb_misses(rows, out / "tlb_misses.png"))
    sims = dict(sim_results or {})
    if any(len(r.latency_ns()) for r in sims.values()):
        written.append(latency_cdf(sims, out / "latency_cdf.png"))
    if any(len(r.hold_times_ns("ptl")) for r in sims.values()):
        written.append(lock_holds(sims, out / "lock_holds.png"))
    traced = next((r for r in sims.values() if _has_spans(r)), None)
    if traced is not None:
        written.append(timeline(traced, out / "timeline.png"))
    return written
