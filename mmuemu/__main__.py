"""python -m mmuemu: the mmuemu command."""

from __future__ import annotations

import sys

from mmuemu.cli import main

sys.exit(main())
