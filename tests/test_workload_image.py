"""Process images: ELF files and smaps captures mapped into emulated processes."""

from __future__ import annotations

import os
import platform as host
import struct
import sys
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import platform

import mmuemu
from mmuemu.workload import Image, ImageRegion, load_elf, load_smaps, map_image, parse_smaps

MiB = 1 << 20
PAGE = 4096
HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
    host.machine().lower())
OTHER_ARCH = "arm64" if HOST_ARCH == "x86_64" else "x86_64"
ELFS = [os.path.realpath(sys.executable), "/bin/ls"]

needs_host = pytest.mark.skipif(HOST_ARCH is None, reason=f"no mmuemu arch for {host.machine()}")

def _elf(path: str) -> str:
    if not Path(path).is_file():
        pytest.skip(f"{path} is missing")
    return path

def _kinds(p: mmuemu.Process) -> tuple[int, int]:
    return p.rss["anon"], p.rss["file"] + p.rss["shmem"]

@needs_host
@pytest.mark.parametrize("path", ELFS)
def test_elf_layout(path: str) -> None:
    im = load_elf(_elf(path))
    assert im.format == "elf" and im.arch == HOST_ARCH
    regs = im.regions
    assert all(r.start % PAGE == 0 and r.size % PAGE == 0 and r.size > 0 for r in regs)
    assert all(a.end <= b.start for a, b in pairwise(regs))
    names = [r.name for r in regs]
    assert "[heap]" in names and "[stack]" in names
    assert any("x" in r.prot and r.kind == "file" for r in regs)
    assert any("w" in r.prot and r.kind == "file" and r.anon == r.size for r in regs)
    stack = regs[names.index("[stack]")]
    assert stack.end == 0x7FFFFFFFF000 and stack.size == 8 * MiB and stack.rss == 128 << 10
    heap = regs[names.index("[heap]")]
    assert heap.start == max(r.end for r in regs if r.start < heap.start) and heap.size == 132 << 10
    rows = im.describe()
    assert len(rows) == len(regs) and rows[0]["start"] == f"{regs[0].start:#x}"
    assert sum(r["rss_kib"] for r in rows) << 10 == im.rss

@needs_host
@pytest.mark.parametrize("path", ELFS)
def test_elf_map_fork_cow(path: str) -> None:
    im = load_elf(_elf(path))
    m = mmuemu.Machine(arch=HOST_ARCH, memory="1GiB")
    p = m.spawn()
    addrs = map_image(p, im)
    assert len(addrs) == len(im.regions) and addrs["[heap]"] == next(
        r.start for r in im.regions if r.name == "[heap]")
    anon, other = _kinds(p)
    assert anon * PAGE == im.anon and (anon + other) * PAGE == im.rss
    text = next(r for r in im.regions if "x" in r.prot)
    assert not p.pte(text.start).write and p.pte(text.start).present
    heap = addrs["[heap]"]
    p.write(heap, 111)
    c = p.fork()
    m.check()
    # private file VMAs without anon pages are not copied at fork (vma_needs_copy)
    assert c.rss["anon"] == p.rss["anon"] and c.rss["file"] <= p.rss["file"]
    c.write(heap, 222)
    assert p.read(heap) == 111 and c.read(heap) == 222
    m.check()

@needs_host
def test_elf_pie_base_and_sizes() -> None:
    path = _elf("/bin/ls")
    im = load_elf(path, base=0x4_0000_0000, heap=1 * MiB, stack=64 << 10)
    if im.regions[0].start != 0x4_0000_0000:
        pytest.skip("/bin/ls is not a PIE")
    by = {r.name: r for r in im.regions}
    assert by["[heap]"].size == MiB and by["[stack]"].size == by["[stack]"].rss == 64 << 10
    with pytest.raises(mmuemu.ConfigError, match="base"):
        load_elf(path, base=0x4_0000_0123)

@needs_host
def test_elf_interp() -> None:
    im = load_elf(_elf(os.path.realpath(sys.executable)), interp=True)
    extra = {r.name for r in im.regions} - {r.name for r in load_elf(sys.executable).regions}
    assert any("ld" in Path(n).name for n in extra) or im.skipped

@needs_host
def test_elf_wrong_arch() -> None:
    with pytest.raises(mmuemu.ConfigError, match=f"is an {HOST_ARCH} ELF .* machine is {OTHER_ARCH}"):
        load_elf(sys.executable, arch=OTHER_ARCH)
    im = load_elf(sys.executable)
    p = mmuemu.Machine(arch=OTHER_ARCH, memory="64MiB").spawn()
    with pytest.raises(mmuemu.ConfigError, match="image is for"):
        map_image(p, im)
    assert p.vmas == []

def test_elf_bad_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(mmuemu.ConfigError, match=r"notes\.txt: not an ELF"):
        load_elf(text)
    with pytest.raises(mmuemu.ConfigError, match="no such file"):
        load_elf(tmp_path / "missing")
    cut = tmp_path / "cut"
    cut.write_bytes(Path(sys.executable).resolve().read_bytes()[:64])
    with pytest.raises(mmuemu.ConfigError, match="cut"):
        load_elf(cut)
    # a 32-bit i386 ELF header with no segments
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    elf32 = tmp_path / "elf32"
    elf32.write_bytes(ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, 0, 0, 0, 0, 52, 32, 0, 40, 0, 0))
    with pytest.raises(mmuemu.ConfigError, match=r"EM_386.*x86_64"):
        load_elf(elf32)

def _anon_image(size: int, rss: int, name: str = "[anon]", thp: int = 0) -> Image:
    r = ImageRegion(name, 0x7F00_0000_0000, size, "rw", "anon", rss=rss, anon=rss, thp=thp)
    return Image("test", "smaps", None, (r,))

def test_map_image_too_big_is_config_error() -> None:
    m = mmuemu.Machine(memory="16MiB")
    p = m.spawn()
    with pytest.raises(mmuemu.ConfigError, match=r"test: the image needs 8192 free pages"):
        map_image(p, _anon_image(32 * MiB, 32 * MiB))
    assert p.vmas == []
    map_image(p, _anon_image(32 * MiB, 32 * MiB), populate=False)  # nothing resident: fits
    assert p.rss["anon"] == 0 and len(p.vmas) == 1

def test_map_image_rolls_back_on_oom() -> None:
    two = Image("two", "smaps", None, (
        ImageRegion("/lib/a.so", 0x7F00_0000_0000, MiB, "r", "file", rss=MiB),
        ImageRegion("[anon]", 0x7F00_0010_0000, MiB, "rw", "anon", rss=MiB, anon=MiB)))
    failures = 0
    while True:  # fail each allocation in turn (page cache, tables, anon pages) until none fails
        m = mmuemu.Machine(memory="64MiB")
        p = m.spawn()
        free = m.free_pages
        m.inject_alloc_failure(after=failures)
        try:
            map_image(p, two)
        except mmuemu.OutOfMemory:
            assert p.vmas == [] and m.free_pages == free, f"failure {failures}"
            m.check()
            failures += 1
            continue
        break
    assert failures >= 3 and p.rss["anon"] == p.rss["file"] == MiB // PAGE

def test_resident_bytes_placement() -> None:
    m = mmuemu.Machine(memory="64MiB")
    p = m.spawn()
    im = Image("t", "smaps", None, (
        ImageRegion("[anon]", 0x7F00_0000_0000, 64 << 10, "rw", "anon", rss=8 << 10, anon=8 << 10),
        ImageRegion("/lib/x.so", 0x7F00_0010_0000, 64 << 10, "r", "file", offset=1 << 40,
                    rss=16 << 10, anon=4 << 10),
        ImageRegion("[stack]", 0x7FFF_0000_0000, 64 << 10, "rw", "anon", rss=8 << 10, anon=8 << 10)))
    map_image(p, im)
    a, f, s = (r.start for r in im.regions)
    assert p.pte(a + PAGE).present and not p.pte(a + 2 * PAGE).present
    assert p.pte(s + 63 * 1024).present and not p.pte(s).present  # stacks: resident at the top
    assert p.folio(f).anon and not p.folio(f + PAGE).anon and not p.pte(f).write  # COWed, then mprotect
    assert not p.pte(f + 4 * PAGE).present
    assert max(len(x.pagecache) for x in m.kernel.files) == 16  # offsets packed
    m.check()

def test_thp_from_anon_huge_pages(arch: str) -> None:
    m = mmuemu.Machine(memory="64MiB", **platform(arch))  # type: ignore[arg-type]
    p = m.spawn()
    text = SMAPS_THP.format(thp=4096)
    addrs = map_image(p, parse_smaps(text))
    a, b = addrs["[anon]"], addrs["[anon]#2"]
    pmd = m.arch.pmd_order
    assert p.folio(a).order == pmd and p.folio(a + 3 * MiB).order == pmd and p.pte(a).pmd
    assert p.folio(b).order == 0  # same size, no AnonHugePages
    assert p.mm.folio_orders == (0,)
    assert "HUGEPAGE" in p.vmas[0][2]
    c = p.fork()
    m.check()
    assert c.rss["anon"] == p.rss["anon"] == 2048

SMAPS_THP = """\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4096 kB
Anonymous:          4096 kB
AnonHugePages:      {thp} kB
VmFlags: rd wr mr mw me ac hg
7f0000600000-7f0000a00000 rw-p 00000000 00:00 0
Rss:                4096 kB
Anonymous:          4096 kB
AnonHugePages:         0 kB
"""

SMAPS_KINDS = """\
555555554000-555555556000 r-xp 00001000 08:01 1234   /usr/bin/my prog
Rss:                   8 kB
Anonymous:             0 kB
555555556000-555555557000 ---p 00000000 00:00 0
555555557000-555555579000 rw-p 00000000 00:00 0      [heap]
Rss:                 136 kB
Anonymous:           136 kB
7ffff7ff0000-7ffff7ff1000 rw-s 00000000 00:05 9      /dev/shm/seg
Rss:                   4 kB
7ffff7ff8000-7ffff7ffa000 r--p 00000000 00:00 0      [vvar]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
"""

def test_parse_smaps_kinds() -> None:
    im = parse_smaps(SMAPS_KINDS, "kinds")
    exe, guard, heap, shm = im.regions
    assert (exe.name, exe.kind, exe.prot, exe.offset, exe.rss) == ("/usr/bin/my prog", "file", "rx", 4096, 8192)
    assert (guard.name, guard.prot, guard.kind) == ("[anon]", "none", "anon")
    assert (heap.kind, heap.anon, heap.size) == ("anon", 136 << 10, 136 << 10)
    assert shm.shared and shm.kind == "file" and shm.prot == "rw"
    assert im.skipped == ("[vvar]", "[vsyscall]") and im.arch is None
    m = mmuemu.Machine(memory="64MiB")
    p = m.spawn()
    map_image(p, im)
    assert p.rss == {"anon": 34, "file": 2, "shmem": 1, "swap": 0}
    p.fork()
    m.check()

def test_smaps_self() -> None:
    text = Path("/proc/self/smaps").read_text()
    im = parse_smaps(text, "/proc/self/smaps")
    assert len(im.regions) > 10
    rss, skip = 0, False
    for line in text.splitlines():
        first = line.split()[0] if line.split() else ""
        if "-" in first and ":" not in first:
            end = int(first.split("-")[1], 16)
            skip = line.split()[-1] in ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]") or end > 1 << 47
        elif line.startswith("Rss:") and not skip:
            rss += int(line.split()[1]) << 10
    assert im.rss == rss > 0
    m = mmuemu.Machine(arch=HOST_ARCH or "x86_64", memory="4GiB")
    p = m.spawn()
    map_image(p, im)
    assert sum(_kinds(p)) * PAGE == im.rss
    c = p.fork()
    m.check()
    assert c.rss["anon"] == p.rss["anon"] == im.anon // PAGE

def test_load_smaps_path(tmp_path: Path) -> None:
    im = load_smaps("/proc/self/smaps")
    assert len(im.regions) > 10 and im.format == "smaps" and any(r.kind == "file" for r in im.regions)
    with pytest.raises(mmuemu.ConfigError, match="no such file"):
        load_smaps(tmp_path / "nope")
    saved = tmp_path / "smaps"
    saved.write_text(SMAPS_KINDS)
    assert load_smaps(saved).regions == parse_smaps(SMAPS_KINDS).regions

@pytest.mark.parametrize(("text", "match"), [
    ("hello world\n", r"<text>:1: not an smaps line"),
    ("7f0000000000-7f0000001000 rw-p 00000000 00:00 0\nRss: 4 kB\n\nthis is bad\n", r"<text>:4:"),
    ("7f0000000000-7f0000001000 rw-p 00000000 00:00 0\nRss: lots\n", r"<text>:2: Rss is not a size"),
    ("", "no smaps mapping header"),
    ("7f0000000000-7f0000002000 rw-p 00000000 00:00 0\n7f0000001000-7f0000003000 rw-p 0 00:00 0\n",
     r"<text>:2: mapping at 0x7f0000001000 overlaps the one on line 1"),
    ("00400000-ffffffffff601000 ---p 00000000 00:00 0  [rollup]\nRss: 4 kB\n", "smaps_rollup"),
])
def test_bad_smaps(text: str, match: str) -> None:
    with pytest.raises(mmuemu.ConfigError, match=match):
        parse_smaps(text)

def test_image_validation() -> None:
    with pytest.raises(mmuemu.ConfigError, match="page aligned"):
        ImageRegion("x", 0x10001, PAGE, "rw", "anon")
    with pytest.raises(mmuemu.ConfigError, match="thp <= anon <= rss"):
        ImageRegion("x", 0x10000, PAGE, "rw", "anon", rss=PAGE, anon=2 * PAGE)
    a = ImageRegion("a", 0x10000, 2 * PAGE, "r", "anon")
    with pytest.raises(mmuemu.ConfigError, match="overlap"):
        Image("t", "elf", None, (a, ImageRegion("b", 0x11000, PAGE, "r", "anon")))
