"""The compact codec: top-k logprobs quantised, top-k ids by reference or by frequency rank.

What one compact table holds, per row (one example), compared with v1 (DESIGN.md §2):

* ``id``, ``text``, ``prompt_chars``, ``truncated``, (format v2: ``target_start``,
  ``target_end``), ``input_ids``, ``char_start``,
  ``char_end``, ``label_logprob``, ``logsumexp``: the same values and types as v1, exact
  (only their Parquet encodings differ, see :data:`PARQUET_COLUMN_ENCODING`).
* ``top1_logprob``: list<float32>, one per position: the largest logprob ``lp_0``, exact
  (v1 rows hold float16, which float32 represents exactly).
* ``topk_steps_lo`` / ``topk_steps_hi`` (binary, one value per row): with
  ``d_i = lp_0 - lp_i >= 0`` (non-decreasing in ``i`` because entries are sorted) and
  ``n_i = round(d_i / q)`` (so ``n_0 = 0`` and ``n`` is non-decreasing, since rounding is
  monotone), the steps ``n_i - n_{i-1}`` for ``i = 1..k-1`` of every position: small
  non-negative integers. Each row uses the narrowest width ``w`` bytes that holds its
  largest step; ``_lo`` holds the low byte of every step, ``_hi`` the ``w - 1`` higher
  byte planes one after the other (empty when ``w = 1``), so ``w`` follows from the
  lengths. Splitting bytes into planes lets zstd's entropy stage see homogeneous bytes.
* ``topk_ranks_lo`` / ``topk_ranks_hi`` (binary, the same plane layout): the top-k ids.
  An id's *rank* is its index in the *id table*, which lists ids by decreasing frequency
  among the top-k ids of the rows encoded (ties by id), so frequent ids become small
  numbers. Version 1 (tables without ``logitcache.codec_version``) stores the rank of
  every id, ``k`` per position. Version 2 (the default) first stores, for the positions
  whose input token occurred earlier in the row, a small reference symbol per id into the
  top-k at that earlier position, then the ranks of the ids not found there, after a flag
  per row (a row whose top-k does not recur stores no references, ``codec_refs.py``). On the quality benchmark's teacher at k=64 this takes the ids from
  63 to 55 bytes/token, and the whole cache, with version 2's coarser ``q``, from 106 to 96
  (benchmarks/codec_real.py).

The schema is fixed (no per-table integer types, the same columns in both versions), so a
writer can stream row groups of any content into one Parquet file, and a cache's shards
may mix versions (``logitcache merge`` of parts written before and after version 2).

The schema's key-value metadata holds the codec name, ``k``, ``q``, the version (from 2 on)
and the id table (int32 deltas, zlib, base64). ``encode_compact(rows, k, id_table=prev)`` keeps ``prev`` as a
prefix and appends the ids it has not seen (most frequent first), so a writer that
streams row groups into one shard can pass each table's id table to the next and store
the last one (a superset valid for every row group) in the file footer.

Error bound (per stored logprob, against the float16/float32 values given to the encoder):
decoding computes ``lp̂_i = lp_0 - q * n_i`` (``q * n_i`` exact in float32, as ``q`` is a small
odd number times a power of two) and rounds once to float32, so

    |lp_i - lp̂_i| <= q / 2 + ulp_f32(|lp̂_i|) / 2   (the top-1 itself is exact)

With the default ``q = 5 * 2**-8`` (version 1 tables were written at ``q = 2**-6``, and
decode with the ``q`` their metadata records): ``q/2 = 0.009765625`` nats, and the float32
term is at most ``2**-17`` (7.6e-6) for ``|lp| < 256`` (the logprobs that matter, p >= 1e-4,
have ``|lp| < 9.3``, where it is at most ``2**-20``). So every stored logprob above -256 is
within ``ERROR_BOUND_NATS = q/2 + 2**-17 < 0.00978 < ln(1.01) = 0.00995`` nats (below -256,
i.e. p < 1e-111, the float32 term is ``|lp| * 2**-24``: still < 0.01 down to lp = -3700).

For probabilities, ``p̂ = p * exp(lp̂ - lp)`` so ``|p - p̂| <= p * (exp(e) - 1)`` with
``e = ERROR_BOUND_NATS``: a relative error of at most 0.983 %, for every probability, not
only those >= 1e-4 (the absolute error is at most ``p * 0.00983``: <= 9.9e-7 at p = 1e-4).
See :func:`prob_error_bound`. Relative to the teacher's float32 logprobs, add the float16
rounding v1 already makes (``<= |lp| * 2**-11``) when the rows came from a v1 cache
(``logitcache convert``); the teacher stage encodes its float32 values directly.

Decoded rows have the v1 layout with ``topk_logprobs`` as float32 and ``topk_ids`` int32.
Pure numpy/pyarrow.

At k = 0 (sampled targets only) the table has no top-k columns (``top1_logprob`` and the four
planes). The sampled targets (storage/samples.py) are stored as they are, as in v1: the
distinct ids of a position are few and already one int32 each, and their counts one byte.
"""

from __future__ import annotations

import base64
import math
import zlib
from fractions import Fraction
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from logitcache.storage import codec_refs
from logitcache.storage.lists import flat_list_column
from logitcache.storage.rows import Row, base_columns_prompt, extra_arrays
from logitcache.storage.samples import SAMPLE_COUNTS, SAMPLE_IDS, decode_sample_columns, sample_fields
from logitcache.storage.schema import EXTRA_COLUMNS, extra_fields, span_fields
from logitcache.storage.spans import CHAT_COLUMN, decode_spans, spans_arrays

CODEC_NAME = "compact"
# q: 5 * 2**-8, so q * n is exact in float32 for n < 2**24 / 5, and q / 2 = 0.00977 nats keeps
# every probability within 0.983 % (< 1 %: ln 1.01 = 0.00995 nats); version 1 tables were written at 2**-6.
DEFAULT_STEP = 5 * 2.0**-8
CODEC_VERSION = 2  # 1: ranks only (tables without META_VERSION); 2: ids by reference (codec_refs.py)
CODEC_VERSIONS = (1, 2)
_F32_SLACK = 2.0**-17  # float32 rounding: half an ulp of any |lp| < 256 is at most 2**-17
META_CODEC = b"logitcache.codec"
META_K = b"logitcache.k"
META_STEP = b"logitcache.step"
META_IDS = b"logitcache.id_table"
META_VERSION = b"logitcache.codec_version"

# Parquet settings chosen by measurement (benchmarks/storage.py, tiny-teacher and Zipf rows):
# byte planes as PLAIN binary + zstd beat BYTE_STREAM_SPLIT / DELTA_BINARY_PACKED / dictionary
# on uint8/uint16 list columns by 10-30 %; BYTE_STREAM_SPLIT suits the float32 columns and
# input_ids, DELTA_BINARY_PACKED the character spans; zstd 9 is 1-10 % smaller than 3 at
# about the same decode speed (zstd decompression barely depends on the level). Pass as ``pq.ParquetWriter(path, schema, **PARQUET_OPTIONS)``
# (or use :func:`write_compact_parquet`). Keys are leaf paths: "<name>.list.element".
PARQUET_COLUMN_ENCODING = {
    "top1_logprob.list.element": "BYTE_STREAM_SPLIT",
    "label_logprob.list.element": "BYTE_STREAM_SPLIT",
    "logsumexp.list.element": "BYTE_STREAM_SPLIT",
    "input_ids.list.element": "BYTE_STREAM_SPLIT",
    "char_start.list.element": "DELTA_BINARY_PACKED",
    "char_end.list.element": "DELTA_BINARY_PACKED",
    # The optional columns (schema.extra_fields), stored as they are (float32), as in v1.
    "lse_tau.list.element.list.element": "BYTE_STREAM_SPLIT",
    "logit_mean.list.element": "BYTE_STREAM_SPLIT",
    "logit_std.list.element": "BYTE_STREAM_SPLIT",
    "lse_std.list.element": "BYTE_STREAM_SPLIT",
}
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 9,
    "use_dictionary": False,
    "column_encoding": PARQUET_COLUMN_ENCODING,
}


def compact_schema(n_temperatures: int = 0, logit_stats: bool = False, word_start: bool = False,
                   spans: bool = True, sample: int = 0, topk: bool = True) -> pa.Schema:
    """The Arrow schema of every compact table (without metadata); the same for any k > 0
    (``topk=False``: k = 0, no top-k columns). The optional columns (schema.extra_fields, then
    samples.sample_fields) follow, as in v1; ``spans=False``: format v1."""
    lst = pa.list_
    top = ["top1_logprob"] if topk else []
    planes = ("topk_steps_lo", "topk_steps_hi", "topk_ranks_lo", "topk_ranks_hi") if topk else ()
    return pa.schema(
        [pa.field("id", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=False),
         pa.field("prompt_chars", pa.int32(), nullable=False), pa.field("truncated", pa.bool_(), nullable=False)]
        + span_fields(spans)
        + [pa.field(n, lst(pa.int32()), nullable=False) for n in ("input_ids", "char_start", "char_end")]
        + [pa.field(n, lst(pa.float32()), nullable=False) for n in ("label_logprob", "logsumexp", *top)]
        + [pa.field(n, pa.binary(), nullable=False) for n in planes]
        + extra_fields(n_temperatures, logit_stats, word_start)
        + sample_fields(sample)
    )


def error_bound(step: float = DEFAULT_STEP) -> float:
    """Largest |lp - lp̂| in nats of a decoded logprob (see the module docstring)."""
    return step / 2 + _F32_SLACK


ERROR_BOUND_NATS = error_bound()


def prob_error_bound(p: float | np.ndarray, step: float = DEFAULT_STEP) -> float | np.ndarray:
    """Largest |p - p̂| of a probability p given by a decoded logprob: p * (e^err - 1)."""
    return np.asarray(p) * math.expm1(error_bound(step))


def _encode_ids(ids: np.ndarray) -> bytes:
    # Deltas: ids of equal count are ascending, so most deltas are small.
    deltas = np.diff(np.asarray(ids, dtype=np.int64), prepend=0).astype("<i4")
    return base64.b64encode(zlib.compress(deltas.tobytes(), 9))


def encode_id_table(ids: np.ndarray) -> bytes:
    """The footer form of an id table (for a writer that streams row groups into one shard)."""
    return _encode_ids(ids)


# An id table lists distinct vocabulary ids: 4 bytes each. No vocabulary comes near 2**24 ids;
# a footer that inflates beyond that is a zlib bomb in a hostile shard, refused before it is.
MAX_ID_TABLE_BYTES = 4 << 24


def _decode_ids(blob: bytes) -> np.ndarray:
    inflate = zlib.decompressobj()
    raw = inflate.decompress(base64.b64decode(blob), MAX_ID_TABLE_BYTES)
    if inflate.unconsumed_tail:
        raise ValueError(f"the id table inflates beyond {MAX_ID_TABLE_BYTES:,} bytes (2**24 ids); the shard is damaged")
    if len(raw) % 4:
        raise ValueError("the id table is not a whole number of 4-byte ids; the shard is damaged")
    ids = np.cumsum(np.frombuffer(raw, dtype="<i4"), dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= 1 << 31):
        raise ValueError("the id table holds ids outside [0, 2**31); the shard is damaged")
    return ids.astype(np.int32)


def build_id_table(ids: np.ndarray, prefix: np.ndarray | None = None) -> np.ndarray:
    """Ids of ``ids`` by decreasing count (ties: smaller id first), after ``prefix``."""
    vals, counts = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1), return_counts=True)
    if prefix is not None and len(prefix):
        prefix = np.asarray(prefix, dtype=np.int32)
        keep = ~np.isin(vals, prefix)
        vals, counts = vals[keep], counts[keep]
    order = np.lexsort((vals, -counts))
    new = vals[order].astype(np.int32)
    return new if prefix is None or not len(prefix) else np.concatenate([prefix, new])


def _binary(chunks: list[bytes | np.ndarray]) -> pa.Array:
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.concatenate([np.frombuffer(c, np.uint8) if isinstance(c, bytes) else c for c in chunks]) if chunks else np.zeros(0, np.uint8)
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("too many values in one table; encode fewer rows at a time")
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data.astype(np.uint8, copy=False))]
    return pa.Array.from_buffers(pa.binary(), len(chunks), buffers)


def _planes(values: np.ndarray, row_counts: Sequence[int]) -> tuple[pa.Array, pa.Array]:
    """Non-negative ints -> (low-byte plane, higher planes) per row, each row its own width."""
    lo_chunks, hi_chunks = [], []
    start = 0
    for c in row_counts:
        v = values[start : start + c]
        start += c
        top = int(v.max()) if c else 0
        if top >= 1 << 32:
            raise ValueError(f"value {top} does not fit in 4 bytes")
        w = max(1, (top.bit_length() + 7) // 8)
        planes = np.ascontiguousarray(v.astype("<u4").view(np.uint8).reshape(c, 4)[:, :w].T)
        lo_chunks.append(planes[0])
        hi_chunks.append(planes[1:].reshape(-1))
    return _binary(lo_chunks), _binary(hi_chunks)


def _binary_parts(a: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data) of a binary array, honouring slices; offsets index into data."""
    bufs = a.buffers()
    if len(a) == 0 or bufs[1] is None:
        return np.zeros(1, np.int64), np.zeros(0, np.uint8)
    off = np.frombuffer(bufs[1], np.int32)[a.offset : a.offset + len(a) + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return off, data


def _unplanes(lo: pa.Array, hi: pa.Array, counts: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_planes`: all rows' values, concatenated, as the narrowest of uint8, uint16,
    int32 and int64 that holds them."""
    lo_off, lo_data = _binary_parts(lo)
    hi_off, hi_data = _binary_parts(hi)
    total = int(counts.sum())
    counts = counts.astype(np.int64)
    hi_len = np.diff(hi_off)
    extra = hi_len // np.maximum(counts, 1)  # higher planes per row
    if (extra * counts != hi_len).any():
        raise ValueError("corrupt plane column: high planes do not match the value counts")
    wide = int(extra.max()) if len(extra) else 0
    # The narrowest dtype that holds them: the decoders' passes over them cost their bytes.
    out = lo_data[lo_off[0] : lo_off[-1]].astype((np.uint8, np.uint16, np.int32)[wide] if wide <= 2 else np.int64)
    if len(out) != total:
        raise ValueError(f"corrupt plane column: {len(out)} low bytes for {total} values")
    if wide == 0:
        return out
    starts = np.cumsum(counts) - counts
    for i in np.flatnonzero(extra):  # per row: its higher planes, vectorised over its values
        c, s0, a = int(counts[i]), int(starts[i]), int(hi_off[i])
        planes = hi_data[a : a + int(hi_len[i])].reshape(-1, c)
        seg = out[s0 : s0 + c]
        for j in range(planes.shape[0]):
            seg |= planes[j].astype(out.dtype) << (8 * (j + 1))
    return out


def _list_of(flat: np.ndarray, lengths: Sequence[int], typ: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("too many values in one table; encode fewer rows at a time")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=typ))


def _cat(chunks: list[np.ndarray], dtype: Any, width: int | None = None) -> np.ndarray:
    if not chunks:
        return np.zeros((0, width) if width else 0, dtype)
    return np.concatenate(chunks).astype(dtype, copy=False)


def encode_compact(
    rows: Sequence[Row], k: int, *, step: float = DEFAULT_STEP, id_table: np.ndarray | None = None,
    n_temperatures: int = 0, logit_stats: bool = False, word_start: bool = False, spans: bool = True,
    sample: int = 0, version: int = CODEC_VERSION,
) -> pa.Table:
    """Rows (v1 layout) -> a compact Arrow table; its schema metadata holds k, step, id table
    and the codec version. ``spans``: format v2's span columns (False: a format v1 table);
    ``sample``: the cache's draws per position (0: none), stored as in v1; ``version``: 1
    writes the ids as ranks only, as logitcache did before version 2 (for tests and benchmarks)."""
    if k < 0:
        raise ValueError("k must be >= 0")
    if version not in CODEC_VERSIONS:
        raise ValueError(f"compact codec version {version}: use one of {CODEC_VERSIONS}")
    if k == 0:
        return _encode_k0(rows, step, id_table, n_temperatures, logit_stats, word_start, spans, sample)
    n_pos = [max(len(r["input_ids"]) - 1, 0) for r in rows]
    lp = _cat([np.asarray(r["topk_logprobs"], dtype=np.float64).reshape(-1, k) for r in rows], np.float64, k)
    ids = _cat([np.asarray(r["topk_ids"]).reshape(-1, k) for r in rows], np.int64, k)
    for name, arr in (("topk_logprobs", lp), ("topk_ids", ids)):
        if arr.shape[0] != sum(n_pos):
            raise ValueError(f"{name}: expected {sum(n_pos)} positions of k={k} entries, got {arr.shape}")
    if not np.isfinite(lp).all():
        raise ValueError("topk_logprobs holds a non-finite value; the compact codec stores finite logprobs only")
    top1 = lp[:, 0].astype(np.float32)
    if not np.array_equal(top1.astype(np.float64), lp[:, 0]):
        raise ValueError("the top-1 logprobs must be float32-representable (v1 rows are float16)")
    # Quantise each entry's distance from the top-1 (error <= q/2 each), then delta the integers.
    n = np.rint((lp[:, :1] - lp) / step)
    steps = np.diff(n, axis=1)
    if steps.size and steps.min() < 0:
        raise ValueError("topk_logprobs must be sorted in descending order at every position")
    input_ids = [np.asarray(r["input_ids"], dtype=np.int32) for r in rows]
    table_ids = build_id_table(ids, None if id_table is None else np.asarray(id_table, np.int32))
    if len(table_ids) and (table_ids.min() < 0):
        raise ValueError("topk_ids must be non-negative")
    # id -> rank through a dense lookup (ids are vocabulary indices).
    lookup = np.zeros(int(table_ids.max()) + 1 if len(table_ids) else 1, dtype=np.int64)
    lookup[table_ids] = np.arange(len(table_ids))
    ranks = lookup[ids] if ids.size else ids

    def per_token(name: str, dtype: Any) -> pa.ListArray:
        chunks = [np.asarray(r[name]).reshape(-1) for r in rows]
        return _list_of(_cat(chunks, dtype), [len(c) for c in chunks], pa.from_numpy_dtype(dtype))

    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
        "prompt_chars": base_columns_prompt(rows, spans),
        "truncated": pa.array([bool(r["truncated"]) for r in rows], pa.bool_()),
        **(spans_arrays(rows) if spans else {}),
        "input_ids": _list_of(_cat(input_ids, np.int32), [len(c) for c in input_ids], pa.int32()),
        "char_start": per_token("char_start", np.int32),
        "char_end": per_token("char_end", np.int32),
        "label_logprob": per_token("label_logprob", np.float32),
        "logsumexp": per_token("logsumexp", np.float32),
        "top1_logprob": _list_of(top1, n_pos, pa.float32()),
    }
    columns["topk_steps_lo"], columns["topk_steps_hi"] = _planes(steps.reshape(-1).astype(np.int64), [m * (k - 1) for m in n_pos])
    if version == 1:
        values, counts = ranks.reshape(-1), [m * k for m in n_pos]
    else:
        row_of = np.repeat(np.arange(len(rows)), n_pos)
        tokens = _cat([ids_[: m] for ids_, m in zip(input_ids, n_pos)], np.int64)
        prev, _ = codec_refs.previous_same_token(tokens, row_of)
        values, counts = codec_refs.encode_id_values(ids, ranks, prev, row_of, len(rows))
    columns["topk_ranks_lo"], columns["topk_ranks_hi"] = _planes(values, counts)
    columns.update(extra_arrays(rows, n_temperatures, logit_stats, word_start, sample))
    metadata = {
        META_CODEC: CODEC_NAME.encode(),
        META_K: str(k).encode(),
        META_STEP: repr(float(step)).encode(),
        META_IDS: _encode_ids(table_ids),
        **({META_VERSION: str(version).encode()} if version > 1 else {}),
    }
    schema = compact_schema(n_temperatures, logit_stats, word_start, spans, sample).with_metadata(metadata)
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def _encode_k0(rows: Sequence[Row], step: float, id_table: np.ndarray | None, n_temperatures: int, logit_stats: bool,
               word_start: bool, spans: bool, sample: int) -> pa.Table:
    """A k = 0 table: the plain columns only (the id table passes through, empty or as given)."""
    from logitcache.storage.rows import rows_to_table

    plain = rows_to_table(rows, 0, n_temperatures, logit_stats, word_start, spans, sample)
    table_ids = np.zeros(0, np.int32) if id_table is None else np.asarray(id_table, np.int32)
    metadata = {META_CODEC: CODEC_NAME.encode(), META_K: b"0", META_STEP: repr(float(step)).encode(),
                META_IDS: _encode_ids(table_ids)}
    schema = compact_schema(n_temperatures, logit_stats, word_start, spans, sample, topk=False).with_metadata(metadata)
    return pa.Table.from_arrays([plain.column(name) for name in schema.names], schema=schema)


def write_compact_parquet(table: pa.Table, where: Any, **options: Any) -> None:
    """Write a compact table as one Parquet file with :data:`PARQUET_OPTIONS`.

    The id table goes into the footer's key-value metadata once (not also inside the
    serialized Arrow schema, which would store it twice). ``pq.ParquetFile(...).iter_batches()``
    hands it back in each batch's schema metadata; :func:`read_id_table` reads it directly.
    """
    import pyarrow.parquet as pq

    meta = dict(table.schema.metadata or {})
    ids = meta.pop(META_IDS)
    table = table.replace_schema_metadata(meta)
    with pq.ParquetWriter(where, table.schema, **{**PARQUET_OPTIONS, **options}) as w:
        w.write_table(table, row_group_size=max(1, table.num_rows))
        w.add_key_value_metadata({META_IDS: ids})


def read_id_table(parquet_file: Any) -> np.ndarray:
    """The id table in the footer of a compact Parquet file (a path or ``pq.ParquetFile``)."""
    import pyarrow.parquet as pq

    f = parquet_file if isinstance(parquet_file, pq.ParquetFile) else pq.ParquetFile(parquet_file)
    meta = f.metadata.metadata or {}
    if META_IDS not in meta:
        raise ValueError("no logitcache.id_table in this Parquet file's footer; not a compact-codec shard")
    return _decode_ids(meta[META_IDS])


def id_table_of(schema: pa.Schema) -> np.ndarray:
    """The id table stored in a compact table's (or Parquet file's) schema metadata."""
    meta = schema.metadata or {}
    if meta.get(META_CODEC) != CODEC_NAME.encode():
        raise ValueError("not a compact-codec table (no logitcache.codec=compact in its schema metadata)")
    return _decode_ids(meta[META_IDS])


def decode_compact(
    batch: pa.RecordBatch | pa.Table, *, id_table: np.ndarray | None = None
) -> Iterator[Row]:
    """A compact record batch -> rows in the v1 layout (``topk_logprobs`` float32).

    ``id_table`` overrides the one in the batch's schema metadata (e.g. the shard footer's).
    """
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], schema=batch.schema)
    meta = batch.schema.metadata or {}
    if meta.get(META_CODEC) != CODEC_NAME.encode():
        raise ValueError("not a compact-codec batch (no logitcache.codec=compact in its schema metadata)")
    k = int(meta[META_K])
    step = float(meta[META_STEP])
    version = int(meta.get(META_VERSION, b"1"))
    if version not in CODEC_VERSIONS:
        raise ValueError(f"compact codec version {version}: this logitcache reads versions {CODEC_VERSIONS}; "
                         "upgrade logitcache to read this shard")
    if id_table is None and META_IDS not in meta:
        raise ValueError("this batch carries no id table; pass id_table=read_id_table(parquet_file)")
    table_ids = _decode_ids(meta[META_IDS]) if id_table is None else np.asarray(id_table, dtype=np.int32)
    col = batch.column
    names = batch.schema.names
    if k == 0:
        yield from _decode_k0(batch)
        return

    top1, pos_off = flat_list_column(col(names.index("top1_logprob")))
    m = len(top1)
    n_pos = np.diff(pos_off)
    steps = _unplanes(col(names.index("topk_steps_lo")), col(names.index("topk_steps_hi")), n_pos * (k - 1))
    lo_ranks, hi_ranks = col(names.index("topk_ranks_lo")), col(names.index("topk_ranks_hi"))
    # n: each entry's steps below the top-1, summed in float32, which is exact while the sums
    # stay below 2**24 (checked on the last column, the largest: steps are non-negative).
    n = np.empty((m, k), dtype=np.float32)
    n[:, 0] = 0
    if k > 1:
        np.cumsum(steps.reshape(m, k - 1), axis=1, dtype=np.float32, out=n[:, 1:])
    q = Fraction(step)  # exact: a float is a dyadic fraction
    if q.denominator & (q.denominator - 1) == 0 and (not n.size or int(n[:, -1].max()) * q.numerator < 1 << 24):
        # n * q = (n * numerator) / 2**e with n * numerator < 2**24: exact in float32, so one
        # float32 subtraction rounds the exact lp_0 - n*q once, as float64 then float32 would.
        # In place: top1 + (-(n * q)) is that same subtraction.
        lp = n
        lp *= np.float32(-step)
        lp += top1.astype(np.float32)[:, None]
    else:
        n = np.zeros((m, k), dtype=np.int64)
        if k > 1:
            np.cumsum(steps.reshape(m, k - 1), axis=1, out=n[:, 1:])
        lp = (top1.astype(np.float64)[:, None] - n * step).astype(np.float32)
    if version == 1:
        ranks = _unplanes(lo_ranks, hi_ranks, n_pos * k)
        if len(ranks) and ranks.max() >= len(table_ids):
            raise ValueError("corrupt top-k id column: an id rank beyond the id table")
        ids = table_ids[ranks.reshape(m, k)] if m else np.zeros((0, k), np.int32)
    else:
        ids = _decode_referenced_ids(batch, lo_ranks, hi_ranks, n_pos, table_ids, k)

    out: dict[str, list[Any]] = {}
    for name in ("id", "text", "prompt_chars", "truncated"):
        out[name] = col(names.index(name)).to_pylist()
    for name in ("input_ids", "char_start", "char_end", "label_logprob", "logsumexp"):
        flat, off = flat_list_column(col(names.index(name)))
        out[name] = [flat[off[i] : off[i + 1]] for i in range(len(off) - 1)]
    out["topk_ids"] = [ids[pos_off[i] : pos_off[i + 1]] for i in range(len(pos_off) - 1)]
    out["topk_logprobs"] = [lp[pos_off[i] : pos_off[i + 1]] for i in range(len(pos_off) - 1)]
    out["target_spans"] = decode_spans(batch, out["text"])
    if CHAT_COLUMN in names:
        out[CHAT_COLUMN] = col(names.index(CHAT_COLUMN)).to_pylist()
    order = ("id", "text", "prompt_chars", "truncated", "target_spans", "input_ids", "char_start", "char_end",
             "topk_ids", "topk_logprobs", "label_logprob", "logsumexp")
    extras = tuple(name for name in EXTRA_COLUMNS if name in names)
    for name in extras:
        flat, off = flat_list_column(col(names.index(name)))
        out[name] = [flat[off[i] : off[i + 1]] for i in range(len(off) - 1)]
    order += extras + ((CHAT_COLUMN,) if CHAT_COLUMN in names else ())
    if SAMPLE_IDS in names:
        out[SAMPLE_IDS], out[SAMPLE_COUNTS] = decode_sample_columns(col(names.index(SAMPLE_IDS)), col(names.index(SAMPLE_COUNTS)))
        order += (SAMPLE_IDS, SAMPLE_COUNTS)
    for i in range(batch.num_rows):
        yield {name: out[name][i] for name in order}


def _decode_referenced_ids(batch: pa.RecordBatch, lo: pa.Array, hi: pa.Array, n_pos: np.ndarray,
                           table_ids: np.ndarray, k: int) -> np.ndarray:
    """A version 2 batch's [m, k] top-k ids (codec_refs.py), from its input tokens and rank planes."""
    tokens, tok_off = flat_list_column(batch.column(batch.schema.names.index("input_ids")))
    n_tok = np.diff(tok_off)
    if not np.array_equal(np.maximum(n_tok - 1, 0), n_pos):
        raise ValueError("corrupt compact batch: top-1 log-probs do not match the input tokens")
    keep = np.ones(len(tokens), dtype=bool)
    keep[tok_off[1:][n_tok > 0] - 1] = False  # a row's last token predicts nothing
    row_of = np.repeat(np.arange(len(n_pos)), n_pos)
    prev, level = codec_refs.previous_same_token(tokens[keep], row_of)
    lo_off, _ = _binary_parts(lo)
    counts = np.diff(lo_off)
    values = _unplanes(lo, hi, counts)
    return codec_refs.decode_id_values(values, counts, prev, level, row_of, table_ids, k)


def _decode_k0(batch: pa.RecordBatch) -> Iterator[Row]:
    """A k = 0 compact batch holds v1's plain columns only: read as v1 rows (top-k [n - 1, 0], float32)."""
    from logitcache.storage.rows import batch_to_rows

    for row in batch_to_rows(batch):
        row["topk_logprobs"] = row["topk_logprobs"].astype(np.float32)
        yield row
