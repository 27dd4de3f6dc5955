"""The ``mmuemu`` command: run, compare, sweep, inspect, list-arches, show-config.

Bad input (a config error, a missing file, an emulated machine out of memory) prints one
line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mmuemu.errors import ConfigError, MmuEmuError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, status 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def _common(p: argparse.ArgumentParser, *, runs: bool = True) -> None:
    p.add_argument("config", help="a TOML config (configs/*.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key before validation (repeatable), e.g. machine.arch=arm64")
    if runs:
        p.add_argument("--out", type=Path, help="results directory (default runs/<name>/<time>)")
        p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
        p.add_argument("--executor", default="local", help="local, dask (a LocalCluster) or dask://HOST:PORT")
        p.add_argument("--no-plots", action="store_true", help="do not write plots")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or tables")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mmuemu", description="Emulate Linux's fork() mm paths on several architectures.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="run an experiment config (its sweep too)")
    _common(p)
    p = sub.add_parser("compare", help="run a config's compare columns side by side")
    _common(p)
    p.add_argument("--across", action="append", default=[], metavar="KEY=V1,V2",
                   help="a compare axis (repeatable), e.g. machine.arch=x86_64,arm64")
    p = sub.add_parser("sweep", help="run a config's sweep on several workers")
    _common(p)
    p = sub.add_parser("inspect", help="VMAs, folio-size mix and page tables of a config's processes, "
                       "an ELF file or a smaps file")
    p.add_argument("target", help="a config (.toml), an ELF file or a /proc/PID/smaps file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--arch", help="the arch to map an ELF or smaps image on (default: the ELF's, or x86_64)")
    p.add_argument("--memory", default="16GiB", help="the machine's memory for an image (default 16GiB)")
    sub.add_parser("list-arches", help="the registered architectures, their options and cost models")
    p = sub.add_parser("show-config", help="print the resolved config (defaults written out) as TOML")
    _common(p, runs=False)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmuemu`` command."""
    args = _parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.cmd](args) or 0)
    except (MmuEmuError, OSError) as e:
        print(f"mmuemu: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmuemu: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename:
        text = f"{e.filename}: {e.strerror}"
    return " ".join(text.split())


def _across(items: Sequence[str]) -> dict[str, list[Any]]:
    from mmuemu.config.load import parse_value

    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--across {item!r}: give KEY=V1,V2 (e.g. machine.arch=x86_64,arm64)")
        out[key.strip()] = [parse_value(v.strip()) for v in values.split(",")]
    return out


def _run(args: argparse.Namespace, *, compare: bool = False) -> int:
    from mmuemu import experiment, report
    from mmuemu.config import load_config, with_overrides
    from mmuemu.output import default_dir, write_run
    from mmuemu.sweep import check_executor

    check_executor(args.executor, args.jobs)
    cfg = load_config(args.config, args.overrides)
    across = _across(getattr(args, "across", []))
    if across:  # check the new axes before running anything
        for key, values in across.items():
            for v in values:
                with_overrides(cfg, {key: v}, f"--across {key}", strip_axes=True)
    if compare and not (cfg.compare.variants or cfg.compare.across or across):
        raise ConfigError(f"{cfg.source}: nothing to compare: give --across KEY=V1,V2 or a [compare] table")
    t0 = time.perf_counter()
    res = experiment.run(cfg, compare=compare, across=across, executor=args.executor, jobs=args.jobs,
                         progress=not args.quiet)
    seconds = time.perf_counter() - t0
    summary = report.summary_table(res.records)
    cmp = None
    if compare:
        cmp_cfg = cfg if not across else _with_across(cfg, across)
        cmp = (report.compare_table(res.records, cmp_cfg), report.compare_rows(res.records, cmp_cfg))
    out = args.out or default_dir(cfg)
    files = write_run(out, res, summary=summary, compare=cmp, command=["mmuemu", *sys.argv[1:]],
                      seconds=seconds, executor=args.executor, plots=not args.no_plots)
    if not args.quiet:
        print(cmp[0] if cmp else summary)
        plots = [f for f in files if f.suffix in (".png", ".svg", ".pdf")]
        print(f"\n{len(res.records)} records from {len(res.points)} point(s) in {seconds:.1f} s -> {out}"
              + (f" ({len(plots)} plots)" if plots else ""))
    return 0


def _with_across(cfg: Any, across: dict[str, list[Any]]) -> Any:
    from attrs import evolve

    return evolve(cfg, compare=evolve(cfg.compare, across={**cfg.compare.across, **across}))


def _sweep(args: argparse.Namespace) -> int:
    if args.jobs == 1 and args.executor == "local":
        args.jobs = max(1, min(os.cpu_count() or 1, 8))
    return _run(args)


def _inspect(args: argparse.Namespace) -> int:
    from mmuemu import report
    from mmuemu.memmap import memory_map

    target = Path(args.target)
    if not target.exists():
        raise ConfigError(f"{target}: no such file")
    for title, proc in _inspect_processes(target, args):
        mm = memory_map(proc)
        print(f"== {title}")
        print(report.format_table(["start", "end", "prot", "kind", "size KiB", "rss KiB", "thp KiB", "name"],
                                  [[v["start"], v["end"], v["prot"], v["kind"], v["size_kib"], v["rss_kib"],
                                    v["thp_kib"], v["name"]] for v in mm.vmas]))
        if mm.folio_mix:
            print("\nfolio-size mix of mapped memory")
            print(report.format_table(["folio", "mapped by", "KiB"],
                                      [[f"{m['folio_kib']}K", m["mapping"], m["kib"]] for m in mm.folio_mix]))
        print("\npage-table pages: " + ", ".join(f"{k} {v}" for k, v in mm.pagetable_pages.items()))
        print()
    return 0


def _inspect_processes(target: Path, args: argparse.Namespace) -> list[tuple[str, Any]]:
    from mmuemu.machine import Machine

    if target.suffix == ".toml":
        from mmuemu.config import load_config
        from mmuemu.experiment import build_machine, build_processes

        cfg = load_config(target, args.overrides)
        m = build_machine(cfg)
        return [(f"process {name} ({cfg.machine.arch})", p) for name, (p, _) in build_processes(m, cfg).items()]
    from mmuemu.workload import load_elf, load_smaps, map_image

    with target.open("rb") as f:
        is_elf = f.read(4) == b"\x7fELF"
    image = load_elf(target, args.arch) if is_elf else load_smaps(target)
    arch = args.arch or image.arch or "x86_64"
    m = Machine(arch=arch, memory=args.memory)
    p = m.spawn(name=target.name)
    map_image(p, image, populate=True)
    skipped = f"; not modelled: {', '.join(image.skipped)}" if image.skipped else ""
    return [(f"{image.format} image {target} on {arch}{skipped}", p)]


def _list_arches(args: argparse.Namespace) -> int:
    from mmuemu import report
    from mmuemu.arch import available_arches, make_arch, overridden_helpers
    from mmuemu.sim.costs import DEFAULT_COSTS, cost_dirs

    rows = []
    for name in available_arches():
        variants: list[tuple[str, dict[str, Any]]] = [(name, {})] + ([(f"{name}+contpte", {"contpte": True})] if name == "arm64" else [])
        for label, opts in variants:
            a = make_arch(name, **opts)
            rows.append([label, ", ".join(getattr(a, "allowed_options", ())) or "-",
                         DEFAULT_COSTS.get(name, "-"), len(overridden_helpers(a))])
    print(report.format_table(["arch", "options", "default costs", "helpers overridden"], rows))
    models = sorted({p.stem for d in cost_dirs() if d.is_dir() for p in d.glob("*.toml")})
    print(f"\ncost models: {', '.join(models)}")
    return 0


def _show_config(args: argparse.Namespace) -> int:
    from mmuemu.config import load_config, to_toml

    print(to_toml(load_config(args.config, args.overrides)), end="")
    return 0


_COMMANDS = {
    "run": _run,
    "compare": lambda a: _run(a, compare=True),
    "sweep": _sweep,
    "inspect": _inspect,
    "list-arches": _list_arches,
    "show-config": _show_config,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
