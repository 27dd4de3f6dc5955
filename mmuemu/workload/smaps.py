"""Process images from ``/proc/PID/smaps`` captures of real processes.

Each mapping's header line (``start-end perms offset dev inode [path]``) gives a region;
its ``Rss``, ``Anonymous`` and ``AnonHugePages`` lines give what is resident.  A
``/proc/PID/maps`` file parses too (nothing resident).
"""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

from mmuemu.errors import ConfigError
from mmuemu.mm.mmap import MMAP_MIN_ADDR, TASK_SIZE
from mmuemu.workload.image import PAGE, PMD_SIZE, Image, ImageRegion, prot_string

__all__ = ["SKIPPED_NAMES", "load_smaps", "parse_smaps"]

#: special mappings the emulator does not model (kernel-provided pages)
SKIPPED_NAMES = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]", "[sigpage]",
                           "[vectors]"})

_HEADER = re.compile(r"([0-9a-f]+)-([0-9a-f]+)\s+([r-])([w-])([x-])([ps])\s+([0-9a-f]+)\s+"
                     r"[0-9a-f]+:[0-9a-f]+\s+\d+(?:\s+(.*))?", re.IGNORECASE)
_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_()]*):(.*)")
_KB = re.compile(r"\s*(\d+) kB\s*")
#: the fields a region is built from, by smaps name
_USED = {"Rss": "rss", "Anonymous": "anon", "AnonHugePages": "thp", "KernelPageSize": "page"}


def load_smaps(source: str | Path) -> Image:
    """The image of the process whose ``/proc/PID/smaps`` was saved at ``source``."""
    path = Path(source)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read it ({e.strerror})") from None
    return parse_smaps(text, str(source))


def parse_smaps(text: str, source: str = "<text>") -> Image:
    """The image described by smaps ``text``.

    Anonymous mappings are path-less ones and bracketed names ([heap], [stack], [anon:x]);
    a path is a file mapping of that name (the file is not read).  Kernel-provided mappings
    ([vdso], [vvar], [vsyscall], ...), hugetlb mappings and anything outside the user range
    mmuemu emulates go to ``skipped``.  THP bytes count only whole PMDs of private anonymous
    memory.
    """
    entries: list[tuple[int, re.Match[str], dict[str, int]]] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        head = _HEADER.fullmatch(line.strip())
        if head:
            entries.append((no, head, {}))
            continue
        field = _FIELD.fullmatch(line.strip())
        if not field or not entries:
            raise ConfigError(f"{source}:{no}: not an smaps line: {line.strip()[:60]!r}")
        key = _USED.get(field[1])
        if key is not None:
            kb = _KB.fullmatch(field[2])
            if not kb:
                raise ConfigError(f"{source}:{no}: {field[1]} is not a size in kB: {field[2].strip()!r}")
            entries[-1][2][key] = int(kb[1]) << 10
    if not entries:
        raise ConfigError(f"{source}: no smaps mapping header found (expected lines like "
                          f"'55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1234 /usr/bin/x')")
    regions: list[tuple[int, ImageRegion]] = []
    skipped: list[str] = []
    for no, head, fields in entries:
        start, end = int(head[1], 16), int(head[2], 16)
        name = (head[8] or "").strip()
        if name == "[rollup]":
            raise ConfigError(f"{source}:{no}: this is smaps_rollup, which has no per-mapping "
                              f"entries; capture /proc/PID/smaps")
        if end <= start or start % PAGE or end % PAGE:
            raise ConfigError(f"{source}:{no}: bad address range {head[1]}-{head[2]}")
        if (name in SKIPPED_NAMES or start < MMAP_MIN_ADDR or end > TASK_SIZE
                or fields.get("page", PAGE) != PAGE):
            skipped.append(name or f"[anon] at {start:#x}")
            continue
        regions.append((no, _region(head, start, end, name, fields)))
    regions.sort(key=lambda x: x[1].start)
    for (na, a), (nb, b) in pairwise(regions):
        if b.start < a.end:
            raise ConfigError(f"{source}:{nb}: mapping at {b.start:#x} overlaps the one on line {na} "
                              f"[{a.start:#x}, {a.end:#x})")
    return Image(source, "smaps", None, tuple(r for _, r in regions), tuple(skipped))


def _region(head: re.Match[str], start: int, end: int, name: str, fields: dict[str, int]) -> ImageRegion:
    size = end - start
    shared = head[6] == "s"
    anon_kind = not name or name.startswith("[")
    rss = min(fields.get("rss", 0), size)
    anon = min(fields.get("anon", 0), rss)
    thp = min(fields.get("thp", 0), anon) // PMD_SIZE * PMD_SIZE if anon_kind and not shared else 0
    prot = prot_string(head[3] == "r", head[4] == "w", head[5] == "x")
    return ImageRegion(name or "[anon]", start, size, prot, "anon" if anon_kind else "file",
                       shared=shared, offset=0 if anon_kind else int(head[7], 16) // PAGE * PAGE,
                       rss=rss, anon=anon, thp=thp)
