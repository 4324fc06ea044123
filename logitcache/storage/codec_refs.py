"""Compact codec version 2: top-k ids coded against an earlier position of the same example.

Where the input token at position t appeared before in the same example (position t' < t,
the latest such), the teacher's top-k at t is mostly the top-k at t' in a similar order
(on the quality benchmark's teacher, 88% of the top-64 ids at such positions are found in
it). So each id at t is stored as a *reference symbol*: ``zigzag(j - i)`` where ``i`` is
its place at t and ``j`` its place in the top-k at t' (small numbers: the order is
similar), or ``ESCAPE = 2k - 1`` when the id is not in that top-k. The ids that are not
found (every id of a position without an earlier same token, and the escaped ones) are
stored as before, as their rank in the shard's id table.

Per row (one example), the ``topk_ranks_*`` planes of a version 2 table hold, in this order:

* a flag: 1 if the row uses references, 0 if not (when fewer than ``MIN_FOUND`` of the ids
  would be found, as with a teacher whose top-k does not recur: then the row is version 1's);
* the reference symbols of the positions that have an earlier same token, k each, in
  position order;
* the id-table ranks of the ids not found, in position order, then slot order.

References stay inside one row, so any slice of rows decodes on its own, as in version 1.
Decoding resolves references level by level (a position's reference is decoded one level
before it), vectorised over the whole batch; the levels are as many as the most frequent
token's occurrences in one row.
"""

from __future__ import annotations

import numpy as np


# A row stores references when at least this fraction of its referenced ids are found (a
# reference symbol is cheap, but an escape costs a symbol on top of the id's rank).
MIN_FOUND = 0.5


def escape(k: int) -> int:
    """The reference symbol of an id that the referenced top-k does not hold."""
    return 2 * k - 1


def previous_same_token(tokens: np.ndarray, row_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: the latest earlier position of the same row with the same input token
    (-1: none), and how many such positions come before it (its level)."""
    m = len(tokens)
    key = (row_of.astype(np.int64) << 32) | tokens.astype(np.int64)
    order = np.argsort(key, kind="stable")  # stable: equal keys stay in position order
    ks = key[order]
    same = ks[1:] == ks[:-1]
    prev = np.full(m, -1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    # Level: index within the run of equal keys.
    starts = np.ones(m, dtype=bool)
    starts[1:] = ~same
    run_start = np.maximum.accumulate(np.where(starts, np.arange(m), 0)) if m else np.zeros(0, np.int64)
    level = np.empty(m, dtype=np.int64)
    level[order] = np.arange(m) - run_start
    return prev, level


def _zigzag(d: np.ndarray) -> np.ndarray:
    return np.where(d >= 0, 2 * d, -2 * d - 1)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return (z >> 1) ^ -(z & 1)


def reference_symbols(ids: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """[positions with a reference, k] symbols for ``ids`` [m, k] (distinct per position)."""
    has = np.flatnonzero(prev >= 0)
    m_ref, k = len(has), ids.shape[1]
    if not m_ref:
        return np.zeros((0, k), dtype=np.int64)
    base = np.arange(m_ref, dtype=np.int64)[:, None] << 32
    ref_keys = (base | ids[prev[has]].astype(np.int64)).reshape(-1)
    order = np.argsort(ref_keys, kind="stable")
    sorted_keys = ref_keys[order]
    want = (base | ids[has].astype(np.int64)).reshape(-1)
    at = np.minimum(np.searchsorted(sorted_keys, want), len(sorted_keys) - 1)
    found = sorted_keys[at] == want
    j = (order[at] % k).reshape(m_ref, k)
    sym = _zigzag(j - np.arange(k)[None, :])
    return np.where(found.reshape(m_ref, k), sym, escape(k))


def encode_id_values(ids: np.ndarray, ranks: np.ndarray, prev: np.ndarray, row_of: np.ndarray,
                     n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(every row's values concatenated, values per row) for the ``topk_ranks`` planes."""
    k = ids.shape[1]
    has = prev >= 0
    sym = reference_symbols(ids, prev)
    # A row uses references only where they pay: when most referenced ids are found.
    refs = np.bincount(row_of[has], minlength=n_rows) * k
    found = np.bincount(row_of[has], weights=(sym != escape(k)).sum(axis=1), minlength=n_rows)
    use = (refs > 0) & (found >= MIN_FOUND * refs)
    kept = use[row_of[has]]
    has[has] = kept
    sym = sym[kept]
    miss = np.ones(ids.shape, dtype=bool)
    miss[has] = sym == escape(k)
    ref_rows = np.repeat(row_of[has], k)
    miss_rows = np.broadcast_to(row_of[:, None], ids.shape)[miss]
    # Per row: its flag, its references, then its misses; a stable sort keeps each part's order.
    part = np.concatenate([3 * np.arange(n_rows), 3 * ref_rows + 1, 3 * miss_rows + 2])
    values = np.concatenate([use.astype(np.int64), sym.reshape(-1), ranks[miss]])[np.argsort(part, kind="stable")]
    counts = 1 + np.bincount(ref_rows, minlength=n_rows) + np.bincount(miss_rows, minlength=n_rows)
    return values, counts


def decode_id_values(values: np.ndarray, counts: np.ndarray, prev: np.ndarray, level: np.ndarray,
                     row_of: np.ndarray, table_ids: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`encode_id_values`: the [m, k] top-k ids. Raises ValueError on values
    that cannot come from the encoder (a damaged shard)."""
    m, n_rows = len(prev), len(counts)
    if (counts < 1).any():
        raise ValueError("corrupt top-k id column: a row without its reference flag")
    first = np.cumsum(counts) - counts
    flags = values[first]
    if flags.size and flags.max() > 1:
        raise ValueError("corrupt top-k id column: a reference flag other than 0 or 1")
    keep = np.ones(len(values), dtype=bool)
    keep[first] = False
    values, counts = values[keep], counts - 1
    prev = np.where(flags[row_of] == 1, prev, -1)
    t = np.flatnonzero(prev >= 0)  # positions with a reference
    n_ref = np.bincount(row_of[t], minlength=n_rows) * k  # reference symbols per row
    if (counts < n_ref).any():
        raise ValueError("corrupt top-k id column: fewer values than the rows' references")
    # Per row: n_ref reference symbols, then its misses.
    is_ref = np.repeat(np.tile(np.array([True, False]), n_rows), np.stack([n_ref, counts - n_ref], axis=1).reshape(-1))
    sym = values[is_ref].reshape(-1, k)
    ranks = values[~is_ref]
    esc = escape(k)
    if sym.size and sym.max() > esc:
        raise ValueError("corrupt top-k id column: a reference symbol out of range")
    hit = sym != esc
    hits_per_row = np.bincount(row_of[t], weights=hit.sum(axis=1), minlength=n_rows).astype(np.int64)
    if not np.array_equal(np.bincount(row_of, minlength=n_rows) * k - hits_per_row, counts - n_ref):
        raise ValueError("corrupt top-k id column: the escapes do not match the stored ids")
    if len(ranks) and ranks.max() >= len(table_ids):
        raise ValueError("corrupt top-k id column: an id rank beyond the id table")
    miss = np.ones((m, k), dtype=bool)
    miss[t] = ~hit
    ids = np.empty((m, k), dtype=np.int32)
    ids[miss] = table_ids[ranks]
    if not len(t):
        return ids
    # References: entry (t, i) copies entry (prev[t], i + d); an escaped entry copies itself
    # (already filled): d by table lookup, 0 for the escape.
    idx = np.int32 if m * k < 1 << 31 else np.int64
    shift = _unzigzag(np.arange(esc + 1, dtype=idx))
    shift[esc] = 0
    j = np.arange(k, dtype=idx)[None, :] + shift[sym]
    if j.min() < 0 or j.max() >= k:
        raise ValueError("corrupt top-k id column: a reference outside the top-k")
    src = np.where(hit, prev[t].astype(idx)[:, None] * k, t.astype(idx)[:, None] * k)
    src += j
    # A position's reference is one level below it: resolving the levels in order finds every
    # reference decoded. by_level holds indices into t (and src), grouped by level.
    lev = level[t]
    by_level = np.argsort(lev, kind="stable")  # positions, not entries: m log m
    ends = (np.flatnonzero(np.diff(lev[by_level])) + 1).tolist() + [len(t)]
    flat = ids.reshape(-1)
    a = 0
    for b in ends:
        rows = by_level[a:b]
        ids[t[rows]] = flat[src[rows]]
        a = b
    return ids
