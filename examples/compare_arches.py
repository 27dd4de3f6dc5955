"""Compare fork of 64 MiB of 64K folios on x86_64 and arm64 with contpte, from the shipped
arch-comparison config, through the library.

Run: python examples/compare_arches.py
"""

from __future__ import annotations

from pathlib import Path

import mmuemu
from mmuemu.config import load_config
from mmuemu.report import compare_table

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "arch-compare.toml"


def main() -> None:
    cfg = load_config(CONFIG, ["processes.parent.regions.heap.size=64MiB",
                               'sweep."processes.parent.folio_orders"=[[4]]',
                               "compare.families=['fork']"])
    res = mmuemu.run(cfg, compare=True)
    print(compare_table(res.records, cfg))
    legacy = next(r for r in res.records if r["label"] == "arm64+contpte legacy" and r["family"] == "fork")
    print(f"\nlegacy fork on arm64+contpte: {legacy['contpte_unfolds']} unfolds of 64K blocks, "
          f"{legacy['tlbi_ops']} TLBIs")


if __name__ == "__main__":
    main()
