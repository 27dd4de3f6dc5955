"""Address-space changes: mmap, munmap, mremap, mprotect and madvise.

Mirrors: mm/mmap.c (do_mmap, do_vmi_munmap, vma_merge), mm/mremap.c (move_vma, move_ptes),
mm/mprotect.c (mprotect_fixup, change_protection) and mm/madvise.c.  Bad requests raise
InvalidArgument before anything changes.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from mmuemu.errors import InvalidArgument
from mmuemu.mm.fault import populate_tables
from mmuemu.mm.huge_memory import split_huge_pmds_in
from mmuemu.mm.mm import Kernel, Mm
from mmuemu.mm.physmem import F_ANON
from mmuemu.mm.vma import File, Vma, VmFlag
from mmuemu.mm.work import Ops, Work
from mmuemu.mm.zap import zap_range
from mmuemu.runs import expand_runs

__all__ = ["ADVICE", "PROTS", "do_madvise", "do_mmap", "do_mprotect", "do_mremap", "do_munmap", "exit_mmap",
           "parse_prot"]

PAGE = 4096
MMAP_MIN_ADDR = 0x10000
TASK_SIZE = 1 << 47
MMAP_BASE = 0x7F00_0000_0000
PROTS: dict[str, int] = {
    "none": 0,
    "r": VmFlag.READ,
    "rw": VmFlag.READ | VmFlag.WRITE,
    "rx": VmFlag.READ | VmFlag.EXEC,
    "rwx": VmFlag.READ | VmFlag.WRITE | VmFlag.EXEC,
    "x": VmFlag.EXEC,
}
ADVICE = ("hugepage", "nohugepage", "dontneed", "dontfork", "dofork", "wipeonfork", "keeponfork")
PROT_BITS = VmFlag.READ | VmFlag.WRITE | VmFlag.EXEC


def parse_prot(prot: str) -> int:
    """The vm_flags of a protection string like ``"rw"``."""
    try:
        return PROTS[prot]
    except (KeyError, TypeError):
        raise InvalidArgument(f"unknown prot {prot!r}; allowed: {', '.join(PROTS)}") from None


def _check_range(start: int, length: int, what: str) -> int:
    if not isinstance(start, int) or not isinstance(length, int):
        raise InvalidArgument(f"{what}: address and length must be integers, got {start!r}, {length!r}")
    if start % PAGE:
        raise InvalidArgument(f"{what}: address {start:#x} is not page aligned (4096)")
    if length <= 0:
        raise InvalidArgument(f"{what}: length {length} must be positive")
    length = (length + PAGE - 1) & ~(PAGE - 1)
    if start < 0 or start + length > TASK_SIZE:
        raise InvalidArgument(f"{what}: [{start:#x}, {start + length:#x}) is outside user space "
                              f"[0, {TASK_SIZE:#x})")
    return length


def _check_mapped(mm: Mm, start: int, end: int, what: str) -> list[Vma]:
    vmas = mm.vmas.overlapping(start, end)
    addr = start
    for v in vmas:
        if v.start > addr:
            break
        addr = v.end
    if addr < end:
        raise InvalidArgument(f"{what}: [{start:#x}, {end:#x}) is not fully mapped "
                              f"(nothing at {addr:#x}; the kernel says ENOMEM)")
    return vmas


def split_vmas(k: Kernel, mm: Mm, start: int, end: int, ops: Ops | None = None) -> list[Vma]:
    """Split VMAs at ``start`` and ``end``, splitting PMD leaves that straddle either edge.

    Mirrors: __split_vma with vma_adjust_trans_huge (split_huge_pmd_address at the edges).
    """
    ops = ops if ops is not None else Ops()
    size = 1 << k.arch.pmd_shift
    for edge in (start, end):
        if edge % size:
            split_huge_pmds_in(k, mm, edge, edge + 1, ops)
    return mm.vmas.split(start, end)


def do_mmap(k: Kernel, mm: Mm, length: int, prot: str, *, addr: int | None = None,
            shared: bool = False, align: int | None = None, file: File | None = None,
            offset: int = 0) -> int:
    """Mirrors: mm/mmap.c do_mmap for anonymous and file mappings (MAP_FIXED_NOREPLACE when
    ``addr`` is given)."""
    flags = parse_prot(prot)
    if not isinstance(length, int) or length <= 0:
        raise InvalidArgument(f"mmap: length {length!r} must be a positive integer")
    length = (length + PAGE - 1) & ~(PAGE - 1)
    if align is None:
        align = PAGE
    if not isinstance(align, int) or align < PAGE or align & (align - 1):
        raise InvalidArgument(f"mmap: align {align!r} must be a power of two >= 4096")
    if offset % PAGE:
        raise InvalidArgument(f"mmap: file offset {offset:#x} is not page aligned")
    if addr is None:
        found = mm.vmas.unmapped_area(length, align, MMAP_MIN_ADDR, MMAP_BASE)
        if found is None:
            raise InvalidArgument(f"mmap: no free range of {length} bytes aligned to {align}")
        addr = found
    else:
        _check_range(addr, length, "mmap")
        if addr % align:
            raise InvalidArgument(f"mmap: address {addr:#x} is not aligned to {align:#x}")
        if addr < MMAP_MIN_ADDR:
            raise InvalidArgument(f"mmap: address {addr:#x} is below mmap_min_addr {MMAP_MIN_ADDR:#x}")
        if mm.vmas.overlapping(addr, addr + length):
            raise InvalidArgument(f"mmap: [{addr:#x}, {addr + length:#x}) overlaps an existing mapping "
                                  f"(MAP_FIXED_NOREPLACE: EEXIST)")
    # new mappings start with VM_SOFTDIRTY set: soft-dirty tracking is off until clear_refs
    flags |= VmFlag.MAYREAD | VmFlag.MAYWRITE | VmFlag.MAYEXEC | VmFlag.SOFTDIRTY
    pgoff = offset // PAGE
    if shared:
        flags |= VmFlag.SHARED | VmFlag.MAYSHARE
        if file is None:  # shared anonymous memory is a shmem file
            file = File(f"anon_shmem@{addr:#x}", length // PAGE, swapbacked=True, anonymous=True)
            k.files.append(file)
            pgoff = 0
    if file is not None and pgoff + length // PAGE > file.nr_pages:
        raise InvalidArgument(f"mmap: offset {offset:#x} + length {length:#x} runs past the end of "
                              f"file {file.name!r} ({file.nr_pages * PAGE:#x} bytes)")
    vma = Vma(addr, addr + length, flags, file, pgoff)
    mm.vmas.insert(vma)
    mm.vmas.merge(addr, addr + length)
    return addr


def do_munmap(k: Kernel, mm: Mm, start: int, length: int) -> Generator[Work, Any, None]:
    """Mirrors: do_vmi_munmap: split, zap, drop the VMAs and free their page tables."""
    length = _check_range(start, length, "munmap")
    end = start + length
    if not mm.vmas.overlapping(start, end):
        return
    yield from zap_range(k, mm, start, end)
    for v in split_vmas(k, mm, start, end):
        mm.vmas.remove(v)
    k.pt.free_unused(mm.pgd_row, start, end, mm.vmas.in_use)
    k.release_unused_files()


def do_mprotect(k: Kernel, mm: Mm, start: int, length: int, prot: str) -> Generator[Work, Any, None]:
    """Mirrors: mm/mprotect.c do_mprotect_pkey / mprotect_fixup / change_protection."""
    newprot = parse_prot(prot)
    length = _check_range(start, length, "mprotect")
    end = start + length
    vmas = _check_mapped(mm, start, end, "mprotect")
    for v in vmas:
        if v.flags & VmFlag.SHARED and newprot & VmFlag.WRITE and not v.flags & VmFlag.MAYWRITE:
            raise InvalidArgument(f"mprotect: {prot!r} on [{v.start:#x}, {v.end:#x}) needs write "
                                  f"access to the file (EACCES)")
    ops = Ops()
    if all((v.flags & PROT_BITS) == newprot for v in vmas):
        yield Work("change_protection", ops)  # mprotect_fixup: nothing to change
        return
    split_huge_pmds_in(k, mm, start, end, ops)
    lo, hi = end, start  # the span of entries actually changed, for the TLB flush
    for v in split_vmas(k, mm, start, end, ops):
        if (v.flags & PROT_BITS) == newprot:
            continue
        v.flags = (v.flags & ~PROT_BITS) | newprot
        span = _change_protection(k, mm, v, ops)
        if span is not None:
            lo, hi = min(lo, span[0]), max(hi, span[1])
    if hi > lo:
        k.arch.flush_tlb_range(mm, lo, hi, ops, k.cpu)
    mm.vmas.merge(start, end)
    yield Work("change_protection", ops)


def _change_protection(k: Kernel, mm: Mm, v: Vma, ops: Ops) -> tuple[int, int] | None:
    """Mirrors: change_pte_range / change_huge_pmd with MM_CP_TRY_CHANGE_WRITABLE.

    Returns the address span of the entries it changed (None: none)."""
    a, pt, ph = k.arch, k.pt, k.phys
    n = a.ptrs_per_table
    prot = v.page_prot(a)
    slots = pt.pmd_slots(mm.pgd_row, v.start, v.end)
    pmd = pt.flat[slots.flat]
    leaf = a.pmd_leaf(pmd)
    want_write = bool(v.flags & VmFlag.WRITE)
    span: list[int] = []
    if leaf.any():
        lf = slots.flat[leaf]
        pte = a.pmd_to_pte(pmd[leaf])
        new = a.pte_modify(pte, prot)
        h = a.pte_pfn(pte)
        if want_write and not v.flags & VmFlag.SHARED:  # can_change_pmd_writable
            new = np.where(ph.anon_exclusive[h] & ~a.pte_write(new), a.pte_mkwrite(new), new)
        pt.flat[lf] = a.pte_to_pmd(new)
        ops.add("pmd_writes", len(lf))
        span += [int(slots.va[leaf][0]), int(slots.va[leaf][-1]) + (n << 12)]
    tabs = (pmd != 0) & ~leaf
    va = slots.va[tabs]
    rows = pt.rows_of(pmd[tabs])
    lo = np.maximum(va, v.start)
    hi = np.minimum(va + (n << 12), v.end)
    idx, off = expand_runs(rows * n + ((lo - va) >> 12), (hi - lo) >> 12)
    vals = pt.flat[idx]
    addr = np.repeat(lo, (hi - lo) >> 12) + (off << 12)
    live = a.pte_present(vals)
    idx, vals, addr = idx[live], vals[live], addr[live]
    if len(addr):
        span += [int(addr[0]), int(addr[-1]) + 4096]
    if not len(idx):
        return (min(span), max(span)) if span else None
    writable = np.zeros(len(idx), bool)
    if want_write:
        if v.flags & VmFlag.SHARED:
            writable = a.pte_dirty(vals)
        else:
            normal = ~a.pte_special(vals)
            pfn = np.where(normal, a.pte_pfn(vals), 0)
            anon = (ph.flags[ph.head[pfn]] & F_ANON) != 0
            writable = normal & anon & ph.anon_exclusive[pfn]
        writable &= a.pte_present(a.pte_modify(vals, prot))
    a.modify_prot_ptes(mm, pt.flat, idx, prot, writable, ops)
    return min(span), max(span)


def do_madvise(k: Kernel, mm: Mm, start: int, length: int, advice: str) -> Generator[Work, Any, None]:
    """Mirrors: mm/madvise.c for the advice mmuemu models."""
    if advice not in ADVICE:
        raise InvalidArgument(f"unknown madvise advice {advice!r}; allowed: {', '.join(ADVICE)}")
    length = _check_range(start, length, "madvise")
    end = start + length
    vmas = _check_mapped(mm, start, end, "madvise")
    if advice == "dontneed":
        yield from zap_range(k, mm, start, end)
        return
    if advice == "wipeonfork":
        for v in vmas:
            if v.flags & VmFlag.SHARED or not v.is_anonymous:
                raise InvalidArgument(f"madvise: wipeonfork needs private anonymous memory; "
                                      f"[{v.start:#x}, {v.end:#x}) is not (EINVAL)")
    set_, clear = {
        "hugepage": (VmFlag.HUGEPAGE, VmFlag.NOHUGEPAGE),
        "nohugepage": (VmFlag.NOHUGEPAGE, VmFlag.HUGEPAGE),
        "dontfork": (VmFlag.DONTCOPY, 0),
        "dofork": (0, VmFlag.DONTCOPY),
        "wipeonfork": (VmFlag.WIPEONFORK, 0),
        "keeponfork": (0, VmFlag.WIPEONFORK),
    }[advice]
    for v in split_vmas(k, mm, start, end):
        v.flags = (v.flags | set_) & ~clear
    mm.vmas.merge(start, end)
    yield Work("madvise", Ops())


def do_mremap(k: Kernel, mm: Mm, addr: int, old_len: int, new_len: int,
              new_addr: int | None = None) -> Generator[Work, Any, int]:
    """Mirrors: mm/mremap.c mremap with MREMAP_MAYMOVE (and MREMAP_FIXED for ``new_addr``)."""
    old_len = _check_range(addr, old_len, "mremap")
    new_len = _check_range(addr, new_len, "mremap")
    if new_addr is not None:
        _check_range(new_addr, new_len, "mremap")
        if new_addr < addr + old_len and addr < new_addr + new_len:
            raise InvalidArgument(f"mremap: new range [{new_addr:#x}, {new_addr + new_len:#x}) "
                                  f"overlaps the old one (EINVAL)")
    vma = mm.vmas.find(addr)
    if vma is None or vma.end < addr + old_len:
        raise InvalidArgument(f"mremap: [{addr:#x}, {addr + old_len:#x}) is not inside one mapping (EFAULT)")
    if new_addr is None:
        if new_len <= old_len:
            if new_len < old_len:
                yield from do_munmap(k, mm, addr + new_len, old_len - new_len)
            return addr
        nxt = mm.vmas.overlapping(addr + old_len, addr + new_len)
        if vma.end == addr + old_len and not nxt and addr + new_len <= TASK_SIZE:
            vma.end = addr + new_len  # grow in place
            mm.vmas.merge(addr, addr + new_len)
            return addr
        found = mm.vmas.unmapped_area(new_len, PAGE, MMAP_MIN_ADDR, MMAP_BASE)
        if found is None:
            raise InvalidArgument(f"mremap: no free range of {new_len} bytes")
        new_addr = found
    else:
        yield from do_munmap(k, mm, new_addr, new_len)
    move = min(old_len, new_len)
    yield from _move_vma(k, mm, addr, move, new_addr)
    if old_len > move:
        yield from do_munmap(k, mm, addr + move, old_len - move)
    if new_len > move:
        grown = mm.vmas.find(new_addr)
        assert grown is not None
        grown.end = new_addr + new_len
    mm.vmas.merge(new_addr, new_addr + new_len)
    return new_addr


def _move_vma(k: Kernel, mm: Mm, old: int, length: int, new: int) -> Generator[Work, Any, None]:
    """Mirrors: mm/mremap.c move_vma / move_page_tables / move_ptes.

    PMD leaves in the moved range are split first (the kernel moves whole PMDs when both
    sides are PMD aligned; mmuemu always moves PTEs).
    """
    a, pt = k.arch, k.pt
    n = a.ptrs_per_table
    ops = Ops()
    split_huge_pmds_in(k, mm, old, old + length, ops, partial_only=False)
    src = split_vmas(k, mm, old, old + length, ops)[0]
    dst = src.copy(start=new, end=new + length)
    # source entries
    slots = pt.pmd_slots(mm.pgd_row, old, old + length)
    pmd = pt.flat[slots.flat]
    tabs = pmd != 0
    va = slots.va[tabs]
    rows = pt.rows_of(pmd[tabs])
    lo = np.maximum(va, old)
    hi = np.minimum(va + (n << 12), old + length)
    sidx, off = expand_runs(rows * n + ((lo - va) >> 12), (hi - lo) >> 12)
    saddr = np.repeat(lo, (hi - lo) >> 12) + (off << 12)
    vals = pt.flat[sidx]
    live = vals != 0
    sidx, saddr, vals = sidx[live], saddr[live], vals[live]
    if len(sidx):
        # destination tables where entries land (allocated before anything moves)
        daddr = saddr - old + new
        dva, dflat = populate_tables(k, mm, int(daddr[0]), int(daddr[-1]) + 4096)
        slot = (daddr - dva[0]) >> a.pmd_shift
        need = np.unique(slot)
        drows = np.full(len(dva), -1, np.int64)
        drows[need] = pt.pte_alloc(dflat[need])
        didx = drows[slot] * n + ((daddr >> 12) & (n - 1))
        flat = pt.flat
        vals = a.ptep_get_and_clear(mm, flat, sidx, ops)
        # move_soft_dirty_pte: a moved entry is soft-dirty
        vals = np.where(a.pte_present(vals), a.pte_mksoft_dirty(vals), vals)
        a.set_ptes(mm, flat, didx, vals, np.ones(len(didx), np.int64), ops)  # set_pte_at
        a.flush_tlb_range(mm, int(saddr[0]), int(saddr[-1]) + 4096, ops, k.cpu)
    mm.vmas.remove(src)
    mm.vmas.insert(dst)
    k.pt.free_unused(mm.pgd_row, old, old + length, mm.vmas.in_use)
    yield Work("move_page_tables", ops)


def exit_mmap(k: Kernel, mm: Mm) -> Generator[Work, Any, None]:
    """Mirrors: mm/mmap.c exit_mmap: unmap everything, free every table, drop the mm."""
    for v in mm.vmas:  # one mmu_gather over every VMA: one flush at the end
        yield from zap_range(k, mm, v.start, v.end, full=True, flush=False)
    ops = Ops()
    k.arch.flush_tlb_mm(mm, ops, k.cpu)
    yield Work("exit_mmap", ops)
    k.pt.free_tree(mm.pgd_row)
    mm.vmas.vmas.clear()
    mm.dead = True
    del k.mms[mm.id]
    k.release_unused_files()
