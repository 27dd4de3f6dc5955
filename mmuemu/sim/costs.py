"""Cost models: what one operation of each counted kind costs on a given machine.

A cost model is data (``configs/costs/<name>.toml``): per-operation costs in nanoseconds,
keyed by the counter names the mm core emits.  Counters without a cost are free.  Costs are
kept in integer picoseconds so that per-item sums and totals agree exactly.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from attrs import field, frozen
from numpy.typing import NDArray

from mmuemu.errors import ConfigError
from mmuemu.mm.work import Ops

__all__ = ["CostModel", "cost_dirs", "default_costs", "load_costs"]

DEFAULT_COSTS = {"x86_64": "xeon-4210r", "arm64": "altra"}


def cost_dirs() -> list[Path]:
    """Where named cost models are looked up: the repository's configs/costs, then the copy
    packaged with mmuemu."""
    here = Path(__file__).resolve().parent.parent
    return [here.parent / "configs" / "costs", here / "_configs" / "costs"]


def _freeze(m: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(m))


@frozen
class CostModel:
    """Per-operation costs (ns) of one machine."""

    name: str
    arch: str
    ns: Mapping[str, float] = field(converter=_freeze)
    description: str = ""
    #: the timing runner's machine parameters (TLB geometry and latencies, IPI and context
    #: switch costs): the ``[sim]`` table of the file
    sim: Mapping[str, float] = field(converter=_freeze, factory=dict)
    #: ``ns`` in picoseconds, rounded once
    _ps: Mapping[str, int] = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_ps", {k: round(v * 1000) for k, v in self.ns.items()})

    def param(self, name: str, default: float) -> float:
        """A ``[sim]`` parameter, or ``default``."""
        return float(self.sim.get(name, default))

    def ps(self, name: str) -> int:
        return self._ps.get(name, 0)

    def total_ps(self, totals: Mapping[str, int]) -> int:
        """The cost of these operation counts, in picoseconds."""
        ps = self._ps
        return sum(ps[name] * int(c) for name, c in totals.items() if name in ps)

    def item_ps(self, ops: Ops) -> NDArray[np.int64]:
        """The cost of every item of ``ops``, in picoseconds."""
        out = np.zeros(ops.n_items, dtype=np.int64)
        for name in ops.names():
            p = self.ps(name)
            if p:
                out += p * ops.per_item(name)
        return out


def load_costs(spec: str | Path | CostModel) -> CostModel:
    """A cost model from a name (``"xeon-4210r"``), a TOML path, or a CostModel."""
    if isinstance(spec, CostModel):
        return spec
    path = Path(spec)
    if not path.suffix:
        for d in cost_dirs():
            if (d / f"{spec}.toml").is_file():
                path = d / f"{spec}.toml"
                break
        else:
            known = sorted({p.stem for d in cost_dirs() if d.is_dir() for p in d.glob("*.toml")})
            raise ConfigError(f"unknown cost model {spec!r}; available: {', '.join(known)}")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: cost model file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    ns = data.get("ns")
    if not isinstance(ns, dict) or not all(isinstance(v, int | float) and v >= 0 for v in ns.values()):
        raise ConfigError(f"{path}: key 'ns' must be a table of non-negative numbers (ns per operation)")
    sim = data.get("sim", {})
    if not isinstance(sim, dict) or not all(isinstance(v, int | float) and v >= 0 for v in sim.values()):
        raise ConfigError(f"{path}: key 'sim' must be a table of non-negative numbers")
    return CostModel(str(data.get("name", path.stem)), str(data.get("arch", "")), ns,
                     str(data.get("description", "")), sim)


def default_costs(arch: str) -> CostModel:
    """The shipped cost model of an architecture (free operations if it has none)."""
    name = DEFAULT_COSTS.get(arch)
    if name is None:
        return CostModel(f"{arch}-zero", arch, {})
    return load_costs(name)
