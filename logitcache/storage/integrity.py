"""The values a shard must hold to be trained on: one set of checks for `verify` and the training reader.

A damaged or hostile cache (or a teacher that overflowed in float16) can hold NaN, inf or
positive log-probabilities, or a top-k that is not sorted. ``verify`` reports them; the
training reader refuses the row group (or, with ``--skip-bad-shards``, passes over it), so
what one accepts the other accepts. These checks are vectorised over a whole record batch
and read the stored columns without decoding rows, in either codec: the compact codec stores
the top-1 log-prob and non-negative steps below it, so its rows are sorted by construction
and only the top-1 needs checking (benchmarks/stage2.py measures the cost beside decoding).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from logitcache.storage.codec import CODEC_NAME, META_CODEC
from logitcache.storage.rows import flat_list_column
from logitcache.storage.schema import STATS_COLUMNS, TAU_COLUMN

# A log-probability may exceed 0 by rounding only: log(sum(exp)) >= the top-1 holds exactly,
# but top1 - (top1 + lse') can come out a few ulps above 0 in float32.
LOGPROB_TOL = 1e-5


def is_compact(schema: pa.Schema) -> bool:
    return (schema.metadata or {}).get(META_CODEC) == CODEC_NAME.encode()


def _has_nulls(column: pa.Array | pa.ChunkedArray) -> bool:
    """Nulls at any depth (a list of fixed-size lists of floats has three levels)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for arr in chunks:
        while True:
            if arr.null_count:
                return True
            if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
                    or pa.types.is_fixed_size_list(arr.type)):
                break
            arr = arr.values
    return False


def value_problems(batch: pa.RecordBatch | pa.Table, compact: bool | None = None) -> list[str]:
    """One message per kind of bad value in ``batch`` (a shard's rows, either codec); empty if none.

    Checked: no null anywhere, not even inside a list column (Arrow allows them; decoded, a
    null id becomes -2**31). Per position: the top-k log-probabilities are finite, at most 0
    and sorted descending; the label log-prob is finite and at most 0; the log-normaliser and
    the optional columns (``lse_tau``, logit stats) are finite. Each message counts the
    positions and names the first example id. ``compact``: the codec the manifest names (None:
    the batch's own metadata says).
    """
    names = batch.schema.names
    out: list[str] = []
    if batch.num_rows == 0:
        return out
    nulls = [name for name in names if _has_nulls(batch.column(names.index(name)))]
    if nulls:
        return [f"null values in column(s) {', '.join(nulls)}, which the format never writes"]
    row_offsets: np.ndarray | None = None

    def report(bad_positions: np.ndarray, what: str, offsets: np.ndarray) -> None:
        if bad_positions.any():
            first = int(np.flatnonzero(bad_positions)[0])
            row = int(np.searchsorted(offsets, first, side="right")) - 1
            rid = batch.column(names.index("id"))[row].as_py()
            out.append(f"{int(bad_positions.sum())} positions {what} (first: id {rid!r})")

    def column(name: str) -> tuple[np.ndarray, np.ndarray]:
        return flat_list_column(batch.column(names.index(name)).combine_chunks()
                                if isinstance(batch, pa.Table) else batch.column(names.index(name)))

    if is_compact(batch.schema) if compact is None else compact:
        top1, row_offsets = column("top1_logprob")
        report(~np.isfinite(top1), "with NaN/inf top-k log-probabilities", row_offsets)
        report(top1 > LOGPROB_TOL, "with a top-k log-probability above 0", row_offsets)
    else:
        lp, row_offsets = column("topk_logprobs")  # [M, k], float16 in v1
        if lp.size:
            report(~np.isfinite(lp).all(axis=1), "with NaN/inf top-k log-probabilities", row_offsets)
            report((lp > LOGPROB_TOL).any(axis=1), "with a top-k log-probability above 0", row_offsets)
            report((lp[:, 1:] > lp[:, :-1]).any(axis=1), "whose top-k is not sorted descending", row_offsets)
    label, offsets = column("label_logprob")
    report(~np.isfinite(label) | (label > LOGPROB_TOL), "with a label log-prob that is not finite or above 0", offsets)
    lse, offsets = column("logsumexp")
    report(~np.isfinite(lse), "with a non-finite logsumexp", offsets)
    for name in (TAU_COLUMN, *STATS_COLUMNS):
        if name in names:
            values, offsets = column(name)
            bad = ~np.isfinite(values)
            report(bad.any(axis=1) if bad.ndim == 2 else bad, f"with a non-finite {name}", offsets)
    return out
