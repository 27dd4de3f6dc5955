"""Fit a cost model's free costs to its published measurements (a developer tool).

The operation counts come from running each published experiment on the emulator
(``mmuemu.calibration``); costs named in FIXED are kept at hardware-derived values and the
rest are fitted by non-negative least squares on the relative error.  The script prints the
values to paste into ``configs/costs/<model>.toml`` and the residuals for its comments.

Run: python benchmarks/fit_costs.py            (needs scipy: pip install scipy)
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls

from mmuemu.calibration import XEON_4210R, counts

#: set from the hardware, not fitted (ns)
FIXED = {
    "pte_writes": 1.0, "pte_atomics": 7.0, "anon_exclusive_clears": 4.0, "resched_checks": 1.0,
    "ptl_locks": 15.0, "cond_resched": 20.0, "pgtable_allocs": 150.0, "pmd_writes": 1.0,
}
#: fitted
FREE = ("pte_reads", "pte_clears", "mapcount_ops", "folio_ref_ops", "fork_batches", "zap_items",
        "zap_batches", "gather_entries", "folios_freed_small", "folios_freed_large")


def main() -> None:
    rows = list(XEON_4210R)
    cs = [counts(r) for r in rows]
    a = np.array([[c.get(p, 0) for p in FREE] for c in cs], float)
    fixed = np.array([sum(c.get(p, 0) * v for p, v in FIXED.items()) for c in cs])
    y = np.array([r.seconds for r in rows]) * 1e9
    w = 1 / y
    x, _ = nnls(a * w[:, None], (y - fixed) * w)
    print("[ns] fitted:")
    for p, v in zip(FREE, x, strict=True):
        print(f"{p} = {v:.2f}")
    pred = a @ x + fixed
    print("\nresiduals:")
    for r, p in zip(rows, pred, strict=True):
        print(f"{r.op:6} {r.folio_kib:5}K {r.mode:8} {r.seconds * 1e3:8.3f} ms  model {p / 1e6:8.3f} ms "
              f"{100 * (p / 1e9 / r.seconds - 1):+5.1f}%")
    print("\nspeedups (published, model):")
    for op in ("fork", "munmap"):
        for kib in sorted({r.folio_kib for r in rows}):
            i = {r.mode: j for j, r in enumerate(rows) if r.op == op and r.folio_kib == kib}
            pub = rows[i["legacy"]].seconds / rows[i["batched"]].seconds
            mod = pred[i["legacy"]] / pred[i["batched"]]
            print(f"{op:6} {kib:5}K {pub:5.2f} {mod:5.2f} {mod - pub:+.3f}")


if __name__ == "__main__":
    main()
