"""Process images from ELF executables, laid out as the kernel's ELF loader would.

Mirrors: fs/binfmt_elf.c load_elf_binary (elf_map of each PT_LOAD, the anonymous pages of a
segment's .bss, the brk heap after it, the stack below the top of user space).
"""

from __future__ import annotations

import struct
from pathlib import Path

from attrs import evolve, frozen
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from mmuemu.arch import available_arches
from mmuemu.errors import ConfigError
from mmuemu.mm.mmap import MMAP_MIN_ADDR, TASK_SIZE
from mmuemu.workload.image import PAGE, Image, ImageRegion, page_up, prot_string

__all__ = ["ELF_ARCHES", "PIE_BASES", "load_elf"]

#: ELF e_machine -> mmuemu arch name
ELF_ARCHES = {"EM_X86_64": "x86_64", "EM_AARCH64": "arm64"}
#: where the kernel loads a PIE (ELF_ET_DYN_BASE without randomisation)
PIE_BASES = {"x86_64": 0x555555554000, "arm64": 0xAAAAAAAA0000}
STACK_TOP = 0x7FFFFFFFF000
#: resident part of the stack: what a started program has touched
STACK_RSS = 128 << 10
PF_X, PF_W, PF_R = 1, 2, 4


@frozen
class _Elf:
    """What the loader needs from an ELF file."""

    arch: str
    pie: bool
    loads: tuple[tuple[int, int, int, int, int], ...]  # (vaddr, offset, filesz, memsz, flags)
    relro: tuple[int, int] | None
    interp: str | None


def load_elf(path: str | Path, arch: str | None = None, *, stack: int = 8 << 20,
             heap: int = 132 << 10, base: int | None = None, interp: bool = False) -> Image:
    """The image of a program just started from the ELF file at ``path``.

    Each PT_LOAD is a private file mapping of its pages; the pages of a writable segment's
    .bss past its file data are an anonymous ".bss" region; ``heap`` bytes of brk heap follow
    the highest segment and ``stack`` bytes of stack end below 0x7ffffffff000.  A PIE loads at
    ``base`` (default: the kernel's ELF_ET_DYN_BASE for the arch).  With ``interp`` the
    program interpreter (ld.so) is loaded below the stack too, when it exists.

    Residency (there is no runtime information): read-only segments are fully resident page
    cache, writable segments fully resident and anonymous (relocated: a private copy per
    page; the PT_GNU_RELRO part is then read-only), .bss and heap fully resident anonymous,
    and the top 128 KiB of the stack resident anonymous.
    """
    main = _read(Path(path), arch)
    arch = main.arch
    stack, heap = _size(stack, "stack"), _size(heap, "heap")
    if base is None:
        base = PIE_BASES[arch]
    if not isinstance(base, int) or base % PAGE or not MMAP_MIN_ADDR <= base < TASK_SIZE:
        raise ConfigError(f"load_elf: base {base!r} must be a page-aligned user address")
    name = str(Path(path).resolve())
    bias = base - _down(main.loads[0][0]) if main.pie else 0
    regions = _segments(main, bias, name)
    brk = max(r.end for r in regions)
    if heap:
        regions.append(ImageRegion("[heap]", brk, heap, "rw", "anon", rss=heap, anon=heap))
    skipped: list[str] = []
    low = STACK_TOP - stack
    if stack:
        top = min(STACK_RSS, stack)
        regions.append(ImageRegion("[stack]", low, stack, "rw", "anon", rss=top, anon=top))
    if interp and main.interp is not None:
        ld = Path(main.interp)
        if ld.is_file():
            info = _read(ld, arch)
            span = page_up(max(v + m for v, _, _, m, _ in info.loads)) - _down(info.loads[0][0])
            at = (low - span - PAGE) & ~0xFFFF
            regions += _segments(info, at - _down(info.loads[0][0]) if info.pie else 0,
                                 str(ld.resolve()))
        else:
            skipped.append(f"{main.interp} (interpreter not found)")
    for r in regions:
        if r.start < MMAP_MIN_ADDR or r.end > TASK_SIZE:
            raise ConfigError(f"{path}: {r.name} at [{r.start:#x}, {r.end:#x}) is outside user "
                              f"space [{MMAP_MIN_ADDR:#x}, {TASK_SIZE:#x})")
    return Image(str(path), "elf", arch, tuple(sorted(regions, key=lambda r: r.start)), tuple(skipped))


def _size(n: int, what: str) -> int:
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"load_elf: {what} size {n!r} must be a non-negative integer")
    return page_up(n)


def _down(a: int) -> int:
    return a & ~(PAGE - 1)


def _read(path: Path, arch: str | None) -> _Elf:
    """Parse the headers the loader uses, turning every failure into a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            elf = ELFFile(f)
            return _parse(elf, path, arch, size)
    except ConfigError:
        raise
    except (ELFError, EOFError, struct.error, ValueError) as e:
        raise ConfigError(f"{path}: not an ELF file or a damaged one ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None


def _parse(elf: ELFFile, path: Path, want: str | None, size: int) -> _Elf:
    machine = elf["e_machine"]
    arch = ELF_ARCHES.get(machine) if elf.elfclass == 64 else None
    if arch is None or arch not in available_arches():
        raise ConfigError(f"{path}: a {elf.elfclass}-bit {machine} ELF; mmuemu models 64-bit "
                          f"{', '.join(f'{k} ({v})' for k, v in ELF_ARCHES.items())}; "
                          f"available arches: {', '.join(available_arches())}")
    if want is not None and want != arch:
        raise ConfigError(f"{path}: is an {arch} ELF ({machine}) but the machine is {want}")
    if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
        raise ConfigError(f"{path}: is an ELF of type {elf['e_type']}, not an executable")
    loads, relro, interp = [], None, None
    for i in range(elf.num_segments()):
        s = elf.get_segment(i)
        kind = s["p_type"]
        if kind == "PT_LOAD" and s["p_memsz"]:
            if s["p_offset"] % PAGE != s["p_vaddr"] % PAGE or s["p_filesz"] > s["p_memsz"]:
                raise ConfigError(f"{path}: PT_LOAD at {s['p_vaddr']:#x} is misaligned or "
                                  f"has more file data than memory (the kernel says EINVAL)")
            if s["p_offset"] + s["p_filesz"] > size:
                raise ConfigError(f"{path}: PT_LOAD at {s['p_vaddr']:#x} runs past the end of "
                                  f"the file (truncated ELF)")
            loads.append((s["p_vaddr"], s["p_offset"], s["p_filesz"], s["p_memsz"], s["p_flags"]))
        elif kind == "PT_GNU_RELRO":
            relro = (s["p_vaddr"], s["p_memsz"])
        elif isinstance(s, InterpSegment):
            interp = s.get_interp_name()
    if not loads:
        raise ConfigError(f"{path}: has no PT_LOAD segment to map")
    return _Elf(arch, elf["e_type"] == "ET_DYN", tuple(sorted(loads)), relro, interp)


def _segments(elf: _Elf, bias: int, name: str) -> list[ImageRegion]:
    """elf_map of each PT_LOAD at ``bias``: file pages, then its anonymous .bss pages.  A
    segment sharing a page with the one before replaces that page (MAP_FIXED)."""
    out: list[ImageRegion] = []
    for vaddr, offset, filesz, memsz, flags in elf.loads:
        start = _down(bias + vaddr)
        file_end = page_up(bias + vaddr + filesz) if filesz else start
        mem_end = page_up(bias + vaddr + memsz)
        write = bool(flags & PF_W)
        prot = prot_string(bool(flags & PF_R), write, bool(flags & PF_X))
        if out and out[-1].end > start:
            out[-1:] = _clip(out[-1], start - out[-1].start)
        if file_end > start:
            size = file_end - start
            out.append(ImageRegion(name, start, size, prot, "file", offset=_down(offset), rss=size,
                                   anon=size if write else 0))
        if mem_end > file_end:
            size = mem_end - file_end
            out.append(ImageRegion(".bss", file_end, size, prot, "anon", rss=size, anon=size))
    if elf.relro is not None:
        lo, hi = _down(bias + elf.relro[0]), _down(bias + sum(elf.relro))
        out = [piece for r in out for piece in _readonly(r, lo, hi)]
    return out


def _clip(r: ImageRegion, size: int) -> list[ImageRegion]:
    """The first ``size`` bytes of a region (none when empty)."""
    if size <= 0:
        return []
    return [evolve(r, size=size, rss=min(r.rss, size), anon=min(r.anon, size))]


def _readonly(r: ImageRegion, lo: int, hi: int) -> list[ImageRegion]:
    """Split ``r`` so that its part in [lo, hi) is read-only (ld.so's mprotect of RELRO)."""
    lo, hi = max(lo, r.start), min(hi, r.end)
    if hi <= lo or "w" not in r.prot:
        return [r]
    out = []
    for a, b, prot in ((r.start, lo, r.prot), (lo, hi, r.prot.replace("w", "")), (hi, r.end, r.prot)):
        if b > a:  # ELF regions are wholly resident, so each piece is too
            out.append(evolve(r, start=a, size=b - a, prot=prot, rss=b - a, anon=b - a if r.anon else 0,
                              offset=r.offset + (a - r.start) if r.kind == "file" else 0))
    return out
