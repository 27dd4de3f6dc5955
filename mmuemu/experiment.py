"""Experiments: a config becomes points (sweep values times compare columns), each point a
machine with its processes and one run per repetition, each run tidy records.

A record is one row per run and metric family: the point's parameters (its dotted keys),
``label`` (its compare column), ``arch``, ``contpte``, ``fork_mode``, ``costs``, ``runner``,
``folio_kib``, ``rep``, ``family`` and the family's values (``time_ns`` and the operation
counters for fork, exit and munmap; task, lock, latency and run rows from the SimPy runner).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from attrs import frozen

from mmuemu.config import Config, load_config, with_overrides
from mmuemu.config.check import costs_spec, image_file
from mmuemu.config.load import parse_overrides, show
from mmuemu.config.program import Resolver, build_program
from mmuemu.machine import Machine
from mmuemu.process import Process
from mmuemu.results import Results
from mmuemu.sim.costs import CostModel, default_costs, load_costs
from mmuemu.sim.program import Fork, Loop, Munmap, Sleep

__all__ = ["Point", "build_machine", "build_processes", "points", "run", "run_point"]

Regions = dict[str, tuple[int, int]]


@frozen
class Point:
    """One configuration of an experiment: ``params`` are the dotted keys its sweep and
    compare axes set, ``label`` its compare column, ``seed`` its own seed."""

    index: int
    config: Config
    params: dict[str, Any]
    label: str
    row: str
    seed: int
    variant: str = ""
    combo: str = ""


def _product(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(axes[k] for k in keys))]


def _word(v: Any) -> str:
    return v if isinstance(v, str) else show(v)


def _folio(kib: int) -> str:
    return f"{kib // 1024}M" if kib >= 1024 else f"{kib}K"


def _axis_word(key: str, v: Any) -> str:
    """A sweep value as a table row names it: folio orders as the largest folio size."""
    if key.endswith("folio_orders") and isinstance(v, list) and v and all(isinstance(o, int) for o in v):
        return _folio(4 << max(v))
    return f"{key.rsplit('.', 1)[-1]}={_word(v)}"


def columns(cfg: Config, across: Mapping[str, Sequence[Any]] | None = None,
            ) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The compare columns: (label, variant, combination, overrides) for every variant
    times every combination of the across axes (``across`` adds to or replaces the
    config's)."""
    axes = {**cfg.compare.across, **(across or {})}
    variants = list(cfg.compare.variants.items()) or [("", {})]
    out = []
    for vname, vset in variants:
        for combo in _product(axes):
            words = " ".join(_word(v) for v in combo.values())
            out.append((f"{vname} {words}".strip(), vname, words, {**vset, **combo}))
    return out


def points(cfg: Config, *, compare: bool = False, across: Mapping[str, Sequence[Any]] | None = None,
           ) -> list[Point]:
    """Every point of the config: the sweep product, times the compare columns when
    ``compare``.  Seeds come from one SeedSequence of ``experiment.seed``."""
    rows = _product(cfg.sweep)
    cols = columns(cfg, across) if compare else [("", "", "", {})]
    seeds = np.random.SeedSequence(cfg.experiment.seed).spawn(len(rows) * len(cols))
    out = []
    for r, sweep_vals in enumerate(rows):
        row = ", ".join(_axis_word(k, v) for k, v in sweep_vals.items())
        for c, (label, variant, combo, col_vals) in enumerate(cols):
            params = {**sweep_vals, **col_vals}
            i = r * len(cols) + c
            point_cfg = with_overrides(cfg, params, f"point {label or row or i}", strip_axes=True) if params else cfg
            out.append(Point(i, point_cfg, params, label, row, int(seeds[i].generate_state(1)[0]),
                             variant, combo))
    return out


# ---------------------------------------------------------------- building
def cost_model(cfg: Config) -> CostModel:
    """The machine's cost model with the config's single-entry overrides."""
    mc = cfg.machine
    base = default_costs(mc.arch) if mc.costs == "default" else load_costs(costs_spec(cfg))
    if not (mc.cost_ns or mc.cost_sim):
        return base
    return CostModel(f"{base.name}*", base.arch, {**base.ns, **mc.cost_ns}, base.description,
                     {**base.sim, **mc.cost_sim})


def build_machine(cfg: Config) -> Machine:
    """The machine a config describes."""
    mc = cfg.machine
    options: dict[str, Any] = dict(mc.options)
    if mc.contpte:
        options["contpte"] = True
    return Machine(arch=mc.arch, memory=int(mc.memory), cpus=mc.cpus, fork_mode=mc.fork_mode,
                   costs=cost_model(cfg), **options)


def build_processes(m: Machine, cfg: Config) -> dict[str, tuple[Process, Regions]]:
    """Every process of the config, mapped and populated: name -> (process, regions)."""
    out: dict[str, tuple[Process, Regions]] = {}
    for name, pc in cfg.processes.items():
        p = m.spawn(name=name)
        p.set_folio_orders(pc.folio_orders)
        regions: Regions = {}
        img = image_file(cfg, name, pc)
        if img is not None:
            from mmuemu.workload import load_elf, load_smaps, map_image

            kind, path = img
            image = load_elf(path, m.arch.name) if kind == "elf" else load_smaps(path)
            names = map_image(p, image, populate=pc.populate_image)  # in the image's order
            for r, (rname, addr) in zip(image.regions, names.items(), strict=True):
                regions[rname] = (addr, r.size)
        for rname, rc in pc.regions.items():
            a = p.mmap(int(rc.size), prot=rc.prot, shared=rc.shared, align=int(rc.align))
            for advice in rc.madvise:
                p.madvise(a, int(rc.size), advice)
            if rc.populate != "none":
                p.set_folio_orders(rc.folio_orders if rc.folio_orders is not None else pc.folio_orders)
                p.populate(a, int(rc.size), write=rc.populate == "write")
                p.set_folio_orders(pc.folio_orders)
                if rc.pte_mapped:
                    p.split_huge_pmd(a, int(rc.size))
            regions[rname] = (a, int(rc.size))
        out[name] = (p, regions)
    return out


def folio_kib(cfg: Config, process: str) -> int:
    """The largest anon folio size (KiB) the process's regions are populated with."""
    pc = cfg.processes.get(process)
    if pc is None:
        return 4
    orders = [max(rc.folio_orders if rc.folio_orders is not None else pc.folio_orders, default=0)
              for rc in pc.regions.values()] or [max(pc.folio_orders, default=0)]
    return 4 << max(orders)


def _base_row(point: Point, rep: int, runner: str, m: Machine) -> dict[str, Any]:
    cfg = point.config
    return {"point": point.index, "rep": rep, "label": point.label, "row": point.row,
            "variant": point.variant, "combo": point.combo,
            "arch": cfg.machine.arch, "contpte": cfg.machine.contpte, "fork_mode": cfg.machine.fork_mode,
            "costs": m.costs.name, "runner": runner, "kind": cfg.experiment.kind,
            "folio_kib": folio_kib(cfg, cfg.experiment.process),
            **{k: _cell(v) for k, v in point.params.items()}}


def _cell(v: Any) -> Any:
    return show(v) if isinstance(v, list | dict) else v


# ---------------------------------------------------------------- running
def _run_instant(point: Point) -> list[dict[str, Any]]:
    cfg, ex = point.config, point.config.experiment
    rows = []
    for rep in range(ex.repetitions):
        m = build_machine(cfg)
        procs = build_processes(m, cfg)
        p, regions = procs[ex.process]
        size = sum(n for _, n in regions.values())
        base = _base_row(point, rep, "instant", m)

        def add(family: str, t: Any, base: dict[str, Any] = base, size: int = size) -> None:
            rows.append({**base, "family": family, "time_ns": t.ns, "size_bytes": size, **dict(t.counts)})

        if ex.kind == "fork":
            with m.measure() as t:
                child = p.fork()
            add("fork", t)
            with m.measure() as t:
                child.exit()
            add("exit", t)
        if ex.kind == "munmap" or ex.then_munmap:
            with m.measure() as t:
                for addr, length in regions.values():
                    p.munmap(addr, length)
            add("munmap", t)
        if ex.check:
            m.check()
    return rows


def _run_simpy(point: Point, seed: int, rep: int) -> tuple[list[dict[str, Any]], Results]:
    cfg, ex, mc = point.config, point.config.experiment, point.config.machine
    m = build_machine(cfg)
    procs = build_processes(m, cfg)
    sim = m.simulation(preempt=mc.preempt, hz=mc.hz, trace=cfg.output.trace or cfg.output.plots, seed=seed)
    regions_of = {name: regs for name, (_, regs) in procs.items()}
    handles = {name: p for name, (p, _) in procs.items()}
    for tname, tc in cfg.tasks.items():
        names = Resolver(cfg.source, tc.process, regions_of, handles)
        program = build_program(tc.program, f"tasks.{tname}.program", names)
        task = sim.add_task(handles[tc.process] if tc.process else None, program, cpu=tc.cpu, name=tname,
                            start_ns=tc.start_ns)
        task.mappings.update(regions_of.get(tc.process or "", {}))
    forker = None
    if ex.kind in ("fork", "fork-under-load", "munmap"):
        p, regions = procs[ex.process]
        if ex.kind == "munmap":
            prog: tuple[Any, ...] = (Sleep(ns=ex.interval_ns), *(Munmap(name=r) for r in regions))
        else:
            prog = (Loop(body=[Sleep(ns=ex.interval_ns), Fork(child="exit", cpu=ex.child_cpu)], times=ex.forks),)
        forker = sim.add_task(p, prog, cpu=ex.forker_cpu, name="forker")
        forker.mappings.update(regions)
    res = sim.run(until_ns=ex.until_ns)
    if ex.check:
        m.check()
    base = _base_row(point, rep, "simpy", m)
    rows = [{**base, "family": "run", "end_ns": res.end_ns, "events": res.events, **dict(res.counters)}]
    for r in res.records:
        r = dict(r)
        rows.append({**base, "family": r.pop("kind"), **r})
    if forker is not None:
        rows += [{**base, "family": "fork", "fork": i, "time_ns": ns} for i, ns in enumerate(forker.fork_ns)]
    return rows, res


def run_point(point: Point) -> tuple[list[dict[str, Any]], Results | None]:
    """The records of every repetition of one point (and the SimPy results of its first
    repetition, for plots)."""
    ex = point.config.experiment
    if ex.runner == "instant" and ex.kind in ("fork", "munmap"):
        return _run_instant(point), None
    seeds = np.random.SeedSequence(point.seed).generate_state(ex.repetitions)
    rows: list[dict[str, Any]] = []
    first: Results | None = None
    for rep in range(ex.repetitions):
        r, res = _run_simpy(point, int(seeds[rep]), rep)
        rows += r
        first = first or res
    return rows, first


def run(config: Config | str | Path, overrides: Sequence[str] | Mapping[str, Any] = (), *,
        compare: bool = False, across: Mapping[str, Sequence[Any]] | None = None,
        executor: str = "local", jobs: int = 1, progress: bool = False) -> Results:
    """Run an experiment (a config or a TOML path) and return its records.

    ``compare`` adds the compare columns to the sweep; ``executor`` is ``local`` (``jobs``
    worker processes), ``dask`` (a LocalCluster) or ``dask://HOST:PORT``."""
    from mmuemu.sweep import map_points

    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if isinstance(config, Config) and overrides:
        pairs = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides, cfg.source)
        cfg = with_overrides(cfg, pairs, "overrides")
    pts = points(cfg, compare=compare or bool(across), across=across)
    outcomes = map_points(run_point, pts, executor=executor, jobs=jobs, progress=progress)
    records = [row for rows, _ in outcomes for row in rows]
    sims = {(f"{p.label} {p.row}".strip() or str(p.index)): res
            for p, (_, res) in zip(pts, outcomes, strict=True) if res is not None}
    return Results(records=records, config=cfg, sims=sims, points=[p.params for p in pts])
