"""The results directory of a run (gem5's habit: the resolved config sits next to the
results): config.toml and config.json, meta.json, tidy records.csv and records.json,
summary.txt (and compare.txt/compare.csv), plots and the SimPy timeline."""

from __future__ import annotations

import csv
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmuemu.arch import make_arch, overridden_helpers
from mmuemu.config import Config, to_dict, to_toml
from mmuemu.results import Results

__all__ = ["default_dir", "meta", "write_csv", "write_run"]


def default_dir(cfg: Config) -> Path:
    """``runs/<config name>/<UTC date-time>``."""
    return Path("runs") / cfg.name / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Rows as CSV; the columns are every key any row has, in first-seen order."""
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cols), restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: _plain(v) for k, v in r.items()})
    return path


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def meta(res: Results, *, command: Sequence[str] | None = None, seconds: float | None = None,
         executor: str = "local") -> dict[str, Any]:
    """What produced a run: versions, command, seed, and per machine kind its cost model
    and the generic arch helpers its backend overrides."""
    import mmuemu

    costs: dict[tuple[str, bool], set[str]] = {}
    for r in res.records:
        costs.setdefault((str(r["arch"]), bool(r.get("contpte"))), set()).add(str(r.get("costs")))
    machines = {f"{arch}{'+contpte' if contpte else ''}": {
        "costs": sorted(names),
        "overridden_helpers": overridden_helpers(make_arch(arch, **({"contpte": True} if contpte else {}))),
    } for (arch, contpte), names in costs.items()}
    cfg: Config | None = res.config
    return {"mmuemu": mmuemu.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "command": list(command) if command else sys.argv,
            "seed": cfg.experiment.seed if cfg else None, "points": len(res.points),
            "records": len(res.records), "executor": executor, "seconds": seconds,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machines": machines}


def write_run(out: str | Path, res: Results, *, summary: str, compare: tuple[str, list[dict[str, Any]]] | None = None,
              command: Sequence[str] | None = None, seconds: float | None = None, executor: str = "local",
              plots: bool = True) -> list[Path]:
    """Write the run directory; returns the files written."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    cfg: Config = res.config
    files = [d / "config.toml", d / "config.json", d / "points.json", d / "meta.json", d / "records.json",
             d / "summary.txt"]
    files[0].write_text(to_toml(cfg))
    files[1].write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    files[2].write_text(json.dumps(res.points, indent=2, default=str) + "\n")
    files[3].write_text(json.dumps(meta(res, command=command, seconds=seconds, executor=executor),
                                   indent=2) + "\n")
    files[4].write_text(json.dumps([{k: _plain(v) for k, v in r.items()} for r in res.records]) + "\n")
    files[5].write_text(summary + "\n")
    files.append(write_csv(d / "records.csv", res.records))
    if compare is not None:
        text, rows = compare
        (d / "compare.txt").write_text(text + "\n")
        files += [d / "compare.txt", write_csv(d / "compare.csv", rows)]
    if cfg.output.trace:
        for sim in res.sims.values():  # the first point's timeline
            if sim.has_trace:
                files.append(sim.write_trace(d / "trace.json"))
                break
    if plots and cfg.output.plots:
        from mmuemu import plot

        files += plot.write_plots(d / "plots", res.records, res.sims)
    return files
