"""Architecture backends and their registry.

A backend is a subclass of :class:`~mmuemu.arch.base.Arch`; :func:`register` makes it
reachable by name from ``Machine(arch=...)`` and from configs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mmuemu.arch.arm64 import Arm64
from mmuemu.arch.arm64_contpte import Arm64Contpte
from mmuemu.arch.base import Arch, Prot
from mmuemu.arch.x86_64 import X86_64
from mmuemu.errors import InvalidArgument

__all__ = ["Arch", "Prot", "available_arches", "make_arch", "overridden_helpers", "register"]

#: name -> what builds the backend from the machine's options (a class, or a factory that
#: picks a class, like arm64's ``contpte`` switch)
_REGISTRY: dict[str, Callable[..., Arch]] = {}


def register(cls: type[Arch], factory: Callable[..., Arch] | None = None) -> type[Arch]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator), built by
    ``factory`` when given (it receives the machine's options)."""
    _REGISTRY[cls.name] = factory or cls
    return cls


def available_arches() -> list[str]:
    """Names of the registered architectures, sorted."""
    return sorted(_REGISTRY)


def overridden_helpers(arch: Arch) -> list[str]:
    """The generic helpers of ``arch/base.py`` (include/linux/pgtable.h) this backend
    overrides, sorted: what makes its results differ from the generic code."""
    out = []
    for name in dir(Arch):
        generic = getattr(Arch, name)
        if name.startswith("_") or not callable(generic):
            continue
        if getattr(type(arch), name) is not generic:
            out.append(name)
    return sorted(out)


def make_arch(name: str, **options: Any) -> Arch:
    """Build the backend called ``name`` with its options."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown arch {name!r}; available: {', '.join(available_arches())}"
        ) from None
    return cls(**options)


def _arm64(contpte: Any = False, **options: Any) -> Arch:
    """arm64: ``contpte=True`` selects the contpte layer (CONFIG_ARM64_CONTPTE), whose
    options (``contpte_fold``, ``bbml2``, ``contpte_batch_apis``) need it."""
    if not isinstance(contpte, (bool, np.bool_)):
        raise InvalidArgument(f"arm64 option 'contpte' must be true or false, not {contpte!r}")
    if contpte:
        return Arm64Contpte(**options)
    needs = sorted(set(options) & set(Arm64Contpte.contpte_options))
    if needs:
        raise InvalidArgument(f"arm64 option{'s' if len(needs) > 1 else ''} "
                              f"{', '.join(map(repr, needs))} need{'' if len(needs) > 1 else 's'} "
                              f"contpte=True")
    return Arm64(**options)


register(X86_64)
register(Arm64, _arm64)
