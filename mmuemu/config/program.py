"""Task programs in configs: lists of action tables (``{op = "fork", child = "exit"}``)
turned into the SimPy runner's actions (:mod:`mmuemu.sim.program`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from mmuemu.config.load import did_you_mean, show
from mmuemu.config.values import parse_size_value
from mmuemu.errors import ConfigError, MmuEmuError
from mmuemu.sim import program as act

__all__ = ["OPS", "Resolver", "build_program"]

#: op name -> action class
OPS: dict[str, type] = {
    "run": act.Run, "sleep": act.Sleep, "access": act.Access, "fork": act.Fork, "mmap": act.Mmap,
    "munmap": act.Munmap, "mprotect": act.Mprotect, "madvise": act.Madvise, "rmap-walk": act.RmapWalk,
    "exit": act.Exit, "loop": act.Loop,
}
#: fields given as sizes ("64KiB")
_SIZES = {"length", "stride"}
#: keys a config may use besides the action's fields: ``region`` names a region of the
#: task's process (or a mapping its program makes)
_EXTRA = {"op", "region"}


@attrs.define
class Resolver:
    """Looks names up while a program is built: the task's process, the regions of every
    process (process -> region -> (address, length)), what each process name stands for
    (a Process when the run is built), and the source for errors."""

    source: str
    process: str | None = None
    regions_of: Mapping[str, Mapping[str, tuple[int, int]]] = attrs.field(factory=dict)
    processes: Mapping[str, Any] = attrs.field(factory=dict)
    #: names the program's own Mmap actions give (known while the top-level list is built)
    mmap_names: set[str] = attrs.field(factory=set)

    def fail(self, where: str, value: Any, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where} = {show(value)}: {msg}")


def build_program(raw: Any, where: str, res: Resolver) -> tuple[Any, ...]:
    """The actions of a program given as a list of tables."""
    if not isinstance(raw, list):
        raise res.fail(where, raw, "expected a list of action tables like {op = \"sleep\", ns = 1000}")
    res.mmap_names |= _mmap_names(raw)
    return tuple(_action(item, f"{where}.{i}", res) for i, item in enumerate(raw))


def _mmap_names(raw: Any) -> set[str]:
    out: set[str] = set()
    for item in raw if isinstance(raw, list) else ():
        if isinstance(item, dict):
            if item.get("op") == "mmap" and isinstance(item.get("name"), str):
                out.add(item["name"])
            for key in ("body", "child"):
                out |= _mmap_names(item.get(key))
    return out


def _action(item: Any, where: str, res: Resolver) -> Any:
    if not isinstance(item, dict):
        raise res.fail(where, item, "expected an action table like {op = \"sleep\", ns = 1000}")
    op = item.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise res.fail(f"{where}.op", op, f"allowed: {', '.join(OPS)}{did_you_mean(str(op), OPS)}")
    cls = OPS[op]
    names = {f.name for f in attrs.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in item.items():
        if key in _EXTRA:
            continue
        if key not in names:
            allowed = sorted(names | _EXTRA)
            raise ConfigError(f"{res.source}: unknown key {where}.{key}{did_you_mean(key, allowed)}; "
                              f"allowed in {op!r} actions: {', '.join(allowed)}")
        kwargs[key] = _value(cls, key, value, f"{where}.{key}", res)
    region, key = item.get("region"), "region"
    if region is None and isinstance(item.get("addr"), str):  # addr = "heap" names a region too
        region, key = kwargs.pop("addr"), "addr"
    if region is not None:
        owner = item.get("process") if op == "rmap-walk" else res.process
        _region(op, region, kwargs, f"{where}.{key}", res, owner)
    try:
        return cls(**kwargs)
    except (MmuEmuError, ValueError, TypeError) as e:
        msg = str(e)
        if isinstance(e, TypeError) and "missing" in msg:
            msg = f"missing required key {msg.rsplit(':', 1)[-1].strip()}"
        raise ConfigError(f"{res.source}: {where} ({op}): {msg}") from None


def _value(cls: type, key: str, value: Any, where: str, res: Resolver) -> Any:
    if key in _SIZES and value is not None:
        try:
            return int(parse_size_value(value))
        except ValueError as e:
            raise res.fail(where, value, str(e)) from None
    if key == "child" and not isinstance(value, str):  # a program: a table is not one
        return build_program(value, where, res)
    if key == "body":
        return build_program(value, where, res)
    if key == "process":
        if not isinstance(value, str) or value not in res.processes:
            raise res.fail(where, value, f"no such process; processes: {', '.join(res.processes) or 'none'}"
                           f"{did_you_mean(str(value), res.processes)}")
        return res.processes[value]
    checker = _TYPES.get(key)
    if checker is not None and not checker[0](value):
        raise res.fail(where, value, checker[1])
    return value


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # not NaN


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "ns": (_is_num, "expected a number of nanoseconds"),
    "count": (_is_int, "expected an integer"),
    "times": (_is_int, "expected an integer"),
    "pages": (_is_int, "expected an integer"),
    "cpu": (lambda v: v is None or _is_int(v), "expected a CPU number"),
    "writes": (_is_num, "expected a fraction in [0, 1]"),
    "ns_per_access": (_is_num, "expected a number of nanoseconds"),
    "hold_ns": (_is_num, "expected a number of nanoseconds"),
    "zipf_a": (_is_num, "expected a number greater than 1"),
    "addr": (lambda v: _is_int(v) or isinstance(v, str), "expected an address or a mapping name"),
    "populate": (lambda v: isinstance(v, bool), "expected true or false"),
    "shared": (lambda v: isinstance(v, bool), "expected true or false"),
    "token": (lambda v: v is None or _is_int(v), "expected an integer"),
    "seed": (lambda v: v is None or _is_int(v), "expected an integer"),
}


def _region(op: str, name: Any, kwargs: dict[str, Any], where: str, res: Resolver,
            owner: str | None) -> None:
    """``region = "heap"``: the action works on that region of the task's process."""
    if not isinstance(name, str):
        raise res.fail(where, name, "expected a region name")
    if op in ("access", "munmap"):  # these resolve names when they run (Mmap names too)
        known = set(res.regions_of.get(res.process or "", {})) | res.mmap_names
        if name not in known:
            raise res.fail(where, name, f"no region or mapping of this task is called that; known: "
                           f"{', '.join(sorted(known)) or 'none'}{did_you_mean(name, known)}")
        kwargs["addr" if op == "access" else "name"] = name
        return
    if op not in ("mprotect", "madvise", "rmap-walk"):
        raise res.fail(where, name, f"a {op!r} action takes no region")
    regions = res.regions_of.get(owner or "", {})
    if name not in regions:
        raise res.fail(where, name, f"no such region; regions: {', '.join(regions) or 'none'}"
                       f"{did_you_mean(name, regions)}")
    addr, length = regions[name]
    kwargs.setdefault("addr", addr)
    if op == "rmap-walk":
        kwargs.setdefault("pages", max(1, length // 4096))
    else:
        kwargs.setdefault("length", length)
