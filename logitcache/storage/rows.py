"""Rows <-> Arrow: one example as a dict of numpy arrays, a batch of them as a Table.

A row is::

    id: str, text: str, prompt_chars: int, truncated: bool,
    target_spans:                           int32 [m, 2] (storage/spans.py; v1 rows read as one span)
    input_ids, char_start, char_end:        int32 [n]
    topk_ids:                               int32 [n - 1, k]
    topk_logprobs:                          float16 [n - 1, k]
    label_logprob, logsumexp:               float32 [n - 1]

and, when the cache has them (schema.py): ``lse_tau`` float32 [n - 1, M],
``logit_mean``, ``logit_std``, ``lse_std`` float32 [n - 1]; ``sample_ids`` int32 and
``sample_counts`` uint8 [n - 1, S] (storage/samples.py). A k = 0 cache's rows hold [n - 1, 0]
top-k arrays.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from logitcache.storage.lists import flat_list_column
from logitcache.storage.samples import SAMPLE_COLUMNS, SAMPLE_COUNTS, SAMPLE_IDS, decode_sample_columns, sample_arrays
from logitcache.storage.schema import FLAT_EXTRA_COLUMNS, STATS_COLUMNS, TAU_COLUMN, WORD_START_COLUMN, shard_schema
from logitcache.storage.spans import SPAN_COLUMNS, decode_spans, prompt_chars_column, row_spans, single_span, spans_arrays

Row = dict[str, Any]

_FLAT_DTYPES = {
    "input_ids": np.int32,
    "char_start": np.int32,
    "char_end": np.int32,
    "label_logprob": np.float32,
    "logsumexp": np.float32,
}
_MATRIX_DTYPES = {"topk_ids": np.int32, "topk_logprobs": np.float16}
_EXTRA_FLAT = dict.fromkeys(FLAT_EXTRA_COLUMNS, np.float32)


def row_nbytes(row: Row) -> int:
    """Approximate in-memory size, used to cut row groups and shards."""
    n = len(row["input_ids"])
    k = row["topk_ids"].shape[1] if n > 1 else 0
    m = row[TAU_COLUMN].shape[1] if TAU_COLUMN in row and n > 1 else 0
    extra = 4 * (m + sum(name in row for name in FLAT_EXTRA_COLUMNS))
    if SAMPLE_COUNTS in row and n > 1:
        extra += 5 * int(np.count_nonzero(row[SAMPLE_COUNTS])) // (n - 1)
    return len(row["text"]) + 12 * n + (6 * k + 8 + extra) * max(n - 1, 0) + 64


def _list_array(chunks: Sequence[np.ndarray], values: pa.Array) -> pa.ListArray:
    """A list column whose i-th entry holds the values of ``chunks[i]`` (``values`` already flat)."""
    offsets = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


# float16's lowest finite value: a log-prob below it (a probability under e^-65504, 0 in any
# float) is stored as it rather than as -inf, so a finite teacher never writes a non-finite value.
FP16_LOWEST = float(np.finfo(np.float16).min)


def stored_float16(values) -> np.ndarray:  # noqa: ANN001
    """What a v1 shard stores for log-probs ``values``: float16, clipped at FP16_LOWEST."""
    return _as(values, np.float16)


def _as(values, dtype: type) -> np.ndarray:
    a = np.asarray(values)
    if dtype is np.float16 and a.dtype != np.float16:
        a = np.maximum(a, FP16_LOWEST)  # NaN stays NaN: value checks must still see it
    return a.astype(dtype, copy=False)


def _flat(chunks: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate([c.reshape(-1) for c in chunks]).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)


# Parquet options of a v1 shard. No dictionary encoding: the top-k matrices have far too
# many distinct values for one to pay (pyarrow tries, then falls back per page), and
# decoding through it made v1 reads 2x slower for a 1% larger file (benchmarks/storage.py).
# The layout is unchanged: any Parquet reader reads PLAIN pages.
V1_PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "use_dictionary": False}


def rows_to_table(rows: Sequence[Row], k: int, n_temperatures: int = 0, logit_stats: bool = False,
                  word_start: bool = False, spans: bool = True, sample: int = 0) -> pa.Table:
    """Rows -> a table in the v1 codec (format v2; ``spans=False``: v1); the optional columns as the
    cache's manifest says (each row must hold them)."""
    schema = shard_schema(k, n_temperatures, logit_stats, word_start, spans, sample)
    columns: dict[str, pa.Array] = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
        "prompt_chars": base_columns_prompt(rows, spans),
        "truncated": pa.array([bool(r["truncated"]) for r in rows], pa.bool_()),
    }
    if spans:
        columns.update(spans_arrays(rows))
    for name, dtype in _FLAT_DTYPES.items():
        chunks = [np.asarray(r[name]) for r in rows]
        columns[name] = _list_array(chunks, pa.array(_flat(chunks, dtype), type=schema.field(name).type.value_type))
    for name, dtype in _MATRIX_DTYPES.items() if k else ():
        inner = schema.field(name).type.value_type  # fixed_size_list<k>
        mats = [_as(r[name], dtype).reshape(-1, k) for r in rows]
        values = pa.FixedSizeListArray.from_arrays(pa.array(_flat(mats, dtype), type=inner.value_type), k)
        columns[name] = _list_array(mats, values)
    columns.update(extra_arrays(rows, n_temperatures, logit_stats, word_start, sample))
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def base_columns_prompt(rows: Sequence[Row], spans: bool) -> pa.Array:
    """``prompt_chars``; a format v1 shard cannot hold spans that its one number does not say."""
    if not spans:
        for r in rows:
            if "target_spans" in r and not single_span(row_spans(r), len(r["text"])):
                raise ValueError(
                    f"example {r['id']!r} has several target spans, which a format v1 cache cannot hold; "
                    "write it to a new cache (format v2)."
                )
    return prompt_chars_column(rows)


def extra_arrays(rows: Sequence[Row], n_temperatures: int, logit_stats: bool, word_start: bool = False,
                 sample: int = 0) -> dict[str, pa.Array]:
    """The optional per-position columns (schema.extra_fields, samples.sample_fields) of ``rows``, for either codec."""
    columns: dict[str, pa.Array] = {}
    if sample:
        columns.update(sample_arrays(rows))
    if n_temperatures:
        m = n_temperatures
        mats = [np.asarray(r[TAU_COLUMN], dtype=np.float32).reshape(-1, m) for r in rows]
        values = pa.FixedSizeListArray.from_arrays(pa.array(_flat(mats, np.float32), type=pa.float32()), m)
        columns[TAU_COLUMN] = _list_array(mats, values)
    for name in (STATS_COLUMNS if logit_stats else ()) + ((WORD_START_COLUMN,) if word_start else ()):
        chunks = [np.asarray(r[name]) for r in rows]
        columns[name] = _list_array(chunks, pa.array(_flat(chunks, np.float32), type=pa.float32()))
    return columns


def _split(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def add_k0_topk(out: dict[str, list[Any]], names: Sequence[str]) -> None:
    """A k = 0 shard has no top-k columns: its rows get [n - 1, 0] ones, so that every reader
    sees the one row layout (when the positions were read, through ``label_logprob``)."""
    if "topk_ids" in names or "label_logprob" not in out:
        return
    out["topk_ids"] = [np.zeros((len(x), 0), np.int32) for x in out["label_logprob"]]
    out["topk_logprobs"] = [np.zeros((len(x), 0), np.float16) for x in out["label_logprob"]]


def batch_to_rows(batch: pa.RecordBatch) -> Iterator[Row]:
    """Decode a record batch of a shard into row dicts (numpy views, no per-value Python)."""
    names = batch.schema.names
    out: dict[str, list[Any]] = {}
    n_rows = batch.num_rows
    for name in names:
        col = batch.column(names.index(name))
        if name in SPAN_COLUMNS or name in SAMPLE_COLUMNS:
            continue  # read as target_spans and sample_ids/counts, below
        if name in _FLAT_DTYPES or name in _MATRIX_DTYPES or name in _EXTRA_FLAT or name == TAU_COLUMN:
            out[name] = _split(*flat_list_column(col))
        else:
            out[name] = col.to_pylist()
    spans = decode_spans(batch, out.get("text"))
    if spans is not None:
        out["target_spans"] = spans
    add_k0_topk(out, names)
    if SAMPLE_IDS in names and SAMPLE_COUNTS in names:
        out[SAMPLE_IDS], out[SAMPLE_COUNTS] = decode_sample_columns(
            batch.column(names.index(SAMPLE_IDS)), batch.column(names.index(SAMPLE_COUNTS)))
    keys = list(out)
    for i in range(n_rows):
        yield {name: out[name][i] for name in keys}
