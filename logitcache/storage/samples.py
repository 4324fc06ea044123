"""Sampled targets (issue 15 §3): per position, N draws from the teacher's distribution, stored
as the distinct ids drawn and how often each was drawn.

Random Sampling KD (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation
in LLMs", ACL 2025, arXiv 2503.16870): N tokens drawn with replacement from a proposal q give the
importance-sampled estimate ``p̂(x) = (1/N) * sum_j 1[x_j = x] * p(x) / q(x)`` of the teacher's p,
unbiased for every x, so a loss linear in the target (forward KL / CE) has unbiased gradients.
We use the proposal q = p (the teacher at temperature 1): the weights p/q are all 1 and
``p̂(x) = count(x) / N`` needs no stored probability at all, only ids and counts.

Columns, after the other optional ones (schema.sample_fields), present when the manifest's
``sample`` is N > 0; both codecs store them as they are:

* ``sample_ids`` list<list<int32>>: per position, the distinct ids drawn, ascending;
* ``sample_counts`` list<list<uint8>>: how many of the N draws each is (each >= 1, summing to N).

A position with U distinct ids costs 5 U bytes before compression (U <= N, and U is small where
the teacher is confident), against 4 N for the N draws themselves.

In memory (a row), both are [n - 1, S] with S the widest position of the row's batch: the
distinct ids first, then padding of id 0 and count 0, which contributes nothing to any sum.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from logitcache.storage.lists import nested_parts

SAMPLE_IDS = "sample_ids"
SAMPLE_COUNTS = "sample_counts"
SAMPLE_COLUMNS = (SAMPLE_IDS, SAMPLE_COUNTS)
# Counts are uint8: N up to 255 keeps them one byte each (the paper's runs use N of about 12-50).
MAX_SAMPLE = 255
# What the manifest records as the proposal (see the module docstring).
PROPOSAL = {"distribution": "teacher", "temperature": 1.0, "weights": "count / N"}


def sample_fields(sample: int) -> list[pa.Field]:
    """The sampled-target columns of a cache with ``sample`` draws per position (none for 0)."""
    if not sample:
        return []
    return [pa.field(SAMPLE_IDS, pa.list_(pa.list_(pa.int32())), nullable=False),
            pa.field(SAMPLE_COUNTS, pa.list_(pa.list_(pa.uint8())), nullable=False)]


def counts_from_draws(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[P, N] drawn ids -> (ids int32 [P, N], counts uint8 [P, N]): per position the distinct ids
    ascending with their counts, padded with id 0 / count 0."""
    draws = np.asarray(draws)
    P, N = draws.shape
    ids = np.zeros((P, N), np.int32)
    counts = np.zeros((P, N), np.uint8)
    if not draws.size:
        return ids, counts
    s = np.sort(draws, axis=1)
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = np.cumsum(new, axis=1) - 1  # the index of each draw's distinct id within its position
    rows = np.broadcast_to(np.arange(P)[:, None], s.shape)
    ids[rows, slot] = s
    np.add.at(counts, (rows, slot), 1)
    return ids, counts


def _nested(mats: Sequence[np.ndarray], keep: Sequence[np.ndarray], typ: pa.DataType) -> pa.ListArray:
    """list<list<typ>>: row i holds one inner list per position of ``mats[i]``, its ``keep`` entries."""
    n_pos = np.fromiter((len(m) for m in mats), dtype=np.int64, count=len(mats))
    outer = np.zeros(len(mats) + 1, np.int64)
    np.cumsum(n_pos, out=outer[1:])
    keep_all = np.concatenate([k.reshape(len(k), -1) for k in keep], axis=0) if mats and outer[-1] else np.zeros((0, 0), bool)
    vals_all = np.concatenate([m.reshape(len(m), -1) for m in mats], axis=0) if mats and outer[-1] else np.zeros((0, 0))
    inner = np.zeros(int(outer[-1]) + 1, np.int64)
    np.cumsum(keep_all.sum(axis=1), out=inner[1:])
    if inner[-1] > np.iinfo(np.int32).max:
        raise ValueError("too many sampled ids in one table; write fewer rows at a time")
    values = pa.array(vals_all[keep_all].astype(typ.to_pandas_dtype(), copy=False), type=typ)
    positions = pa.ListArray.from_arrays(pa.array(inner.astype(np.int32)), values)
    return pa.ListArray.from_arrays(pa.array(outer.astype(np.int32)), positions)


def sample_arrays(rows: Sequence[dict[str, Any]]) -> dict[str, pa.Array]:
    """The two sampled-target columns of ``rows`` (each holding [n - 1, S] ids and counts)."""
    ids = [np.asarray(r[SAMPLE_IDS]).reshape(len(r[SAMPLE_IDS]), -1) for r in rows]
    counts = [np.asarray(r[SAMPLE_COUNTS]).reshape(len(r[SAMPLE_COUNTS]), -1) for r in rows]
    keep = [c > 0 for c in counts]
    return {SAMPLE_IDS: _nested(ids, keep, pa.int32()), SAMPLE_COUNTS: _nested(counts, keep, pa.uint8())}


def decode_sample_columns(ids_col: pa.Array, counts_col: pa.Array) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The two columns of a batch -> per row [n - 1, S] ids (int32) and counts (uint8), padded."""
    ids, inner, outer = nested_parts(ids_col)
    counts, inner_c, _ = nested_parts(counts_col)
    if len(ids) != len(counts) or not np.array_equal(inner, inner_c):
        raise ValueError("sample_ids and sample_counts disagree in their lengths")
    width = np.diff(inner)
    S = int(width.max()) if len(width) else 0
    P = len(width)
    id_mat = np.zeros((P, S), np.int32)
    count_mat = np.zeros((P, S), np.uint8)
    if len(ids):
        pos = np.repeat(np.arange(P), width)
        slot = np.arange(len(ids)) - inner[pos]
        id_mat[pos, slot] = ids
        count_mat[pos, slot] = counts
    return ([id_mat[outer[i] : outer[i + 1]] for i in range(len(outer) - 1)],
            [count_mat[outer[i] : outer[i + 1]] for i in range(len(outer) - 1)])


def sample_problems(batch: pa.RecordBatch | pa.Table, n_draws: int, max_id: int = 0) -> tuple[list[str], np.ndarray]:
    """What is wrong with a batch's sampled targets (one message per kind, naming the first id), and
    the per-row position counts (to compare with the other per-position columns).
    ``n_draws``: the manifest's N (0: the sums are not checked); ``max_id``: ids must stay below it."""
    names = batch.schema.names
    rid = batch.column(names.index("id"))
    out: list[str] = []
    ids, inner, outer = nested_parts(batch.column(names.index(SAMPLE_IDS)))
    counts, inner_c, outer_c = nested_parts(batch.column(names.index(SAMPLE_COUNTS)))
    n_pos = np.diff(outer)
    if len(ids) != len(counts) or not np.array_equal(inner, inner_c) or not np.array_equal(outer, outer_c):
        return ["sample_ids and sample_counts differ in their lengths"], n_pos
    pos_of = np.repeat(np.arange(len(inner) - 1), np.diff(inner))
    row_of_pos = np.repeat(np.arange(len(n_pos)), n_pos)

    def report(bad_pos: np.ndarray, what: str) -> None:
        if bad_pos.any():
            first = int(row_of_pos[int(np.flatnonzero(bad_pos)[0])])
            out.append(f"{int(bad_pos.sum())} positions {what} (first: id {rid[first].as_py()!r})")

    def per_pos(bad_entries: np.ndarray) -> np.ndarray:
        bad = np.zeros(len(inner) - 1, bool)
        bad[pos_of[bad_entries]] = True
        return bad

    ids64 = ids.astype(np.int64)
    report(per_pos((ids64 < 0) | ((ids64 >= max_id) if max_id else False)),
           "with a sampled id outside the vocabulary" + (f" (at or above {max_id})" if max_id else ""))
    report(per_pos(counts == 0), "with a sampled id drawn 0 times")
    same = np.zeros(len(ids), bool)
    same[1:] = ids64[1:] <= ids64[:-1]
    same[inner[:-1][np.diff(inner) > 0]] = False  # the first id of each position has no predecessor
    report(per_pos(same), "whose sampled ids are not distinct and ascending")
    if n_draws:
        sums = np.add.reduceat(counts.astype(np.int64), inner[:-1]) if len(counts) else np.zeros(len(inner) - 1, np.int64)
        sums = np.where(np.diff(inner) > 0, sums, 0)  # reduceat gives an empty position the next value
        report(sums != n_draws, f"whose sample counts do not sum to the manifest's sample={n_draws}")
    return out, n_pos
