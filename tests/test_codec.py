"""The compact codec: exact ids and side columns, logprobs within the documented bound."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache.storage.codec import (
    DEFAULT_STEP,
    ERROR_BOUND_NATS,
    compact_schema,
    decode_compact,
    encode_compact,
    error_bound,
    id_table_of,
    prob_error_bound,
    read_id_table,
    write_compact_parquet,
)
from logitcache.storage.reader import open_cache

EXACT = ("id", "text", "prompt_chars", "truncated", "input_ids", "char_start", "char_end", "label_logprob", "logsumexp")


def synthetic_rows(n_rows: int, k: int, V: int, seed: int = 0, max_len: int = 40) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        n = int(rng.integers(1, max_len))
        m = n - 1
        lp = np.sort(rng.normal(0, 3, size=(m, k)), axis=1)[:, ::-1]
        lp = (lp - np.log(np.exp(lp).sum(axis=1, keepdims=True)) - rng.uniform(0, 2, size=(m, 1)))
        ids = np.stack([rng.choice(V, size=k, replace=False) for _ in range(m)]) if m else np.zeros((0, k))
        pc = int(rng.integers(0, n))
        rows.append({
            "id": f"s{i}", "text": "t" * n + "é", "prompt_chars": pc, "truncated": bool(i % 2),
            "target_spans": np.array([[pc, n + 1]], np.int32),
            "input_ids": rng.integers(0, V, size=n).astype(np.int32),
            "char_start": np.arange(n, dtype=np.int32), "char_end": np.arange(1, n + 1, dtype=np.int32),
            "topk_ids": ids.astype(np.int32), "topk_logprobs": lp.astype(np.float16),
            "label_logprob": rng.normal(-3, 1, size=m).astype(np.float32),
            "logsumexp": rng.normal(10, 1, size=m).astype(np.float32),
        })
    return rows


def roundtrip(rows: list[dict], k: int, tmp_path=None, **kw) -> list[dict]:
    table = encode_compact(rows, k, **kw)
    if tmp_path is None:
        return [r for b in table.to_batches(max_chunksize=7) for r in decode_compact(b)]
    path = tmp_path / "shard.parquet"
    write_compact_parquet(table, path)
    f = pq.ParquetFile(path)
    return [r for b in f.iter_batches(batch_size=5) for r in decode_compact(b)]


def check(rows: list[dict], got: list[dict], k: int, step: float = DEFAULT_STEP) -> float:
    assert len(got) == len(rows)
    worst = 0.0
    for a, b in zip(rows, got):
        for name in EXACT:
            if isinstance(a[name], np.ndarray):
                assert b[name].dtype == a[name].dtype, name
                np.testing.assert_array_equal(b[name], a[name], err_msg=name)
            else:
                assert b[name] == a[name], name
        assert b["topk_ids"].dtype == np.int32 and b["topk_logprobs"].dtype == np.float32
        assert b["topk_ids"].shape == b["topk_logprobs"].shape == (len(a["input_ids"]) - 1, k)
        np.testing.assert_array_equal(b["topk_ids"], a["topk_ids"])
        if len(a["topk_logprobs"]):
            lp = np.asarray(a["topk_logprobs"], dtype=np.float64)
            worst = max(worst, float(np.abs(lp - b["topk_logprobs"]).max()))
            assert (np.diff(b["topk_logprobs"], axis=1) <= 0).all(), "sortedness lost"
            np.testing.assert_array_equal(b["topk_logprobs"][:, 0], lp[:, 0])  # the top-1 is exact
    assert worst <= error_bound(step)
    return worst


def test_bound_is_below_a_hundredth_of_a_nat():
    assert ERROR_BOUND_NATS == error_bound() <= 0.01
    assert error_bound() >= DEFAULT_STEP / 2


def test_roundtrip_built_cache(built_cache, tmp_path):
    reader = open_cache(built_cache)
    rows = list(reader)
    assert rows and reader.k == 8
    check(rows, roundtrip(rows, reader.k), reader.k)
    check(rows, roundtrip(rows, reader.k, tmp_path), reader.k)


@pytest.mark.parametrize("k", [1, 2, 8, 64])
def test_roundtrip_synthetic(k, tmp_path):
    rows = synthetic_rows(30, k, V=32000, seed=k)
    worst = check(rows, roundtrip(rows, k, tmp_path), k)
    assert worst > 0 or k == 1  # it is lossy, and the bound is what holds it


def test_coarser_step_bound_holds():
    rows = synthetic_rows(10, 16, V=1000, seed=5)
    step = 2.0**-3
    worst = check(rows, roundtrip(rows, 16, step=step), 16, step=step)
    assert DEFAULT_STEP / 2 < worst <= step / 2 + 1e-5


def test_empty_rows_and_no_rows(tmp_path):
    k = 4
    one = synthetic_rows(1, k, V=100)[0]
    empty = {**one, "id": "empty", "input_ids": one["input_ids"][:1], "char_start": one["char_start"][:1],
             "char_end": one["char_end"][:1], "topk_ids": np.zeros((0, k), np.int32),
             "topk_logprobs": np.zeros((0, k), np.float16), "label_logprob": np.zeros(0, np.float32),
             "logsumexp": np.zeros(0, np.float32)}
    rows = [empty, one, {**empty, "id": "empty2"}]
    check(rows, roundtrip(rows, k), k)
    check(rows, roundtrip(rows, k, tmp_path), k)
    check([empty], roundtrip([empty], k), k)
    assert encode_compact([], k).num_rows == 0


def test_id_table_larger_than_uint16(tmp_path):
    V, k = 128_000, 128
    rows = synthetic_rows(40, k, V=V, seed=7, max_len=60)
    table = encode_compact(rows, k)
    assert len(id_table_of(table.schema)) > 2**16
    # Some row needs ranks of three bytes: two high planes.
    n_values = [(len(r["input_ids"]) - 1) * k for r in rows]
    hi = [len(b) for b in table.column("topk_ranks_hi").to_pylist()]
    assert any(h == 2 * n and n for h, n in zip(hi, n_values))
    check(rows, roundtrip(rows, k, tmp_path), k)
    ids = read_id_table(tmp_path / "shard.parquet")
    assert len(ids) > 2**16
    # pq.read_table keeps only the Arrow schema's metadata: pass the footer's id table.
    batch = pq.read_table(tmp_path / "shard.parquet").combine_chunks().to_batches()[0]
    with pytest.raises(ValueError, match="id table"):
        next(decode_compact(batch))
    check(rows, list(decode_compact(batch, id_table=ids)), k)


def test_schema_is_fixed():
    for k, V in ((1, 10), (8, 300), (64, 128_000)):
        table = encode_compact(synthetic_rows(3, k, V=V, seed=k), k)
        assert table.schema.equals(compact_schema(), check_metadata=False)


def test_frequent_ids_get_small_ranks():
    rows = synthetic_rows(5, 8, V=50000, seed=1)
    for r in rows:
        r["topk_ids"][:, 0] = 49_999  # the most frequent id
    table = encode_compact(rows, 8)
    assert id_table_of(table.schema)[0] == 49_999


def test_id_table_prefix_is_kept():
    rows = synthetic_rows(6, 8, V=5000, seed=2)
    first = id_table_of(encode_compact(rows[:3], 8).schema)
    table = encode_compact(rows[3:], 8, id_table=first)
    ids = id_table_of(table.schema)
    np.testing.assert_array_equal(ids[: len(first)], first)
    assert len(np.unique(ids)) == len(ids)
    # A later (superset) table decodes an earlier row group.
    early = encode_compact(rows[:3], 8)
    got = [r for b in early.to_batches() for r in decode_compact(b, id_table=ids[: len(first)])]
    check(rows[:3], got, 8)


def test_probability_error_bound():
    rng = np.random.default_rng(0)
    k = 256
    lp = np.sort(rng.uniform(math.log(1e-4), 0, size=(200, k)), axis=1)[:, ::-1].astype(np.float16)
    rows = synthetic_rows(1, k, V=10_000, max_len=2)
    rows[0] = {**rows[0], "input_ids": np.zeros(201, np.int32), "char_start": np.zeros(201, np.int32),
               "char_end": np.zeros(201, np.int32), "topk_logprobs": lp,
               "topk_ids": np.tile(np.arange(k, dtype=np.int32), (200, 1)),
               "label_logprob": np.zeros(200, np.float32), "logsumexp": np.zeros(200, np.float32)}
    got = roundtrip(rows, k)[0]["topk_logprobs"]
    p = np.exp(lp.astype(np.float64))
    p_hat = np.exp(got.astype(np.float64))
    assert p.min() >= 1e-4 * 0.99
    err = np.abs(p - p_hat)
    assert (err <= prob_error_bound(p) * (1 + 1e-9)).all()
    # Relative error below 0.8 %, absolute below 8e-7 at p = 1e-4.
    assert math.expm1(ERROR_BOUND_NATS) < 0.008
    assert prob_error_bound(1e-4) < 8e-7


def test_rejects_bad_input():
    row = synthetic_rows(1, 4, V=100, seed=3, max_len=2)[0]
    row = {**row, "input_ids": np.zeros(3, np.int32), "char_start": np.zeros(3, np.int32),
           "char_end": np.zeros(3, np.int32), "topk_ids": np.tile(np.arange(4, dtype=np.int32), (2, 1)),
           "label_logprob": np.zeros(2, np.float32), "logsumexp": np.zeros(2, np.float32)}
    good = np.array([[-0.5, -1.0, -2.0, -3.0]] * 2, np.float16)
    check([{**row, "topk_logprobs": good}], roundtrip([{**row, "topk_logprobs": good}], 4), 4)
    with pytest.raises(ValueError, match="sorted"):
        encode_compact([{**row, "topk_logprobs": good[:, ::-1]}], 4)
    inf = good.copy()
    inf[0, -1] = -np.inf
    with pytest.raises(ValueError, match="non-finite"):
        encode_compact([{**row, "topk_logprobs": inf}], 4)
    with pytest.raises(ValueError, match="positions"):
        encode_compact([{**row, "topk_logprobs": good[:1]}], 4)
    with pytest.raises(ValueError, match="compact"):
        next(decode_compact(pa.table({"x": [1]}).to_batches()[0]))


def test_float32_input_and_far_tail(tmp_path):
    """Logprobs straight from a float32 teacher (no float16 step), down to -200 nats."""
    k = 16
    lp = np.sort(-np.random.default_rng(4).uniform(0, 200, size=(50, k)), axis=1)[:, ::-1].astype(np.float32)
    row = synthetic_rows(1, k, V=1000, max_len=2)[0]
    row = {**row, "input_ids": np.zeros(51, np.int32), "char_start": np.zeros(51, np.int32),
           "char_end": np.zeros(51, np.int32), "topk_logprobs": lp,
           "topk_ids": np.tile(np.arange(k, dtype=np.int32), (50, 1)),
           "label_logprob": np.zeros(50, np.float32), "logsumexp": np.zeros(50, np.float32)}
    check([row], roundtrip([row], k), k)
    # Rows of different byte widths side by side, read back in slices.
    mixed = synthetic_rows(9, k, V=1000, seed=9)
    mixed = mixed[:4] + [row] + mixed[4:] + [{**row, "id": "again"}]
    check(mixed, roundtrip(mixed, k), k)
    check(mixed, roundtrip(mixed, k, tmp_path), k)
