"""Figures of mmuemu.plot, drawn from small real runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mmuemu
from mmuemu import plot

pytest.importorskip("matplotlib")

MiB = 1 << 20
PNG = b"\x89PNG\r\n\x1a\n"
ORDERS = (0, 2, 4)  # 4K, 16K, 64K folios


def _fork_records(label: str = "") -> list[dict[str, Any]]:
    """Tidy fork and munmap rows (two reps) of an 8 MiB region, both fork modes."""
    rows: list[dict[str, Any]] = []
    for mode in ("batched", "legacy"):
        for point, order in enumerate(ORDERS):
            for rep in range(2):
                m = mmuemu.Machine(arch="x86_64", memory="256MiB", fork_mode=mode)
                p = m.spawn(name="parent")
                a = p.mmap(8 * MiB, align=2 * MiB)
                p.set_folio_orders([order])
                p.populate(a, 8 * MiB)
                with m.measure() as fork:
                    child = p.fork()
                with m.measure() as unmap:
                    p.munmap(a, 8 * MiB)
                child.exit()
                base = {"point": point, "rep": rep, "label": label and f"{label} {mode}",
                        "arch": "x86_64", "contpte": False, "fork_mode": mode, "costs": "default",
                        "runner": "instant", "folio_kib": 4 << order}
                for family, t in (("fork", fork), ("munmap", unmap)):
                    rows.append({**base, "family": family, "time_ns": t.ns, **t.counts})
    return rows


def _simulate(preempt: str) -> mmuemu.Results:
    m = mmuemu.Machine(memory="256MiB", cpus=2)
    p = m.spawn(name="parent")
    a = p.mmap(8 * MiB)
    p.populate(a, 8 * MiB)
    sim = m.simulation(preempt=preempt, trace=True)
    co = [mmuemu.Loop([mmuemu.Sleep(ns=20_000), mmuemu.Run(ns=5_000)], times=8)]
    sim.add_task(m.spawn(name="co"), co, cpu=0, name="co")
    sim.add_task(p, [mmuemu.Fork(child="exit")], cpu=0, name="forker")
    sim.add_task(p, [mmuemu.Access(a, 8 * MiB, pattern="random", writes=0.2, count=2000)], cpu=1,
                 name="thread")
    return sim.run()


def _run_row(label: str, res: mmuemu.Results, rep: int) -> dict[str, Any]:
    return {"point": 0, "rep": rep, "label": label, "arch": "x86_64", "contpte": False,
            "fork_mode": "batched", "costs": "default", "runner": "simpy", "folio_kib": 4,
            "family": "run", "end_ns": res.end_ns, "events": res.events, **res.counters}


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return _fork_records()


@pytest.fixture(scope="module")
def sims() -> dict[str, mmuemu.Results]:
    return {"preempt=none": _simulate("none"), "preempt=full": _simulate("full")}


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_import_without_matplotlib_and_available(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import mmuemu.plot as p\n"
            "assert p.available() is False\n"
            "assert p.write_plots('out', []) == []\n"
            "try:\n    p.fork_times([], 'x.png')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.strip() == "plots need matplotlib: pip install 'mmuemu[plot]'"
    assert not (tmp_path / "out").exists()
    assert plot.available() is True
    assert set(plot.__all__) == {"available", "fork_times", "latency_cdf", "lock_holds", "timeline",
                                 "tlb_misses", "write_plots"}


def test_fork_times_lines_per_label(records: list[dict[str, Any]], tmp_path: Path) -> None:
    fig = plot._fork_times_figure(records)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["fork", "munmap"]
    for ax in axes:
        lines = ax.lines
        # empty labels fall back to arch + fork mode; legacy is dashed, same colour as batched
        assert sorted(ln.get_label() for ln in lines) == ["x86_64 batched", "x86_64 legacy"]
        styles = {ln.get_label(): (ln.get_color(), ln.get_linestyle()) for ln in lines}
        assert styles["x86_64 batched"][0] == styles["x86_64 legacy"][0]
        assert (styles["x86_64 batched"][1], styles["x86_64 legacy"][1]) == ("-", "--")
        assert [t.get_text() for t in ax.get_xticklabels()] == ["4K", "16K", "64K"]
        for ln in lines:
            assert list(ln.get_xdata()) == [4, 16, 64]
    # y is the median in ms: the batched 64K fork is cheaper than the legacy one
    fork = {ln.get_label(): ln.get_ydata() for ln in axes[0].lines}
    assert fork["x86_64 batched"][-1] < fork["x86_64 legacy"][-1]
    first = next(r for r in records if r["family"] == "fork" and r["fork_mode"] == "batched")
    assert fork["x86_64 batched"][0] == pytest.approx(first["time_ns"] / 1e6)

    only_fork = plot._fork_times_figure(records, families=("fork", "exit"))
    assert len(only_fork.get_axes()) == 1
    labelled = [{**r, "label": f"run {r['fork_mode']} {r['folio_kib'] > 4}"} for r in records]
    assert len(plot._fork_times_figure(labelled).get_axes()[0].lines) == 4
    out = plot.fork_times(records, tmp_path / "sub" / "fork")
    assert out == tmp_path / "sub" / "fork.png" and _is_png(out)
    svg = plot.fork_times(records, tmp_path / "fork.svg")
    assert svg.read_text().lstrip().startswith("<?xml")


def test_missing_data_raises_value_error(records: list[dict[str, Any]], sims: dict[str, mmuemu.Results],
                                         tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no 'fork' or 'munmap' rows"):
        plot.fork_times([], tmp_path / "a.png")
    with pytest.raises(ValueError, match="no 'run' rows"):
        plot.tlb_misses(records, tmp_path / "b.png")
    with pytest.raises(ValueError, match="no results"):
        plot.latency_cdf({}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="no wakeups of task 'nobody'"):
        plot.latency_cdf(sims, tmp_path / "c.png", task="nobody")
    with pytest.raises(ValueError, match="no holds of lock 'ptl' on path 'nowhere'"):
        plot.lock_holds(sims, tmp_path / "d.png", path_name="nowhere")
    with pytest.raises(ValueError, match="unknown figure format 'txt'"):
        plot.fork_times(records, tmp_path / "a.txt")
    untraced = mmuemu.Machine(memory="64MiB").simulation(trace=False).run()
    with pytest.raises(ValueError, match="kept no trace"):
        plot.timeline(untraced, tmp_path / "e.png")
    res = next(iter(sims.values()))
    with pytest.raises(ValueError, match="no trace spans"):
        plot.timeline(res, tmp_path / "e.png", start_ns=res.end_ns * 10, end_ns=res.end_ns * 11)
    assert not list(tmp_path.iterdir())


def test_sim_figures(sims: dict[str, mmuemu.Results], tmp_path: Path) -> None:
    fig = plot._latency_cdf_figure(sims, task="co")
    (ax,) = fig.get_axes()
    assert ax.get_xscale() == "log"
    assert plot._lock_holds_figure(sims, path_name="copy_pte_range").get_axes()[0].get_xscale() == "log"
    res = sims["preempt=full"]
    tl = plot._timeline_figure(res)
    ticks = [t.get_text() for t in tl.get_axes()[0].get_yticklabels()]
    assert ticks[:2] == ["cpu0", "cpu1"] and any(t.startswith("ptl ") for t in ticks)
    for name, path in [("latency", plot.latency_cdf(sims, tmp_path / "lat.png")),
                       ("holds", plot.lock_holds(sims, tmp_path / "holds.png")),
                       ("window", plot.timeline(res, tmp_path / "tl.png", start_ns=0, end_ns=50_000))]:
        assert _is_png(path), name
    rows = [_run_row(label, r, rep) for label, r in sims.items() for rep in range(2)]
    fig = plot._tlb_misses_figure(rows)
    heights = [b.get_height() for b in fig.get_axes()[0].patches]
    assert len(heights) == 4  # (L1 misses, walks) x (none, full)
    assert heights[0] == sims["preempt=none"].counters["tlb_l1_misses"] > 0
    assert heights[3] == res.counters["tlb_walks"] > 0


def test_write_plots(records: list[dict[str, Any]], sims: dict[str, mmuemu.Results], tmp_path: Path) -> None:
    rows = records + [_run_row(label, r, 0) for label, r in sims.items()]
    written = plot.write_plots(tmp_path / "all", rows, sims)
    assert {p.name for p in written} == {"fork_times.png", "tlb_misses.png", "latency_cdf.png",
                                         "lock_holds.png", "timeline.png"}
    assert all(p.parent == tmp_path / "all" and _is_png(p) for p in written)
    # one folio size and no simulations: nothing to draw
    one_size = [r for r in records if r["folio_kib"] == 4]
    assert plot.write_plots(tmp_path / "none", one_size) == []
    assert [p.name for p in plot.write_plots(tmp_path / "fork", records, {})] == ["fork_times.png"]
