from __future__ import annotations

import pytest

import mmuemu

MiB = 1 << 20


#: every platform the generic tests run on: an architecture, "-contpte" for arm64's layer
ARCHES = ("x86_64", "arm64", "arm64-contpte")


def platform(name: str) -> dict[str, object]:
    """Machine keyword arguments for a platform name of ARCHES."""
    arch, _, layer = name.partition("-")
    return {"arch": arch, **({"contpte": True} if layer == "contpte" else {})}


@pytest.fixture(params=ARCHES)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def m(arch: str) -> mmuemu.Machine:
    return mmuemu.Machine(memory="256MiB", **platform(arch))  # type: ignore[arg-type]
