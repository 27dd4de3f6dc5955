"""Experiment configs: TOML files structured into frozen attrs classes with cattrs.

A config has the sections ``machine``, ``processes`` (named tables), ``tasks`` (named
tables, programs for the SimPy runner), ``experiment``, ``sweep`` (dotted key -> list of
values, expanded as a product), ``compare`` (the columns of ``mmuemu compare``) and
``output``.  ``--set key=value`` overrides apply before validation.  Unknown keys are
rejected; every error is a :class:`~mmuemu.errors.ConfigError` naming the file, the dotted
key, the bad value and what is allowed.  docs/configs.md describes every key.
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from attrs import evolve

from mmuemu.config.check import check_config
from mmuemu.config.load import apply_overrides, load_raw, parse_overrides, structure, unstructure
from mmuemu.config.schema import (
    CompareConfig,
    Config,
    ExperimentConfig,
    MachineConfig,
    OutputConfig,
    ProcessConfig,
    RegionConfig,
    TaskConfig,
)
from mmuemu.errors import ConfigError

__all__ = [
    "CompareConfig",
    "Config",
    "ExperimentConfig",
    "MachineConfig",
    "OutputConfig",
    "ProcessConfig",
    "RegionConfig",
    "TaskConfig",
    "build_config",
    "load_config",
    "native_arch",
    "to_dict",
    "to_toml",
    "with_overrides",
]


def build_config(raw: dict[str, Any], source: str, *, axes: bool = True) -> Config:
    """Structure and check a raw config (the file's tables after overrides)."""
    if "source" in raw:
        raise ConfigError(f"{source}: unknown key 'source' (the file a config came from is not set in it)")
    cfg: Config = structure(raw, Config, source)
    cfg = evolve(cfg, source=source, name=cfg.name or Path(source).stem)
    if cfg.machine.arch == "native":
        cfg = evolve(cfg, machine=evolve(cfg.machine, arch=native_arch(source)))
    check_config(cfg, axes=axes)
    return cfg


#: platform.machine() names -> mmuemu arch names
_NATIVE = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


def native_arch(source: str = "<config>") -> str:
    """The mmuemu arch of the machine running mmuemu (``arch = "native"`` in a config)."""
    name = platform.machine().lower()
    if name not in _NATIVE:
        raise ConfigError(f"{source}: machine.arch = 'native': this machine is {name!r}, which mmuemu "
                          f"does not emulate; allowed: {', '.join(sorted(set(_NATIVE.values())))}")
    return _NATIVE[name]


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = (),
                *, name: str | None = None) -> Config:
    """A validated :class:`Config` from a TOML path (or a dict of tables), with ``--set``
    style ``"key=value"`` overrides (or a mapping of dotted keys) applied first."""
    if isinstance(source, Mapping):
        raw, where = copy.deepcopy(dict(source)), name or "<config>"
    else:
        raw, where = load_raw(source), str(source)
    pairs = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides, where)
    apply_overrides(raw, pairs, where)
    return build_config(raw, where)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain tables (every default written out)."""
    raw = unstructure(cfg)
    raw.pop("source", None)
    return raw


def to_toml(cfg: Config) -> str:
    """The resolved config as a TOML document that loads back to an equal config."""
    return tomli_w.dumps(to_dict(cfg))


def with_overrides(cfg: Config, overrides: Mapping[str, Any], where: str = "overrides", *,
                   strip_axes: bool = False) -> Config:
    """``cfg`` with dotted-key overrides applied and checked again.  ``strip_axes`` drops
    the sweep and compare sections (a point of a sweep is a plain config)."""
    raw = to_dict(cfg)
    if strip_axes:
        raw.pop("sweep", None)
        raw.pop("compare", None)
    try:
        apply_overrides(raw, overrides, cfg.source)
        return build_config(raw, cfg.source, axes=not strip_axes)
    except ConfigError as e:
        raise ConfigError(f"{e} (set by {where})") from None

