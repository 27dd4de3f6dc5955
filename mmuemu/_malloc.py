"""Keep numpy's large temporaries in the heap instead of fresh mmaps.

mmuemu's hot paths make many short-lived arrays of a few MiB.  With glibc's defaults each
one is a new mmap whose pages fault in on first touch and go back to the OS on free; on a
virtual machine that costs more than the computation (measured: a 2 MiB ``a + a`` took
1.35 ms, 0.19 ms with the settings below).  Raising the mmap threshold to 32 MiB and the
trim threshold to 256 MiB lets freed temporaries be reused.  The price is host memory: the
allocator keeps up to 256 MiB of freed temporaries (measured: 1 GiB populated and forked
costs 246 B of RSS per emulated page with this, 127 B with an 8 MiB trim threshold, which
made fork 2x slower).  Set ``MMUEMU_NO_MALLOPT=1`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_malloc"]

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Apply the settings once; return whether glibc accepted them."""
    if os.environ.get("MMUEMU_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


TUNED = tune_malloc()
