"""Architecture backends and their registry.

A backend is a subclass of :class:`~mmuemu.arch.base.Arch`; :func:`register` makes it
reachable by name from ``Machine(arch=...)`` and from configs.
"""

from __future__ import annotations

from typing import Any

from mmuemu.arch.arm64 import Arm64
from mmuemu.arch.base import Arch, Prot
from mmuemu.arch.x86_64 import X86_64
from mmuemu.errors import InvalidArgument

__all__ = ["Arch", "Prot", "available_arches", "make_arch", "register"]

_REGISTRY: dict[str, type[Arch]] = {}


def register(cls: type[Arch]) -> type[Arch]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


def available_arches() -> list[str]:
    """Names of the registered architectures, sorted."""
    return sorted(_REGISTRY)


def make_arch(name: str, **options: Any) -> Arch:
    """Build the backend called ``name`` with its options."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown arch {name!r}; available: {', '.join(available_arches())}"
        ) from None
    return cls(**options)


register(X86_64)
register(Arm64)
