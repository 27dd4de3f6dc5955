"""bench_fork row 7: growth of VmRSS per emulated 4K page, measured in a fresh subprocess
(see :func:`memory_row` and README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from benchlib import GIB, MIB, PAGE, REPO, Row, err

__all__ = ["memory_row"]


_MEM_PROBE = textwrap.dedent("""
    import gc, json, sys

    def rss(key="VmRSS:"):
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith(key):
                    return int(ln.split()[1]) * 1024
        raise RuntimeError("no " + key)

    import mmuemu
    # warm-up on a small machine first, so that the baseline already holds the code pages
    # of numpy and mmuemu and the modules a Machine loads: they are not per emulated page
    w = mmuemu.Machine(arch="x86_64", memory="64MiB")
    wp = w.spawn()
    wa = wp.mmap(8 << 20, prot="rw", align=2 << 20)
    wp.populate(wa, 8 << 20, write=True)
    wp.fork().exit()
    del w, wp
    gc.collect()
    r0 = rss()
    m = mmuemu.Machine(arch="x86_64", memory="4GiB")
    p = m.spawn()
    p.set_folio_orders([0])
    a = p.mmap(1 << 30, prot="rw", align=2 << 20)
    r1 = rss()
    p.populate(a, 1 << 30, write=True)
    r2 = rss()
    c = p.fork()
    gc.collect()
    r3 = rss()
    hwm = rss("VmHWM:")
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the allocator's cache of freed temporaries back
    r4 = rss()
    print(json.dumps({"before": r0, "machine": r1, "populated": r2, "forked": r3, "hwm": hwm,
                      "live": r4}))
""")


def memory_row(timeout: float) -> Row:
    row = Row("7", "RSS per emulated 4K page (1 GiB + fork)", unit="B/pg", target=64.0)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    try:
        cp = subprocess.run(
            [sys.executable, "-c", _MEM_PROBE],
            capture_output=True,
            text=True,
            cwd=str(REPO),
            env=env,
            timeout=timeout,
            check=False,
        )
        if cp.returncode != 0:
            last = (cp.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise RuntimeError(f"probe exited {cp.returncode}: {last}")
        d = json.loads(cp.stdout.strip().splitlines()[-1])
        pages = GIB // PAGE
        per_page = (d["forked"] - d["before"]) / pages
        row.emu = per_page
        row.metric = per_page
        row.note = (
            "VmRSS MiB: before machine {:.0f}, after Machine+mmap {:.0f}, after populate "
            "{:.0f}, after fork {:.0f}, peak (VmHWM) {:.0f}; populate alone {:.1f} B/pg, "
            "peak {:.1f} B/pg; live state after malloc_trim(0) {:.1f} B/pg"
        ).format(
            d["before"] / MIB,
            d["machine"] / MIB,
            d["populated"] / MIB,
            d["forked"] / MIB,
            d["hwm"] / MIB,
            (d["populated"] - d["before"]) / pages,
            (d["hwm"] - d["before"]) / pages,
            (d["live"] - d["before"]) / pages,
        )
        row.runs = 1
        row.judge()
    except Exception as e:
        err(row, e)
    return row
