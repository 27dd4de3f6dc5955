"""The batched TLB model against a straightforward per-access two-level LRU reference."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from mmuemu.sim import tlb as tlb_module
from mmuemu.sim.tlb import (
    TAG_ASID_SHIFT,
    TAG_SIZE_SHIFT,
    Tlb,
    TlbGeometry,
    TlbLevelState,
    _earlier_greater,
    make_tags,
)

K4, K64, M2 = 1 << 12, 1 << 16, 1 << 21
SHIFT_OF_CODE = (12, 14, 16, 21, 30)


class RefLevel:
    """One level: an OrderedDict (oldest first) of tag -> writable per set."""

    def __init__(self, g: TlbGeometry) -> None:
        self.ways = g.ways
        self.sets: list[OrderedDict[int, bool]] = [OrderedDict() for _ in range(g.sets)]

    def _set(self, tag: int) -> OrderedDict[int, bool]:
        return self.sets[(tag & ((1 << TAG_SIZE_SHIFT) - 1)) % len(self.sets)]

    def get(self, tag: int) -> bool | None:
        s = self._set(tag)
        if tag not in s:
            return None
        s.move_to_end(tag)
        return s[tag]

    def fill(self, tag: int, writable: bool) -> None:
        s = self._set(tag)
        s[tag] = writable
        if len(s) > self.ways:
            s.popitem(last=False)

    def drop(self, pred: object) -> int:
        n = 0
        for s in self.sets:
            for tag in [t for t in s if pred(t)]:  # type: ignore[operator]
                del s[tag]
                n += 1
        return n


class RefTlb:
    def __init__(self, l1: TlbGeometry, l2: TlbGeometry) -> None:
        self.l1, self.l2 = RefLevel(l1), RefLevel(l2)

    def access(self, tag: int, writable: bool) -> tuple[int, bool]:
        w = self.l1.get(tag)
        if w is not None:
            return 0, w
        w = self.l2.get(tag)
        if w is not None:
            self.l1.fill(tag, w)
            return 1, w
        self.l2.fill(tag, writable)
        self.l1.fill(tag, writable)
        return 2, writable

    def lookup(
        self, tags: NDArray[np.int64], writable: NDArray[np.bool_]
    ) -> tuple[list[int], list[bool]]:
        out = [self.access(int(t), bool(w)) for t, w in zip(tags, writable, strict=True)]
        return [o[0] for o in out], [o[1] for o in out]

    def drop(self, pred: object) -> int:
        return self.l1.drop(pred) + self.l2.drop(pred)

    def flush_range(self, asid: int, start: int, end: int) -> int:
        def hit(t: int) -> bool:
            shift = SHIFT_OF_CODE[(t >> TAG_SIZE_SHIFT) & 0xF]
            lo = (t & ((1 << TAG_SIZE_SHIFT) - 1)) << shift
            return t >> TAG_ASID_SHIFT == asid and lo < end and lo + (1 << shift) > start

        return self.drop(hit)


def _contents(state: TlbLevelState) -> list[list[tuple[int, bool]]]:
    """Per set, the (tag, writable) of the valid entries, least recently used first."""
    out = []
    for tags, stamp, w in zip(state.tags, state.stamp, state.writable, strict=True):
        order = np.argsort(stamp, kind="stable")
        out.append([(int(tags[i]), bool(w[i])) for i in order if tags[i] >= 0])
    return out


def _ref_contents(level: RefLevel) -> list[list[tuple[int, bool]]]:
    return [list(s.items()) for s in level.sets]


def _check_same(tlb: Tlb, ref: RefTlb) -> None:
    assert _contents(tlb.state1) == _ref_contents(ref.l1)
    assert _contents(tlb.state2) == _ref_contents(ref.l2)


# a small pool of tags: three ASIDs, 4K/64K/2M pages, vpns that collide in small sets
POOL = np.concatenate(
    [
        make_tags(asid, np.array(vas, dtype=np.int64), shift)
        for asid in (1, 2, 3)
        for shift, vas in (
            (12, [i * K4 for i in range(12)]),
            (16, [i * K64 for i in range(4)]),
            (21, [i * M2 for i in range(3)]),
        )
    ]
)

geometries = st.sampled_from([1, 2, 3, 4]).flatmap(
    lambda sets: st.sampled_from([1, 2, 3, 5, 20]).map(lambda ways: TlbGeometry(sets * ways, ways))
)
batches = st.lists(
    st.tuples(st.integers(0, len(POOL) - 1), st.booleans()), min_size=0, max_size=60
).map(lambda xs: ("batch", xs))


def _drawn_batch(seed: int, n: int, spread: int) -> tuple[str, list[tuple[int, bool]]]:
    """A longer batch over the first ``spread`` tags of the pool (long reuse windows)."""
    rng = np.random.default_rng(seed)
    return "batch", [
        (int(i), bool(b))
        for i, b in zip(rng.integers(0, spread, n), rng.random(n) < 0.5, strict=True)
    ]


long_batches = st.builds(
    _drawn_batch, st.integers(0, 2**32 - 1), st.integers(50, 300), st.integers(2, len(POOL))
)
flushes = st.one_of(
    st.tuples(st.just("asid"), st.integers(1, 3)),
    st.tuples(st.just("range"), st.integers(1, 3), st.integers(0, 3 * M2), st.integers(1, 2 * M2)),
    st.just(("all",)),
)
ops = st.lists(st.one_of(batches, batches, long_batches, flushes), min_size=1, max_size=8)


@settings(max_examples=500, deadline=None)
@given(l1=geometries, l2=geometries, script=ops)
def test_matches_reference(l1: TlbGeometry, l2: TlbGeometry, script: list[tuple]) -> None:
    tlb, ref = Tlb(l1, l2), RefTlb(l1, l2)
    for op in script:
        if op[0] == "batch":
            idx = np.array([i for i, _ in op[1]], dtype=np.intp)
            tags = POOL[idx]
            w = np.array([b for _, b in op[1]], dtype=bool)
            got = tlb.lookup(tags, w)
            level, writable = ref.lookup(tags, w)
            assert got.level.tolist() == level
            assert got.writable.tolist() == writable
            assert got.l1_misses == sum(x >= 1 for x in level)
            assert got.l2_misses == sum(x == 2 for x in level)
        elif op[0] == "asid":
            assert tlb.flush_asid(op[1]) == ref.drop(lambda t, a=op[1]: t >> TAG_ASID_SHIFT == a)
        elif op[0] == "range":
            _, asid, start, length = op
            assert tlb.flush_range(asid, start, start + length) == ref.flush_range(
                asid, start, start + length
            )
        else:
            assert tlb.flush_all() == ref.drop(lambda t: True)
        _check_same(tlb, ref)
        assert len(tlb) == sum(len(s) for lv in (ref.l1, ref.l2) for s in lv.sets)


@settings(max_examples=40, deadline=None)
@given(
    l1=geometries,
    l2=st.sampled_from([TlbGeometry(64, 8), TlbGeometry(60, 20)]),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 3000),
    distinct=st.integers(1, 400),
)
def test_long_batches_match_reference(
    l1: TlbGeometry, l2: TlbGeometry, seed: int, n: int, distinct: int
) -> None:
    """Long batches (long reuse windows, exact dominance counts) and a bigger L2."""
    rng = np.random.default_rng(seed)
    tlb, ref = Tlb(l1, l2), RefTlb(l1, l2)
    tags = make_tags(5, rng.integers(0, distinct, n) * K4, 12)
    w = rng.random(n) < 0.5
    for lo, hi in ((0, n // 3), (n // 3, n)):
        got = tlb.lookup(tags[lo:hi], w[lo:hi])
        level, writable = ref.lookup(tags[lo:hi], w[lo:hi])
        assert got.level.tolist() == level
        assert got.writable.tolist() == writable
    _check_same(tlb, ref)


def test_stale_writable_until_flush() -> None:
    tlb = Tlb(TlbGeometry(4, 4), TlbGeometry(16, 4))
    t = make_tags(7, np.array([0x4000_0000], dtype=np.int64), 12)
    assert tlb.lookup(t, np.array([True])).writable.tolist() == [True]
    # the page table was write-protected: the cached entry still allows the write
    r = tlb.lookup(np.repeat(t, 3), np.zeros(3, dtype=bool))
    assert r.level.tolist() == [0, 0, 0] and r.writable.tolist() == [True] * 3
    # an L1-only eviction: the L2 still serves the stale bit
    tlb.state1.drop(tlb.state1.tags >= 0)
    r = tlb.lookup(t, np.array([False]))
    assert r.level.tolist() == [1] and r.writable.tolist() == [True]
    assert tlb.flush_range(7, 0x4000_0000, 0x4000_1000) == 2
    r = tlb.lookup(t, np.array([False]))
    assert r.level.tolist() == [2] and r.writable.tolist() == [False]


def test_flush_range_decodes_page_sizes() -> None:
    tlb = Tlb(TlbGeometry(64, 64), TlbGeometry(256, 4))
    base = 0x7F00_0000_0000
    t4 = make_tags(1, base + np.arange(4, dtype=np.int64) * K4, 12)  # base .. base+16K
    t64 = make_tags(1, np.array([base + M2], dtype=np.int64), 16)  # [base+2M, +64K)
    t2m = make_tags(1, np.array([base + 4 * M2 + 5], dtype=np.int64), 21)  # [base+8M, +2M)
    other = make_tags(2, np.array([base], dtype=np.int64), 12)
    tlb.lookup(np.concatenate([t4, t64, t2m, other]), True)
    assert len(tlb) == 2 * 7
    assert tlb.flush_range(1, base + K4 + 1, base + K4 + 2) == 2  # one 4K page, both levels
    assert tlb.flush_range(1, base + M2 + K64 - 1, base + M2 + K64) == 2  # last byte of 64K
    assert tlb.flush_range(1, base + M2 + K64, base + 4 * M2) == 0  # the gaps
    assert tlb.flush_range(1, base + 5 * M2 - 1, base + 5 * M2 + 1) == 2  # 2M page's last byte
    assert tlb.flush_range(1, base, base + 4 * K4) == 2 * 3
    assert tlb.flush_range(1, base, base) == 0
    assert len(tlb) == 2  # ASID 2 is untouched
    assert tlb.flush_asid(2) == 2 and len(tlb) == 0


def test_make_tags() -> None:
    t = make_tags(3, np.array([0x1234_5000, 0x40_0000], dtype=np.int64), np.array([12, 21]))
    assert t[0] == (3 << 48) | (0 << 44) | 0x12345
    assert t[1] == (3 << 48) | (3 << 44) | 2
    assert make_tags(1, np.array([1 << 30], dtype=np.int64), 30)[0] == (1 << 48) | (4 << 44) | 1
    assert make_tags(1, np.array([1 << 14], dtype=np.int64), 14)[0] == (1 << 48) | (1 << 44) | 1
    with pytest.raises(ValueError, match="page shifts"):
        make_tags(1, np.array([0], dtype=np.int64), 13)
    with pytest.raises(ValueError, match="asid"):
        make_tags(1 << 15, np.array([0], dtype=np.int64), 12)
    with pytest.raises(ValueError, match="44 bits"):
        make_tags(1, np.array([1 << 57], dtype=np.int64), 12)


@pytest.mark.parametrize(("entries", "ways"), [(0, 1), (4, 0), (10, 4), (-4, -2)])
def test_geometry_validation(entries: int, ways: int) -> None:
    with pytest.raises(ValueError, match=f"entries={entries}, ways={ways}"):
        TlbGeometry(entries, ways)


def test_geometry_sets() -> None:
    assert TlbGeometry(64, 4).sets == 16
    assert TlbGeometry(48, 48).sets == 1
    assert TlbGeometry(1536, 12).sets == 128


def _random_batch(
    rng: np.random.Generator, n: int, distinct: int
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    return make_tags(1, rng.integers(0, distinct, n) * K4, 12), rng.random(n) < 0.5


def test_peek_does_not_change_state() -> None:
    rng = np.random.default_rng(1)
    tlb = Tlb(TlbGeometry(16, 4), TlbGeometry(64, 8))
    tlb.lookup(*_random_batch(rng, 200, 100))
    before = (tlb.state1.copy(), tlb.state2.copy())
    tags, w = _random_batch(rng, 300, 100)
    peeked, s1, s2 = tlb.peek(tags, w)
    for old, new in zip(before, (tlb.state1, tlb.state2), strict=True):
        assert np.array_equal(old.tags, new.tags) and np.array_equal(old.stamp, new.stamp)
        assert np.array_equal(old.writable, new.writable) and old.clock == new.clock
    got = tlb.lookup(tags, w)
    assert np.array_equal(got.level, peeked.level)
    assert np.array_equal(got.writable, peeked.writable)
    assert _contents(s1) == _contents(tlb.state1) and _contents(s2) == _contents(tlb.state2)


@pytest.mark.parametrize("k", [0, 1, 37, 299, 300])
def test_prefix_lookup_equals_first_results(k: int) -> None:
    rng = np.random.default_rng(2)
    tlb = Tlb(TlbGeometry(8, 8), TlbGeometry(32, 4))
    tlb.lookup(*_random_batch(rng, 100, 60))
    tags, w = _random_batch(rng, 300, 60)
    full, _, _ = tlb.peek(tags, w)
    part = tlb.lookup(tags[:k], w[:k])
    assert np.array_equal(part.level, full.level[:k])
    assert np.array_equal(part.writable, full.writable[:k])
    rest = tlb.lookup(tags[k:], w[k:])  # resuming gives the rest of the full batch
    assert np.array_equal(rest.level, full.level[k:])


@pytest.mark.parametrize(
    ("entries", "ways", "distinct"), [(64, 64, 256), (48, 48, 400), (64, 4, 256)]
)
def test_uniform_random_hit_rate(entries: int, ways: int, distinct: int) -> None:
    """Uniform random accesses over R tags hit an LRU TLB of E entries with probability E/R."""
    rng = np.random.default_rng(3)
    tlb = Tlb(TlbGeometry(entries, ways), TlbGeometry(2 * entries, ways))
    tlb.lookup(*_random_batch(rng, 8192, distinct))  # warm up
    hits = total = 0
    for _ in range(25):
        r = tlb.lookup(*_random_batch(rng, 8192, distinct))
        hits += int(np.count_nonzero(r.level == 0))
        total += len(r)
    assert hits / total == pytest.approx(entries / distinct, rel=0.03)


def test_empty_batch_and_scalar_writable() -> None:
    tlb = Tlb(TlbGeometry(4, 2), TlbGeometry(8, 2))
    r = tlb.lookup(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
    assert len(r) == 0 and r.l1_misses == 0 and len(tlb) == 0
    t = make_tags(1, np.arange(3, dtype=np.int64) * K4, 12)
    assert tlb.lookup(t, True).writable.tolist() == [True] * 3
    assert tlb.flush_all() == 3 + 3 and len(tlb) == 0
    with pytest.raises(ValueError, match="non-negative"):
        tlb.lookup(np.array([-1]), True)


@pytest.mark.parametrize("m", [1, 2, 3, 7, 64, 100, 513, 4000])
def test_earlier_greater_counts(m: int) -> None:
    """The dominance count behind the reuse distances, against brute force."""
    rng = np.random.default_rng(m)
    for bound in (m, 20 * m):
        y = rng.choice(bound, m, replace=False)
        want = [(y[:k] > y[k]).sum() for k in range(m)]
        assert _earlier_greater(y, bound).tolist() == want


def test_hash_collisions_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every tag hashing alike, grouping by tag takes the exact fallback."""
    rng = np.random.default_rng(4)
    l1, l2 = TlbGeometry(8, 2), TlbGeometry(32, 4)
    tags, w = _random_batch(rng, 500, 40)
    want = Tlb(l1, l2).lookup(tags, w)
    monkeypatch.setattr(tlb_module, "_HASH_MUL", np.uint64(0))
    got = Tlb(l1, l2).lookup(tags, w)
    assert np.array_equal(got.level, want.level) and np.array_equal(got.writable, want.writable)
    assert RefTlb(l1, l2).lookup(tags, w)[0] == got.level.tolist()


@settings(max_examples=60, deadline=None)
@given(l1=geometries, l2=geometries, script=ops)
def test_single_accesses_match_reference(l1: TlbGeometry, l2: TlbGeometry, script: list[tuple]) -> None:
    """access_one (the fault path's one-access lookup) and probe agree with the reference,
    interleaved with batch lookups and flushes."""
    tlb, ref = Tlb(l1, l2), RefTlb(l1, l2)
    for n, op in enumerate(script):
        if op[0] != "batch":
            tlb.flush_all()
            ref.drop(lambda t: True)
            continue
        for i, w in op[1]:
            tag = int(POOL[i])
            before = tlb.probe(tag)
            if n % 2:
                got = tlb.access_one(tag, w)
                level, writable = ref.lookup(np.array([tag]), np.array([w]))
                assert got == (level[0], writable[0])
                assert before[0] == level[0]
            else:
                one = tlb.lookup(np.array([tag]), np.array([w]))
                ref.lookup(np.array([tag]), np.array([w]))
                assert before[0] == int(one.level[0])
        _check_same(tlb, ref)
