from __future__ import annotations

import pytest

import mmuemu

MiB = 1 << 20


@pytest.fixture
def m() -> mmuemu.Machine:
    return mmuemu.Machine(arch="x86_64", memory="256MiB")
