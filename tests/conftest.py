from __future__ import annotations

import pytest

import mmuemu

MiB = 1 << 20


#: every architecture the generic tests run on
ARCHES = ("x86_64", "arm64")


@pytest.fixture(params=ARCHES)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def m(arch: str) -> mmuemu.Machine:
    return mmuemu.Machine(arch=arch, memory="256MiB")
