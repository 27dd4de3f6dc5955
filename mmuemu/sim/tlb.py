"""A per-CPU, two-level, set-associative, true-LRU, ASID-tagged TLB, looked up in batches.

Each CPU owns one :class:`Tlb`: an L1 and an L2, each a number of sets of ``ways`` entries
kept in true LRU order.  An access is an int64 *tag* (:func:`make_tags`): the ASID, a page-size
code and the virtual page number at that size.  L1 is looked up first; an L1 miss looks up
L2; an L2 miss is a page walk that fills both levels (the L2 keeps entries also in the L1).
An entry caches the writable bit it was filled with until it is evicted or flushed, so a
stale entry keeps allowing writes after the page table was write-protected.

A batch is looked up without a per-access Python loop.  Per level, the current entries of
every set are prefixed to the batch as synthetic accesses (oldest first) and the accesses are
stably grouped by set; an access hits iff its tag was accessed before in its set and fewer
than ``ways`` distinct tags were accessed in that set in between.  Cheap bounds settle most
accesses; otherwise the distinct count is the window length minus the repeats inside it, an
offline dominance count done level by level over the bits of the access index.
"""

from __future__ import annotations

import numpy as np
from attrs import define, field, frozen
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "PAGE_SHIFTS",
    "TAG_ASID_SHIFT",
    "TAG_SIZE_SHIFT",
    "Lookup",
    "Tlb",
    "TlbGeometry",
    "TlbLevelState",
    "make_tags",
]

TAG_ASID_SHIFT = 48
TAG_SIZE_SHIFT = 44
#: page shifts an entry may map, indexed by the tag's size code
PAGE_SHIFTS = (12, 14, 16, 21, 30)
_VPN_MASK = (1 << TAG_SIZE_SHIFT) - 1
_MAX_ASID = 1 << (63 - TAG_ASID_SHIFT)
_SIZE_CODE = np.full(64, -1, dtype=np.int64)
_SIZE_CODE[list(PAGE_SHIFTS)] = np.arange(len(PAGE_SHIFTS))
_SHIFT_OF_CODE = np.array(PAGE_SHIFTS + (63,) * (16 - len(PAGE_SHIFTS)), dtype=np.int64)
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)
_NEVER = np.iinfo(np.int64).max


def make_tags(
    asid: int, vaddr: NDArray[np.int64], shift: NDArray[np.int64] | int
) -> NDArray[np.int64]:
    """Tags for accesses at ``vaddr`` through entries of size ``1 << shift`` (per access or
    one for all), in address space ``asid``."""
    if not 0 <= asid < _MAX_ASID:
        raise ValueError(f"asid {asid} outside [0, {_MAX_ASID})")
    va = np.asarray(vaddr, dtype=np.int64)
    sh = np.asarray(shift, dtype=np.int64)
    if sh.size and (sh.min() < 0 or sh.max() > 63 or (_SIZE_CODE[sh] < 0).any()):
        raise ValueError(f"page shifts must be in {PAGE_SHIFTS}, got {np.unique(sh).tolist()}")
    vpn = va >> sh
    if va.size and (va.min() < 0 or (vpn >> TAG_SIZE_SHIFT).any()):
        raise ValueError("virtual page numbers must fit in 44 bits (and addresses be >= 0)")
    tags: NDArray[np.int64] = (asid << TAG_ASID_SHIFT) | (_SIZE_CODE[sh] << TAG_SIZE_SHIFT) | vpn
    return tags


@frozen
class TlbGeometry:
    """The shape of one TLB level: ``entries`` in sets of ``ways`` (``ways == entries`` is
    fully associative, ``ways == 1`` direct mapped)."""

    entries: int
    ways: int

    def __attrs_post_init__(self) -> None:
        if self.entries <= 0 or self.ways <= 0 or self.entries % self.ways:
            raise ValueError(
                f"TLB geometry needs positive entries and ways with ways dividing entries, "
                f"got entries={self.entries}, ways={self.ways}"
            )

    @property
    def sets(self) -> int:
        return self.entries // self.ways


@define(eq=False)
class TlbLevelState:
    """The content of one TLB level: a tag (-1: invalid), a last-use stamp and the writable bit
    cached at fill time per entry, each of shape (sets, ways); ``clock`` orders the stamps
    (it counts the accesses, so a level whose clock is 0 was never filled)."""

    tags: NDArray[np.int64]
    stamp: NDArray[np.int64]
    writable: NDArray[np.bool_]
    clock: int = 0

    @classmethod
    def empty(cls, geometry: TlbGeometry) -> TlbLevelState:
        shape = (geometry.sets, geometry.ways)
        return cls(
            np.full(shape, -1, dtype=np.int64),
            np.zeros(shape, dtype=np.int64),
            np.zeros(shape, dtype=bool),
        )

    def copy(self) -> TlbLevelState:
        return TlbLevelState(self.tags.copy(), self.stamp.copy(), self.writable.copy(), self.clock)

    def __len__(self) -> int:
        return int(np.count_nonzero(self.tags >= 0))

    def drop(self, mask: NDArray[np.bool_]) -> int:
        """Invalidate the valid entries selected by ``mask``; return how many."""
        mask = mask & (self.tags >= 0)
        self.tags[mask] = -1
        return int(np.count_nonzero(mask))


@frozen(eq=False)
class Lookup:
    """The result of a batch: per access the level that served it (0: L1 hit, 1: L2 hit,
    2: page walk) and the writable bit of the entry that served it (for a walk, the fill)."""

    level: NDArray[np.int8]
    writable: NDArray[np.bool_]

    @property
    def l1_misses(self) -> int:
        return int(np.count_nonzero(self.level >= 1))

    @property
    def l2_misses(self) -> int:
        return int(np.count_nonzero(self.level == 2))

    def __len__(self) -> int:
        return len(self.level)


def _group_by_tag(t: NDArray[np.int64]) -> tuple[NDArray[np.intp], NDArray[np.bool_]]:
    """Positions sorted by (tag, position) and, per adjacent pair, whether the tags are equal.

    One value sort of (multiplicative hash of the tag, position) packed in 64 bits; a hash
    collision is detected exactly, and then a stable argsort is used instead.
    """
    n = len(t)
    pb = max(1, (n - 1).bit_length())
    if pb <= 24:
        low = np.uint64((1 << pb) - 1)
        key = (t.view(np.uint64) * _HASH_MUL) & ~low
        key |= np.arange(n, dtype=np.uint64)
        key.sort()
        order = (key & low).astype(np.intp)
        st = t[order]
        same = st[1:] == st[:-1]
        key >>= np.uint64(pb)
        if np.array_equal(same, key[1:] == key[:-1]):
            return order, same
    order = np.argsort(t, kind="stable")
    st = t[order]
    return order, st[1:] == st[:-1]


def _earlier_greater(y: NDArray[np.intp], bound: int) -> NDArray[np.intp]:
    """For every k, #{l < k : y[l] > y[k]}, for distinct ``y`` in [0, bound).

    Level h compares every index in the right half of an aligned block of 2**(h+1) indices
    with the left half: the ranks of y within blocks of both sizes (a stable radix sort of the
    y-ordered indices by block) give the count of smaller, hence greater, values on the left.
    """
    m = len(y)
    if 8 * m < bound:
        by_y = np.argsort(y)
    else:
        slot = np.full(bound, -1, dtype=np.intp)
        slot[y] = np.arange(m)
        by_y = slot[slot >= 0]
    idx = np.arange(m)
    count = np.zeros(m, dtype=np.intp)
    lo = np.zeros(m, dtype=np.intp)
    levels = max(1, (m - 1).bit_length())
    for h in range(levels):
        size = 1 << (h + 1)
        perm = by_y
        if h + 1 < levels:
            block = by_y >> (h + 1)
            key = block.astype(np.uint16) if m < size << 16 else block  # radix sorted
            perm = by_y[np.argsort(key, kind="stable")]
        hi = np.empty(m, dtype=np.intp)
        hi[perm] = idx & (size - 1)  # blocks before the last are full
        lo -= hi
        lo += 1 << h
        lo *= (idx >> h) & 1
        count += lo
        lo = hi
    return count


def _nested(prev: NDArray[np.intp], qk: NDArray[np.intp], qp: NDArray[np.intp]) -> NDArray[np.intp]:
    """For every query (k, p), #{j < k : prev[j] > p}: the repeats in the window (p, k)."""
    points = np.flatnonzero(prev >= qp.min())
    points = points[: np.searchsorted(points, qk.max(), side="right")]
    y = prev[points]
    if len(qk) * len(points) <= 1 << 16:
        return np.count_nonzero((points < qk[:, None]) & (y > qp[:, None]), axis=1)
    return _earlier_greater(y, len(prev))[np.searchsorted(points, qk)]


@frozen(eq=False)
class _Scan:
    """One level's hits for a batch, and what finishing its new state needs."""

    geometry: TlbGeometry
    hit: NDArray[np.bool_]  # per real access
    n_syn: int
    seq_tags: NDArray[np.int64]  # accesses grouped by set, synthetic ones first
    seq_set: NDArray[np.intp]
    pos: NDArray[np.intp]  # position in seq of every access, synthetic ones first
    syn_w: NDArray[np.bool_]
    by_tag: NDArray[np.intp]
    last: NDArray[np.bool_]  # the last access of its tag
    clock: int
    old: TlbLevelState  # the state before the batch
    rows: NDArray[np.intp]  # the sets the batch touches (the others are unchanged)


def _scan(g: TlbGeometry, state: TlbLevelState, tags: NDArray[np.int64]) -> _Scan:
    sets, ways = g.sets, g.ways
    if sets > 1:
        vpn = tags & _VPN_MASK
        real_set = vpn & (sets - 1) if sets & (sets - 1) == 0 else vpn % sets
        # only the sets the batch touches take part (the others keep their entries)
        touched = np.zeros(sets, dtype=bool)
        touched[real_set] = True
        rows = np.flatnonzero(touched)
    else:
        rows = np.zeros(1, dtype=np.intp)
    sub_tags, sub_stamp = state.tags[rows], state.stamp[rows]
    order = np.argsort(np.where(sub_tags >= 0, sub_stamp, _NEVER), axis=1, kind="stable")
    st = np.take_along_axis(sub_tags, order, axis=1)
    valid = st >= 0
    syn_row, _ = np.nonzero(valid)
    syn_set = rows[syn_row]
    syn_w = np.take_along_axis(state.writable[rows], order, axis=1)[valid]
    n_syn = len(syn_set)
    all_tags = np.concatenate([st[valid], tags])
    if sets == 1:
        seq_tags, all_set = all_tags, np.zeros(len(all_tags), dtype=np.intp)
        seq_set, pos = all_set, np.arange(len(all_tags))
    else:
        all_set = np.concatenate([syn_set, real_set.astype(np.intp)])
        key = all_set.astype(np.uint16) if sets <= 1 << 16 else all_set
        by_set = np.argsort(key, kind="stable")
        seq_tags, seq_set = all_tags[by_set], all_set[by_set]
        pos = np.empty(len(all_tags), dtype=np.intp)
        pos[by_set] = np.arange(len(all_tags))
    n = len(seq_tags)
    by_tag, same = _group_by_tag(seq_tags)
    prev = np.full(n, -1, dtype=np.intp)
    prev[by_tag[1:][same]] = by_tag[:-1][same]
    last = np.ones(n, dtype=bool)
    last[by_tag[:-1][same]] = False

    here = pos[n_syn:]
    p = prev[here]
    window = here - p - 1
    hit = (p >= 0) & (window < ways)
    query = np.flatnonzero((p >= 0) & ~hit)
    if len(query):
        # at most every repeated access in the window is a repeat within it: if even that
        # leaves `ways` distinct tags, the access misses without counting
        repeated = np.cumsum(prev >= 0)
        qk, qp = here[query], p[query]
        query = query[window[query] - (repeated[qk - 1] - repeated[qp]) < ways]
    if len(query) and ways <= 16:
        # the distinct tags among the last 2 * ways accesses of the window: all of them if
        # the window is that short, else enough for a miss if there are `ways` of them
        qk, qp = here[query], p[query]
        cut = np.maximum(qp, qk - 2 * ways - 1)[:, None]
        before = qk[:, None] - np.arange(1, 2 * ways + 1)
        first = (before > cut) & (prev[np.maximum(before, 0)] <= cut)
        distinct = np.count_nonzero(first, axis=1)
        short = cut[:, 0] == qp
        hit[query[short]] = distinct[short] < ways
        query = query[~short & (distinct < ways)]
    if len(query):
        hit[query] = window[query] - _nested(prev, here[query], p[query]) < ways
    return _Scan(g, hit, n_syn, seq_tags, seq_set, pos, syn_w, by_tag, last, state.clock, state, rows)


def _finish(s: _Scan, fill: NDArray[np.bool_]) -> tuple[NDArray[np.bool_], TlbLevelState]:
    """The writable bit serving each access (``fill`` for the misses) and the new state."""
    n = len(s.seq_tags)
    here = s.pos[s.n_syn :]
    fills = np.zeros(n, dtype=bool)  # synthetic accesses and misses fill their entry
    fills[s.pos[: s.n_syn]] = True
    fills[here] = ~s.hit
    value = np.zeros(n, dtype=bool)
    value[s.pos[: s.n_syn]] = s.syn_w
    value[here] = fill
    src = np.where(fills[s.by_tag], np.arange(n), 0)  # a tag's first access always fills
    np.maximum.accumulate(src, out=src)
    served = np.empty(n, dtype=bool)
    served[s.by_tag] = value[s.by_tag[src]]

    sets, ways = s.geometry.sets, s.geometry.ways
    # per access, the number of tags whose last access comes later in the same set
    lasts = np.cumsum(s.last)
    ends = np.cumsum(np.bincount(s.seq_set, minlength=sets)) - 1
    newer: NDArray[np.intp] = lasts[ends[s.seq_set]] - lasts
    keep = np.flatnonzero(s.last & (newer < ways))
    rows, cols = s.seq_set[keep], ways - 1 - newer[keep]
    state = s.old.copy()
    state.tags[s.rows] = -1
    state.writable[s.rows] = False
    state.stamp[s.rows] = 0
    state.tags[rows, cols] = s.seq_tags[keep]
    state.stamp[rows, cols] = s.clock + 1 + keep
    state.writable[rows, cols] = served[keep]
    state.clock = s.clock + n
    return served[here], state


@define(eq=False)
class Tlb:
    """The TLB of one CPU: an L1 and an L2 over the same ASID-tagged accesses."""

    l1: TlbGeometry
    l2: TlbGeometry
    state1: TlbLevelState = field()
    state2: TlbLevelState = field()

    @state1.default
    def _empty1(self) -> TlbLevelState:
        return TlbLevelState.empty(self.l1)

    @state2.default
    def _empty2(self) -> TlbLevelState:
        return TlbLevelState.empty(self.l2)

    def lookup(self, tags: ArrayLike, writable: ArrayLike) -> Lookup:
        """Look up a batch of accesses in order and update the state (commit)."""
        result, self.state1, self.state2 = self.peek(tags, writable)
        return result

    def peek(
        self, tags: ArrayLike, writable: ArrayLike
    ) -> tuple[Lookup, TlbLevelState, TlbLevelState]:
        """Look up a batch without committing: the result and the states after the batch.

        A caller interrupted part-way can instead ``lookup(tags[:k], writable[:k])``, whose
        results are the first k of the full batch's.  ``writable`` may be one bool for all.
        """
        t = np.ascontiguousarray(tags, dtype=np.int64).reshape(-1)
        w = np.broadcast_to(np.asarray(writable, dtype=bool), t.shape)
        if t.size and t.min() < 0:
            raise ValueError("tags must be non-negative (see make_tags)")
        # an access repeating the one before it hits the L1 entry just used, changing nothing
        head = np.ones(len(t), dtype=bool)
        np.not_equal(t[1:], t[:-1], out=head[1:])
        heads = np.flatnonzero(head)
        s1 = _scan(self.l1, self.state1, t[heads])
        miss = np.flatnonzero(~s1.hit)
        s2 = _scan(self.l2, self.state2, t[heads[miss]])
        served2, state2 = _finish(s2, w[heads[miss]])
        fill1 = np.zeros(len(heads), dtype=bool)
        fill1[miss] = served2
        served1, state1 = _finish(s1, fill1)
        level = np.zeros(len(t), dtype=np.int8)
        level[heads[miss]] = np.where(s2.hit, 1, 2)
        if len(heads) < len(t):
            served1 = served1[np.cumsum(head) - 1]
        return Lookup(level, served1), state1, state2

    def access_one(self, tag: int, writable: bool) -> tuple[int, bool]:
        """Look up and commit a single access (the same result as ``lookup`` of a batch of
        one, without the batch machinery): (level, writable bit that served it)."""
        found = self.probe(tag)
        level, cached = found
        served = writable if level == 2 else cached
        for lvl, state in ((0, self.state1), (1, self.state2)):
            if lvl == 1 and level == 0:
                break  # an L1 hit does not touch the L2
            g = self.l1 if lvl == 0 else self.l2
            row = (tag & _VPN_MASK) % g.sets
            state.clock += 1
            hit = np.flatnonzero(state.tags[row] == tag)
            if len(hit):
                state.stamp[row, hit[0]] = state.clock
                continue
            free = np.flatnonzero(state.tags[row] < 0)
            col = int(free[0]) if len(free) else int(np.argmin(state.stamp[row]))
            state.tags[row, col] = tag
            state.stamp[row, col] = state.clock
            state.writable[row, col] = served
        return level, served

    def probe(self, tag: int) -> tuple[int, bool]:
        """Where one tag would be found, without a lookup: (0: L1, 1: L2, 2: neither) and
        the cached writable bit (False when neither level holds it)."""
        for level, (g, state) in enumerate(((self.l1, self.state1), (self.l2, self.state2))):
            row = (tag & _VPN_MASK) % g.sets
            hit = np.flatnonzero(state.tags[row] == tag)
            if len(hit):
                return level, bool(state.writable[row, hit[0]])
        return 2, False

    def flush_asid(self, asid: int) -> int:
        """Drop every entry of ``asid`` from both levels; return how many were dropped."""
        return sum(s.drop((s.tags >> TAG_ASID_SHIFT) == asid) for s in (self.state1, self.state2) if s.clock)

    def flush_range(self, asid: int, start: int, end: int) -> int:
        """Drop the entries of ``asid`` that map any byte of [start, end); return how many."""
        if end <= start:
            return 0
        dropped = 0
        for state in (self.state1, self.state2):
            if not state.clock:  # never filled
                continue
            t = state.tags
            code = (t >> TAG_SIZE_SHIFT) & 0xF
            shift = _SHIFT_OF_CODE[code]
            vpn = t & _VPN_MASK
            mask = ((t >> TAG_ASID_SHIFT) == asid) & (code < len(PAGE_SHIFTS))
            mask &= (vpn >= start >> shift) & (vpn <= (end - 1) >> shift)
            dropped += state.drop(mask)
        return dropped

    def flush_all(self) -> int:
        """Drop every entry; return how many were dropped."""
        return sum(s.drop(s.tags >= 0) for s in (self.state1, self.state2) if s.clock)

    def __len__(self) -> int:
        return len(self.state1) + len(self.state2)
