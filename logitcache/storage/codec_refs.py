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
    out = z & 1
    np.negative(out, out=out)
    out ^= z >> 1
    return out


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
    that cannot come from the encoder (a damaged shard).

    This is the reader's hot loop (about as many values as the top-k holds), so it avoids
    whole-array boolean masks and temporaries: a row's parts are sliced out of ``values`` by a
    loop over rows (a few hundred per batch), and the escapes (about a tenth of the
    references) are filled on their own, before the references resolve.
    """
    m, n_rows = len(prev), len(counts)
    if (counts < 1).any():
        raise ValueError("corrupt top-k id column: a row without its reference flag")
    first = np.cumsum(counts) - counts
    flags = values[first]
    if flags.size and flags.max() > 1:
        raise ValueError("corrupt top-k id column: a reference flag other than 0 or 1")
    has = (prev >= 0) & (flags[row_of] == 1)
    t = np.flatnonzero(has)  # positions with a reference, in position order (so also row order)
    n_ref = np.bincount(row_of[t], minlength=n_rows) * k  # reference symbols per row
    if (counts - 1 < n_ref).any():
        raise ValueError("corrupt top-k id column: fewer values than the rows' references")
    # Per row: its flag, n_ref reference symbols, then the ranks of its misses.
    bounds = np.stack([first + 1, first + 1 + n_ref, first + counts], axis=1).tolist()
    sym = np.concatenate([values[a:b] for a, b, _ in bounds] or [values[:0]]).reshape(-1, k)
    ranks = np.concatenate([values[b:c] for _, b, c in bounds] or [values[:0]])
    esc = escape(k)
    if len(ranks) and ranks.max() >= len(table_ids):
        raise ValueError("corrupt top-k id column: an id rank beyond the id table")
    escaped = np.flatnonzero(sym.reshape(-1) == esc)  # entries of sym (row-major over t, k)
    e_pos = t[escaped // k]
    # Misses per position: all k without a reference, else its escapes; their ranks are stored
    # in position order, then slot order.
    n_miss = np.where(has, 0, k) + np.bincount(e_pos, minlength=m)
    if not np.array_equal(np.bincount(row_of, weights=n_miss, minlength=n_rows).astype(np.int64), counts - 1 - n_ref):
        raise ValueError("corrupt top-k id column: the escapes do not match the stored ids")
    rank_at = np.cumsum(n_miss) - n_miss  # where each position's misses start in ``ranks``
    # Decode into ``out``: the positions in level order (level 0: those without a reference,
    # in position order), so each level is one contiguous slice written by one gather.
    lev = np.where(has, level, 0)
    # A stable sort of 16-bit ints is a radix sort: linear in m.
    order = np.argsort(lev.astype(np.int16) if len(lev) and lev.max() < 1 << 15 else lev, kind="stable")
    slot = np.empty(m, dtype=np.int64)
    slot[order] = np.arange(m)
    n0 = m - len(t)
    out = np.empty((m, k), dtype=np.int32)
    flat = out.reshape(-1)
    # An escape's place among its position's escapes: escapes are in order, so it is its index
    # minus the index of its position's first escape.
    new_pos = np.ones(len(escaped), dtype=bool)
    new_pos[1:] = e_pos[1:] != e_pos[:-1]
    at = np.arange(len(escaped))
    e_rank = rank_at[e_pos] + at - np.maximum.accumulate(np.where(new_pos, at, 0))
    # The positions without a reference own every rank but the escapes', in position order.
    np.take(table_ids, np.delete(ranks, e_rank), out=flat[: n0 * k])
    if not len(t):
        return out[slot]
    idx = np.int32 if m * k < 1 << 31 else np.int64
    e_flat = (slot[e_pos] * k + escaped % k).astype(idx)  # the escaped entries in out
    flat[e_flat] = np.take(table_ids, np.take(ranks, e_rank))
    # References: entry (t, i) copies entry (prev[t], i + d), d the unzigzagged symbol; an escaped
    # entry copies itself (already filled).
    src = _unzigzag(sym.astype(idx, copy=False))
    src.reshape(-1)[escaped] = 0  # for the range check; set below
    src += np.arange(k, dtype=idx)
    # One pass for both bounds: a negative place is a huge unsigned one. Symbols above the
    # escape land here too (their shift is at least k).
    if src.size and src.view(np.uint32 if idx is np.int32 else np.uint64).max() >= k:
        raise ValueError("corrupt top-k id column: a reference symbol out of range (outside the top-k)")
    src += (slot[prev[t]] * k).astype(idx)[:, None]
    src.reshape(-1)[escaped] = e_flat
    # Level L refers to level L - 1 only: resolving the levels in order finds every reference
    # decoded. t is in position order; its rows of src, in level order, follow the n0 rows.
    in_t = np.empty(m, dtype=np.int64)
    in_t[t] = np.arange(len(t))
    src = src[in_t[order[n0:]]]
    ends = (np.flatnonzero(np.diff(lev[order[n0:]])) + 1).tolist() + [len(t)]
    a = 0
    for b in ends:
        np.take(flat, src[a:b].reshape(-1), out=flat[(n0 + a) * k : (n0 + b) * k])
        a = b
    return out[slot]
