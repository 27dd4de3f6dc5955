"""GUP: FOLL_GET references and FOLL_PIN pins, with gup_must_unshare's rules."""

from __future__ import annotations

import pytest

import mmuemu

MiB = 1 << 20


def _shared_after_fork(m: mmuemu.Machine) -> tuple[mmuemu.Process, mmuemu.Process, int]:
    p = m.spawn()
    a = p.mmap(4 * 4096)
    p.write(a, 1, length=4 * 4096)
    c = p.fork()
    assert p.folio(a).pfn == c.folio(a).pfn
    return p, c, a


@pytest.mark.parametrize("longterm", [False, True])
def test_ro_pin_unshares_anon(m: mmuemu.Machine, longterm: bool) -> None:
    """Any R/O FOLL_PIN of a maybe-shared anon page unshares it first."""
    p, c, a = _shared_after_fork(m)
    pin = p.pin(a, 4096, write=False, longterm=longterm)
    assert p.folio(a).pfn != c.folio(a).pfn and p.folio(a).anon_exclusive
    assert not p.pte(a).write  # unshare maps the copy read-only
    p.write(a, 2)  # reuses the exclusive page: the pin sees it
    assert pin.read()[0] == 2 and c.read(a) == 1
    pin.release()
    m.check()


def test_get_pages_does_not_unshare(m: mmuemu.Machine) -> None:
    p, c, a = _shared_after_fork(m)
    ref = p.get_pages(a, 4096)
    assert p.folio(a).pfn == c.folio(a).pfn
    p.write(a, 2)  # COW: the reference keeps the old page
    assert ref.read()[0] == 1
    ref.release()
    m.check()


def test_longterm_ro_pin_of_private_file_page_copies(m: mmuemu.Machine) -> None:
    f = m.file("lib.so", 4 * 4096)
    w = m.spawn()
    w.write(w.mmap(4 * 4096, "rw", shared=True, file=f), 7)
    p = m.spawn()
    a = p.mmap(4 * 4096, "r", file=f)
    short = p.pin(a, 4096, write=False, longterm=False)
    assert p.rss["file"] == 1 and not p.folio(a).anon  # short-term: the page-cache page
    pin = p.pin(a, 4096, write=False, longterm=True)
    assert p.rss == {"anon": 1, "file": 0, "shmem": 0, "swap": 0}  # longterm: an anon copy
    assert pin.read()[0] == 7 and short.read()[0] == 7
    pin.release()
    short.release()
    m.check()


def test_pin_touch_does_not_set_pte_bits(m: mmuemu.Machine) -> None:
    p = m.spawn()
    a = p.mmap(4096)
    p.write(a, 1)
    c = p.fork()
    before = c.pte(a).raw
    ref = c.get_pages(a, 4096)
    assert c.pte(a).raw == before  # FOLL_TOUCH marks the folio, not the (old) child PTE
    ref.release()
    c.read(a)
    assert c.pte(a).young  # a CPU load does set Accessed
    m.check()


def test_pin_count_rules(m: mmuemu.Machine) -> None:
    p = m.spawn()
    p.set_folio_orders([4])
    a = p.mmap(64 * 1024)
    b = p.mmap(4096)
    p.populate(a, 64 * 1024)
    p.populate(b, 4096)
    large = p.pin(a, 3 * 4096, write=True)
    small = p.pin(b, 4096, write=True)
    f = p.folio(a)
    assert f.pincount == 3 and f.refcount == 16 + 3 and f.pinned
    g = p.folio(b)
    assert g.refcount == 1 + 1024 and g.pinned  # GUP_PIN_COUNTING_BIAS
    large.release()
    small.release()
    assert not p.folio(a).pinned and p.folio(b).refcount == 1
    m.check()
