"""Every script in examples/ runs and prints exactly its expected output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_example_has_expected_output() -> None:
    assert EXAMPLES
    for script in EXAMPLES:
        assert (ROOT / "examples" / "expected" / f"{script.stem}.txt").is_file(), script.name


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_output(script: Path) -> None:
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, check=True).stdout
    expected = (ROOT / "examples" / "expected" / f"{script.stem}.txt").read_text()
    assert out == expected
