"""Checks across fields: does the machine exist, can its arch map these folio orders, do
the names a config uses refer to something, do sweep and compare keys make valid configs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmuemu.arch import available_arches, make_arch
from mmuemu.config.load import did_you_mean, show
from mmuemu.config.program import Resolver, build_program
from mmuemu.errors import ConfigError, MmuEmuError

if TYPE_CHECKING:
    from mmuemu.arch.base import Arch
    from mmuemu.config.schema import Config, ProcessConfig

__all__ = ["FAMILIES", "check_config", "costs_spec", "image_file", "machine_arch", "populated_bytes"]

#: record families a comparison can show (run, latency and lock come from the SimPy runner)
FAMILIES = ("fork", "exit", "munmap", "run", "latency", "lock")
ADVICE = ("hugepage", "nohugepage", "dontfork", "dofork", "wipeonfork", "keeponfork")
MIN_MEMORY = 4 << 20


def _fail(cfg: Config, key: str, value: Any, msg: str) -> ConfigError:
    return ConfigError(f"{cfg.source}: {key} = {show(value)}: {msg}")


def machine_arch(cfg: Config) -> Arch:
    """The arch backend the machine section asks for (a ConfigError if it cannot exist)."""
    mc = cfg.machine
    if mc.arch not in available_arches():
        raise _fail(cfg, "machine.arch", mc.arch,
                    f"allowed: {', '.join(available_arches())}{did_you_mean(mc.arch, available_arches())}")
    options: dict[str, Any] = dict(mc.options)
    if "contpte" in options:
        raise _fail(cfg, "machine.options.contpte", options["contpte"], "set machine.contpte instead")
    if mc.contpte:
        if mc.arch != "arm64":
            raise _fail(cfg, "machine.contpte", True, f"only arm64 has contpte mappings, not {mc.arch}")
        options["contpte"] = True
    try:
        return make_arch(mc.arch, **options)
    except MmuEmuError as e:
        # every option any variant of the arch takes (arm64's contpte layer has more)
        known = getattr(make_arch(mc.arch, **({"contpte": True} if mc.arch == "arm64" else {})),
                        "allowed_options", ())
        hint = next((did_you_mean(k, known) for k in sorted(options) if k not in known), "")
        raise ConfigError(f"{cfg.source}: machine.options: {e}{hint}") from None


def _orders(cfg: Config, arch: Arch, key: str, orders: list[int]) -> None:
    allowed = [0, *range(2, arch.pmd_order + 1)]
    for o in orders:
        if o not in allowed:
            raise _fail(cfg, key, orders, f"folio order {o} cannot be mapped on {arch.name}; allowed: "
                        f"0 and 2..{arch.pmd_order} ({arch.pmd_order} = PMD THP, 2 MiB)")


def costs_spec(cfg: Config) -> str | Path:
    """The machine's cost model: a name, or a path (relative to the config's folder)."""
    spec = cfg.machine.costs
    if Path(spec).suffix and not Path(spec).is_absolute() and not cfg.source.startswith("<"):
        beside = Path(cfg.source).parent / spec
        if beside.exists():
            return beside
    return spec


def _check_machine(cfg: Config) -> Arch:
    from mmuemu.machine import COUNTERS
    from mmuemu.sim.costs import default_costs, load_costs

    arch = machine_arch(cfg)
    mc = cfg.machine
    if mc.memory < MIN_MEMORY:
        raise _fail(cfg, "machine.memory", int(mc.memory), "at least 4MiB")
    if mc.cpus > 256:
        raise _fail(cfg, "machine.cpus", mc.cpus, "at most 256")
    try:
        base = default_costs(mc.arch) if mc.costs == "default" else load_costs(costs_spec(cfg))
    except MmuEmuError as e:
        raise ConfigError(f"{cfg.source}: machine.costs: {e}") from None
    except UnicodeDecodeError:
        raise _fail(cfg, "machine.costs", mc.costs, "not a text file (cost models are TOML)") from None
    except ValueError as e:  # a NUL in the path
        raise _fail(cfg, "machine.costs", mc.costs, f"not a usable path: {e}") from None
    except OSError as e:
        raise _fail(cfg, "machine.costs", mc.costs, f"cannot read it: {e.strerror or e}") from None
    known = set(base.ns) | set(COUNTERS)
    for key, value in mc.cost_ns.items():
        if key not in known:
            raise ConfigError(f"{cfg.source}: unknown key machine.cost_ns.{key}{did_you_mean(key, known)}; "
                              f"operations of {base.name}: {', '.join(sorted(base.ns))}")
        if not value >= 0:  # NaN too
            raise _fail(cfg, f"machine.cost_ns.{key}", value, "a cost cannot be negative")
    for key, value in mc.cost_sim.items():
        if not value >= 0:
            raise _fail(cfg, f"machine.cost_sim.{key}", value, "must not be negative")
    return arch


def image_file(cfg: Config, name: str, pc: ProcessConfig) -> tuple[str, Path] | None:
    """(``"elf"`` or ``"smaps"``, path) of a process's image, resolved against the config's
    directory."""
    if pc.elf is None and pc.smaps is None:
        return None
    kind = "elf" if pc.elf is not None else "smaps"
    raw = Path(pc.elf if pc.elf is not None else pc.smaps)  # type: ignore[arg-type]
    path = raw if raw.is_absolute() or cfg.source.startswith("<") else Path(cfg.source).parent / raw
    if not path.exists() and raw.exists():
        path = raw  # relative to the working directory
    return kind, path


def _check_process(cfg: Config, arch: Arch, name: str, pc: ProcessConfig) -> None:
    _orders(cfg, arch, f"processes.{name}.folio_orders", pc.folio_orders)
    if pc.elf is not None and pc.smaps is not None:
        raise _fail(cfg, f"processes.{name}.elf", pc.elf, "a process has an ELF image or a smaps image, not both")
    img = image_file(cfg, name, pc)
    if img is not None:
        kind, path = img
        if not path.is_file():
            raise _fail(cfg, f"processes.{name}.{kind}", str(path), f"no such {'ELF' if kind == 'elf' else 'smaps'} file")
        if kind == "elf":
            from mmuemu.workload.elf import load_elf

            try:
                load_elf(path, arch.name)
            except ConfigError as e:
                raise ConfigError(f"{cfg.source}: processes.{name}.elf: {e}") from None
    for rname, rc in pc.regions.items():
        key = f"processes.{name}.regions.{rname}"
        if rc.size <= 0:
            raise _fail(cfg, f"{key}.size", int(rc.size), "a region needs a positive size")
        if rc.size > 1 << 46:
            raise _fail(cfg, f"{key}.size", int(rc.size), "larger than the user address space (64 TiB here)")
        if rc.align & (rc.align - 1) or rc.align < 4096:
            raise _fail(cfg, f"{key}.align", int(rc.align), "a power of two of at least 4KiB")
        if rc.folio_orders is not None:
            _orders(cfg, arch, f"{key}.folio_orders", rc.folio_orders)
        for advice in rc.madvise:
            if advice not in ADVICE:
                raise _fail(cfg, f"{key}.madvise", advice, f"allowed: {', '.join(ADVICE)}{did_you_mean(advice, ADVICE)}")


def populated_bytes(cfg: Config) -> int:
    """Bytes the config's regions populate (at most: images count their resident size)."""
    total = 0
    for pc in cfg.processes.values():
        total += sum(int(rc.size) for rc in pc.regions.values() if rc.populate != "none")
    return total


def _check_tasks(cfg: Config) -> None:
    regions_of = {name: {r: (0, int(rc.size)) for r, rc in pc.regions.items()}
                  for name, pc in cfg.processes.items()}
    procs = dict.fromkeys(cfg.processes, None)
    for tname, tc in cfg.tasks.items():
        if tc.process is not None and tc.process not in cfg.processes:
            raise _fail(cfg, f"tasks.{tname}.process", tc.process,
                        f"no such process; processes: {', '.join(cfg.processes) or 'none'}"
                        f"{did_you_mean(tc.process, cfg.processes)}")
        if tc.cpu is not None and not 0 <= tc.cpu < cfg.machine.cpus:
            raise _fail(cfg, f"tasks.{tname}.cpu", tc.cpu, f"this machine has CPUs 0..{cfg.machine.cpus - 1}")
        res = Resolver(cfg.source, tc.process, regions_of, procs)
        build_program(tc.program, f"tasks.{tname}.program", res)


def _check_experiment(cfg: Config) -> None:
    ex = cfg.experiment
    needs_process = ex.kind in ("fork", "munmap", "fork-under-load")
    if needs_process and ex.process not in cfg.processes:
        raise _fail(cfg, "experiment.process", ex.process,
                    f"no such process; processes: {', '.join(cfg.processes) or 'none (add a [processes.NAME] table)'}"
                    f"{did_you_mean(ex.process, cfg.processes)}")
    if ex.kind in ("fork", "munmap") and ex.runner == "instant" and cfg.tasks:
        raise _fail(cfg, "experiment.runner", "instant", "tasks run only on the SimPy runner: set "
                    "experiment.runner = 'simpy' (or kind = 'fork-under-load')")
    if ex.kind == "program" and not cfg.tasks:
        raise _fail(cfg, "experiment.kind", "program", "needs at least one [tasks.NAME] table")
    for key, cpu in (("forker_cpu", ex.forker_cpu), ("child_cpu", ex.child_cpu)):
        if cpu is not None and not 0 <= cpu < cfg.machine.cpus:
            raise _fail(cfg, f"experiment.{key}", cpu, f"this machine has CPUs 0..{cfg.machine.cpus - 1}")


def _check_axes(cfg: Config) -> None:
    from mmuemu.config import with_overrides

    base = cfg
    for key, values in cfg.sweep.items():
        if not values:
            raise _fail(cfg, f"sweep.{key}", values, "a sweep axis needs at least one value")
        if key.split(".")[0] in ("sweep", "compare"):
            raise _fail(cfg, f"sweep.{key}", values, "sweeps and comparisons cannot be swept")
        for v in values:
            with_overrides(base, {key: v}, f"sweep.{key}", strip_axes=True)
    cc = cfg.compare
    for key, values in cc.across.items():
        if not values:
            raise _fail(cfg, f"compare.across.{key}", values, "an axis needs at least one value")
        for v in values:
            with_overrides(base, {key: v}, f"compare.across.{key}", strip_axes=True)
    for vname, overrides in cc.variants.items():
        with_overrides(base, overrides, f"compare.variants.{vname}", strip_axes=True)
    if cc.speedup is not None and len(cc.across.get(cc.speedup, ())) < 2:
        raise _fail(cfg, "compare.speedup", cc.speedup, "must name a compare.across axis with at least "
                    f"two values; axes: {', '.join(cc.across) or 'none'}")
    for fam in cc.families:
        if fam not in FAMILIES:
            raise _fail(cfg, "compare.families", fam, f"allowed: {', '.join(FAMILIES)}")
    if "compar" in Path(cfg.source).name and not (cc.across or cc.variants):
        raise ConfigError(f"{cfg.source}: a comparison config must declare its columns: add "
                          f"[compare] with 'variants' or 'across'")


def check_config(cfg: Config, *, axes: bool = True) -> None:
    """Every check across fields; the first failure is raised as a ConfigError."""
    arch = _check_machine(cfg)
    for name, pc in cfg.processes.items():
        _check_process(cfg, arch, name, pc)
    need = populated_bytes(cfg)
    if need > cfg.machine.memory:
        raise _fail(cfg, "machine.memory", int(cfg.machine.memory),
                    f"the regions populate {need >> 20} MiB: give the machine more memory")
    _check_tasks(cfg)
    _check_experiment(cfg)
    if axes:
        _check_axes(cfg)
