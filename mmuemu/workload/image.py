"""Process images: the mappings of a real program, to map into an emulated process.

An :class:`Image` lists regions (address, size, protection, file or anonymous, and how much of
each is resident), read from an ELF file (:func:`~mmuemu.workload.load_elf`) or a
``/proc/PID/smaps`` capture (:func:`~mmuemu.workload.load_smaps`).  :func:`map_image` maps it
into a :class:`~mmuemu.Process` and faults its resident pages in, so the model can be forked.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from attrs import frozen

from mmuemu.errors import ConfigError
from mmuemu.mm.mmap import PROTS

if TYPE_CHECKING:
    from mmuemu.machine import Machine
    from mmuemu.mm.vma import File
    from mmuemu.process import Process

__all__ = ["Image", "ImageRegion", "map_image", "prot_string"]

PAGE = 4096
PMD_SIZE = 2 << 20
KINDS = ("file", "anon")
FORMATS = ("elf", "smaps")
#: file names whose pages are shmem (tmpfs, SysV shm, memfd, /dev/zero's shared mappings)
SHMEM_PREFIXES = ("/dev/shm/", "/SYSV", "/memfd:", "/dev/zero")


def prot_string(read: bool, write: bool, execute: bool) -> str:
    """The ``Process.mmap`` prot string for permission bits (write implies read, as on
    x86_64 and arm64)."""
    s = "".join(c for c, on in (("r", read or write), ("w", write), ("x", execute)) if on)
    return s or "none"


@frozen
class ImageRegion:
    """One mapping of an image.  ``rss`` is its resident bytes, ``anon`` the resident
    anonymous ones (private dirty or COWed pages), ``thp`` those mapped by PMD THPs."""

    name: str
    start: int
    size: int
    prot: str
    kind: str
    shared: bool = False
    offset: int = 0
    rss: int = 0
    anon: int = 0
    thp: int = 0

    def __attrs_post_init__(self) -> None:
        where = f"region {self.name!r} at {self.start:#x}"
        if self.start % PAGE or self.size <= 0 or self.size % PAGE or self.offset % PAGE:
            raise ConfigError(f"{where}: start, size ({self.size:#x}) and offset must be "
                              f"page aligned and the size positive")
        if self.prot not in PROTS or self.kind not in KINDS:
            raise ConfigError(f"{where}: prot {self.prot!r} / kind {self.kind!r} unknown; "
                              f"prot is one of {', '.join(PROTS)}, kind one of {', '.join(KINDS)}")
        if not 0 <= self.thp <= self.anon <= self.rss <= self.size:
            raise ConfigError(f"{where}: need 0 <= thp <= anon <= rss <= size, got "
                              f"{self.thp}, {self.anon}, {self.rss}, {self.size}")
        if self.thp and (self.kind != "anon" or self.shared or self.thp % PMD_SIZE):
            raise ConfigError(f"{where}: THP bytes need private anonymous memory and a "
                              f"multiple of 2 MiB")

    @property
    def end(self) -> int:
        return self.start + self.size


@frozen
class Image:
    """The regions of a process image, sorted by address and not overlapping; ``skipped``
    names the mappings that are not modelled (vDSO, vsyscall, ...)."""

    source: str
    format: str
    arch: str | None
    regions: tuple[ImageRegion, ...]
    skipped: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"{self.source}: image format {self.format!r} is not one of {FORMATS}")
        for a, b in pairwise(self.regions):
            if b.start < a.end:
                raise ConfigError(f"{self.source}: regions {a.name!r} [{a.start:#x}, {a.end:#x}) and "
                                  f"{b.name!r} [{b.start:#x}, {b.end:#x}) overlap or are not sorted")

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def rss(self) -> int:
        return sum(r.rss for r in self.regions)

    @property
    def anon(self) -> int:
        return sum(r.anon for r in self.regions)

    def describe(self) -> list[dict[str, Any]]:
        """One row per region, like smaps."""
        return [{"start": f"{r.start:#x}", "end": f"{r.end:#x}", "prot": r.prot, "shared": r.shared,
                 "kind": r.kind, "size_kib": r.size >> 10, "rss_kib": r.rss >> 10,
                 "anon_kib": r.anon >> 10, "thp_kib": r.thp >> 10, "name": r.name}
                for r in self.regions]


def map_image(process: Process, image: Image, *, populate: bool = True) -> dict[str, int]:
    """Map every region of ``image`` at its address into ``process``; with ``populate``, fault
    its resident pages in.  Returns region name -> address (repeated names get "#2", ...).

    Where the resident pages sit is not known, so they are the first ``rss`` bytes of each
    region (the last ones for ``[stack]``): its THP bytes at the first PMD-aligned addresses,
    then its other anonymous bytes (written: a private file page becomes a COW copy), then
    the rest read.  Regions that must be written but are not writable are mapped writable,
    populated, then mprotected.  Emulated files are sized to the extents the image maps.
    On an error (mmuemu.OutOfMemory, ...) what was mapped is unmapped and the files it
    created are dropped, then the error propagates.
    """
    m = process.machine
    if image.arch is not None and image.arch != m.arch.name:
        raise ConfigError(f"{image.source}: the image is for {image.arch} but the machine is {m.arch.name}")
    if populate:
        need = sum(r.rss + (r.anon if r.kind == "file" else 0) for r in image.regions) // PAGE
        if need > m.free_pages:
            raise ConfigError(f"{image.source}: the image needs {need} free pages "
                              f"({need * PAGE >> 20} MiB resident, with page cache under COW "
                              f"copies) but the machine has {m.free_pages} "
                              f"({m.free_pages * PAGE >> 20} MiB); give it more memory")
    sizes, offsets = _file_layout(image.regions)
    files = {name: m.file(name, size, shmem=name.startswith(SHMEM_PREFIXES))
             for name, size in sizes.items()}
    mapped: list[tuple[int, int]] = []
    orders = process.mm.folio_orders
    names: dict[str, int] = {}
    try:
        for r, off in zip(image.regions, offsets, strict=True):
            _map_region(process, r, files.get(r.name) if r.kind == "file" else None, off,
                        populate, mapped)
            key, n = r.name, 1
            while key in names:
                n += 1
                key = f"{r.name}#{n}"
            names[key] = r.start
    except BaseException:
        process.set_folio_orders(orders)
        for addr, size in reversed(mapped):
            process.munmap(addr, size)
        _drop_files(m, files.values())
        raise
    return names


def _map_region(process: Process, r: ImageRegion, file: File | None, offset: int, populate: bool,
                mapped: list[tuple[int, int]]) -> None:
    """Map one region and fault its resident pages in."""
    thp, writes, reads = _resident(r) if populate else (None, [], [])
    wanted = set(r.prot.replace("none", ""))
    if writes or thp:
        wanted |= {"r", "w"}
    if reads:
        wanted.add("r")
    prot = prot_string("r" in wanted, "w" in wanted, "x" in wanted)
    addr = process.mmap(r.size, prot, addr=r.start, shared=r.shared, file=file, offset=offset)
    mapped.append((addr, r.size))
    if thp is not None:
        orders = process.mm.folio_orders
        process.madvise(r.start, r.size, "hugepage")
        process.set_folio_orders([*orders, process.machine.arch.pmd_order])
        try:
            process.populate(thp[0], thp[1] - thp[0], write=True)
        finally:
            process.set_folio_orders(orders)
    for lo, hi in writes:
        process.populate(lo, hi - lo, write=True)
    for lo, hi in reads:
        process.populate(lo, hi - lo, write=False)
    if prot != r.prot:
        process.mprotect(r.start, r.size, r.prot)


Span = tuple[int, int]


def _resident(r: ImageRegion) -> tuple[Span | None, list[Span], list[Span]]:
    """Where a region's resident bytes go: (THP range, ranges to write, ranges to read)."""
    thp: Span | None = None
    gaps = [(r.start, r.end)]
    if r.thp:
        lo = -(-r.start // PMD_SIZE) * PMD_SIZE
        hi = min(lo + r.thp, r.end // PMD_SIZE * PMD_SIZE)
        if hi > lo:
            thp = (lo, hi)
            gaps = [(r.start, lo), (hi, r.end)]
    placed = thp[1] - thp[0] if thp else 0
    top = r.name == "[stack]"
    if r.shared:  # shared pages are page cache or shmem: read them in
        return thp, [], _spans(gaps, 0, page_up(r.rss), top)
    anon = page_up(r.anon) - placed
    return thp, _spans(gaps, 0, anon, top), _spans(gaps, anon, page_up(r.rss) - placed - anon, top)


def page_up(n: int) -> int:
    """``n`` rounded up to whole pages."""
    return -(-n // PAGE) * PAGE


def _spans(gaps: list[Span], skip: int, n: int, top: bool) -> list[Span]:
    """``n`` bytes of the gaps after the first ``skip``, walking up (or down from the top)."""
    out: list[Span] = []
    for lo, hi in reversed(gaps) if top else gaps:
        size = hi - lo
        if skip >= size:
            skip -= size
            continue
        take = min(n, size - skip)
        if take <= 0:
            break
        out.append((hi - skip - take, hi - skip) if top else (lo + skip, lo + skip + take))
        n -= take
        skip = 0
    return sorted(out)


def _file_layout(regions: tuple[ImageRegion, ...]) -> tuple[dict[str, int], list[int]]:
    """Each file's emulated size and each region's offset in it: the extents a file's regions
    map are packed together (keeping which regions share pages), so a mapping at a huge
    offset (a device, a sparse file) does not need a huge page-cache array."""
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(regions):
        if r.kind == "file":
            by_name[r.name].append(i)
    offsets = [0] * len(regions)
    sizes: dict[str, int] = {}
    for name, idx in by_name.items():
        extents: list[list[int]] = []  # [start, end, packed start]
        for i in sorted(idx, key=lambda i: regions[i].offset):
            r = regions[i]
            if not extents or r.offset > extents[-1][1]:
                base = extents[-1][2] + extents[-1][1] - extents[-1][0] if extents else 0
                extents.append([r.offset, r.offset + r.size, base])
            else:
                extents[-1][1] = max(extents[-1][1], r.offset + r.size)
            offsets[i] = extents[-1][2] + r.offset - extents[-1][0]
        last = extents[-1]
        sizes[name] = last[2] + last[1] - last[0]
    return sizes, offsets


def _drop_files(m: Machine, files: Any) -> None:
    """Forget files map_image created and nothing maps any more, freeing their page cache
    (the last fput of a file nobody else opened)."""
    k = m.kernel
    for f in files:
        cached = f.pagecache[f.pagecache != 0]
        f.pagecache[:] = 0
        if f in k.files:
            k.files.remove(f)
        if len(cached):
            k.phys.ref_sub_and_free(cached, 1)
