"""Reading a cache: the reader API, plain Parquet tools, `datasets`, and the row codec.

Every test here reads ``built_cache`` (24 examples, k=8, several shards) or builds rows by
hand; tests that damage a cache work on ``cache_copy``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from logitcache.errors import LogitCacheError
from logitcache.storage import CacheReader, load_manifest, open_cache, shard_schema
from logitcache.storage.rows import batch_to_rows, rows_to_table

K = 8
N_EXAMPLES = 24

# The documented row layout (storage/rows.py): name -> (dtype, shape given n tokens).
ARRAY_LAYOUT = {
    "input_ids": (np.int32, lambda n: (n,)),
    "char_start": (np.int32, lambda n: (n,)),
    "char_end": (np.int32, lambda n: (n,)),
    "topk_ids": (np.int32, lambda n: (n - 1, K)),
    "topk_logprobs": (np.float16, lambda n: (n - 1, K)),
    "label_logprob": (np.float32, lambda n: (n - 1,)),
    "logsumexp": (np.float32, lambda n: (n - 1,)),
    "lse_tau": (np.float32, lambda n: (n - 1, 1)),  # the default extra temperature, 2
    "word_start_logprob": (np.float32, lambda n: (n - 1,)),  # on by default with the hf engine
}
SCALARS = ("id", "text", "prompt_chars", "truncated")


def assert_rows_equal(a: dict, b: dict) -> None:
    """Same keys, same scalars, and every array equal in dtype, shape and value."""
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            assert a[name].dtype == b[name].dtype, name
            assert a[name].shape == b[name].shape, name
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name], name


def shard_paths(cache: Path) -> list[Path]:
    return [cache / s.path for s in load_manifest(cache).shards]


# --- CacheReader: iteration --------------------------------------------------------------


def test_open_cache_returns_a_reader_with_the_manifest(built_cache):
    cache = open_cache(built_cache)

    assert isinstance(cache, CacheReader)
    assert cache.k == K
    assert len(cache) == N_EXAMPLES
    assert len(cache.manifest.shards) > 1, "the fixture is meant to have several shards"


def test_iteration_yields_every_example_once(built_cache):
    ids = [row["id"] for row in open_cache(built_cache)]

    assert len(ids) == N_EXAMPLES
    assert len(set(ids)) == N_EXAMPLES


def test_rows_are_dicts_of_numpy_arrays_with_documented_dtypes_and_shapes(built_cache):
    for row in open_cache(built_cache):
        assert set(row) == set(SCALARS) | set(ARRAY_LAYOUT) | {"target_spans", "messages"}
        assert isinstance(row["id"], str) and isinstance(row["text"], str)
        assert row["messages"] is None  # the records of this cache came from no chat
        assert row["target_spans"].dtype == np.int32 and row["target_spans"].shape[1:] == (2,)
        n = len(row["input_ids"])
        assert n >= 1
        for name, (dtype, shape) in ARRAY_LAYOUT.items():
            assert isinstance(row[name], np.ndarray), name
            assert row[name].dtype == dtype, (row["id"], name, row[name].dtype)
            assert row[name].shape == shape(n), (row["id"], name, row[name].shape)


def test_iteration_order_across_shards_is_the_input_dataset_order(built_cache, data_file):
    with open(data_file, encoding="utf-8") as f:
        expected = [json.loads(line)["id"] for line in f if line.strip()]

    ids = [row["id"] for row in open_cache(built_cache)]

    assert expected[:2] == ["ex-00000", "ex-00001"]
    assert ids == expected


def test_ids_lists_the_same_ids_as_iteration(built_cache):
    cache = open_cache(built_cache)

    assert list(cache.ids()) == [row["id"] for row in cache]


# --- CacheReader: random access ----------------------------------------------------------


def test_random_access_by_id_returns_the_same_row_as_iteration(built_cache):
    cache = open_cache(built_cache)

    for row in cache:
        assert_rows_equal(cache[row["id"]], row)


def test_random_access_reaches_every_row_of_the_last_shard(built_cache):
    cache = open_cache(built_cache)
    last = shard_paths(built_cache)[-1]
    last_ids = pq.read_table(last, columns=["id"]).column("id").to_pylist()
    by_id = {row["id"]: row for row in cache}

    assert last_ids, "the last shard holds rows"
    for rid in last_ids:
        assert rid in cache
        assert_rows_equal(cache[rid], by_id[rid])
    # The very last example of the cache (last row group of the last shard).
    assert cache[last_ids[-1]]["id"] == "ex-00023"


def test_unknown_id_raises_logitcache_error_naming_the_id(built_cache):
    cache = open_cache(built_cache)

    assert "no-such-example" not in cache
    with pytest.raises(LogitCacheError, match="no-such-example"):
        cache["no-such-example"]


# --- other tools read the shards ---------------------------------------------------------


def test_shards_load_with_plain_pyarrow_and_match_the_v1_schema(built_cache):
    total = 0
    for path in shard_paths(built_cache):
        table = pq.read_table(path)
        assert table.schema.equals(shard_schema(K, n_temperatures=1, word_start=True)), f"{path}: {table.schema}"
        total += table.num_rows
    assert total == N_EXAMPLES


def test_shards_are_zstd_compressed_in_the_parquet_metadata(built_cache):
    for path in shard_paths(built_cache):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            codecs = {group.column(c).compression for c in range(group.num_columns)}
            assert codecs == {"ZSTD"}, f"{path} row group {g}: {codecs}"


def test_shards_load_with_datasets_parquet_builder(built_cache, tmp_path):
    datasets = pytest.importorskip("datasets")

    ds = datasets.load_dataset(
        "parquet",
        data_files=[str(p) for p in shard_paths(built_cache)],
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )

    assert ds.num_rows == N_EXAMPLES
    assert ds["id"] == [row["id"] for row in open_cache(built_cache)]
    assert set(ds.column_names) == set(shard_schema(K, n_temperatures=1, word_start=True).names)


def test_cache_directory_loads_with_datasets_through_the_dataset_card(built_cache, tmp_path):
    """README.md's YAML header (configs: data_files: data/*.parquet) is all `datasets` needs."""
    datasets = pytest.importorskip("datasets")
    card = (built_cache / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "data/*.parquet" in card

    before = sorted(p.relative_to(built_cache) for p in built_cache.rglob("*"))

    ds = datasets.load_dataset(str(built_cache), split="train", cache_dir=str(tmp_path / "hf"))

    assert ds.num_rows == N_EXAMPLES
    assert sorted(p.relative_to(built_cache) for p in built_cache.rglob("*")) == before, "datasets wrote into the cache"
    assert sorted(ds["id"]) == sorted(row["id"] for row in open_cache(built_cache))
    assert set(ds.column_names) == set(shard_schema(K, n_temperatures=1, word_start=True).names)


# --- refusing what is not a (supported) cache ---------------------------------------------


def _edit_manifest(cache: Path, **changes) -> None:
    path = cache / "manifest.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_unknown_format_version_is_refused_naming_the_version(cache_copy):
    _edit_manifest(cache_copy, format_version=99)

    with pytest.raises(LogitCacheError, match=r"format_version 99 is not supported") as e:
        open_cache(cache_copy)
    assert "upgrade" in str(e.value)


def test_directory_without_manifest_is_refused(cache_copy):
    (cache_copy / "manifest.json").unlink()

    with pytest.raises(LogitCacheError, match="no manifest.json"):
        open_cache(cache_copy)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(LogitCacheError, match="no such cache directory"):
        open_cache(tmp_path / "nowhere")


def test_manifest_with_invalid_json_is_refused(cache_copy):
    (cache_copy / "manifest.json").write_text('{"format_version": 1, "k": ', encoding="utf-8")

    with pytest.raises(LogitCacheError, match="not valid JSON"):
        open_cache(cache_copy)


# --- the row codec: rows_to_table <-> batch_to_rows ----------------------------------------


def make_row(rid: str, n: int, seed: int) -> dict:
    """A hand-made, well-formed row with ``n`` tokens (so ``n - 1`` positions)."""
    rng = np.random.default_rng(seed)
    text = "".join(chr(ord("a") + int(c)) for c in rng.integers(0, 26, size=2 * n))
    logits = rng.normal(size=(n - 1, 100))
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    topk_ids = np.argsort(-logprobs, axis=1)[:, :K]
    return {
        "id": rid,
        "text": text,
        "prompt_chars": n // 2,
        "target_spans": np.array([[n // 2, 2 * n]], np.int32),
        "messages": None,  # no chat behind this record
        "truncated": bool(n % 2),
        "input_ids": rng.integers(0, 100, size=n).astype(np.int32),
        "char_start": (2 * np.arange(n)).astype(np.int32),
        "char_end": (2 * np.arange(n) + 2).astype(np.int32),
        "topk_ids": topk_ids.astype(np.int32),
        "topk_logprobs": np.take_along_axis(logprobs, topk_ids, axis=1).astype(np.float16),
        "label_logprob": logprobs[:, 0].astype(np.float32),
        "logsumexp": rng.normal(size=n - 1).astype(np.float32),
    }


def decode(table) -> list[dict]:
    return [row for batch in table.to_batches() for row in batch_to_rows(batch)]


def test_rows_to_table_produces_the_v1_schema():
    table = rows_to_table([make_row("a", 4, 0), make_row("b", 1, 1)], K)

    assert table.schema.equals(shard_schema(K))
    assert table.num_rows == 2


def test_row_codec_round_trips_hand_made_rows():
    rows = [make_row("a", 4, 0), make_row("b", 6, 1), make_row("c", 1, 2), make_row("d", 3, 3)]

    back = decode(rows_to_table(rows, K))

    assert len(back) == len(rows)
    for original, decoded in zip(rows, back):
        assert_rows_equal(decoded, original)


def test_single_token_row_round_trips_with_zero_positions():
    row = make_row("single", 1, 7)
    assert row["topk_ids"].shape == (0, K)

    (back,) = decode(rows_to_table([row], K))

    assert_rows_equal(back, row)
    assert back["input_ids"].shape == (1,)
    assert back["topk_ids"].shape == (0, K)
    assert back["topk_logprobs"].shape == (0, K)
    assert back["label_logprob"].shape == (0,)
    assert back["logsumexp"].shape == (0,)


def test_batch_to_rows_honours_the_offsets_of_a_sliced_table():
    rows = [make_row("a", 4, 0), make_row("b", 6, 1), make_row("c", 1, 2), make_row("d", 3, 3)]
    table = rows_to_table(rows, K)

    sliced = table.slice(1, 2)
    assert sliced.column("input_ids").chunk(0).offset == 1, "a zero-copy slice, offsets not rebased"

    back = decode(sliced)

    assert [r["id"] for r in back] == ["b", "c"]
    assert_rows_equal(back[0], rows[1])
    assert_rows_equal(back[1], rows[2])


def test_batch_to_rows_honours_the_offsets_of_a_sliced_record_batch():
    rows = [make_row("a", 4, 0), make_row("b", 6, 1), make_row("c", 1, 2), make_row("d", 3, 3)]
    (batch,) = rows_to_table(rows, K).to_batches()

    sliced = batch.slice(2, 2)
    assert sliced.column("topk_ids").offset == 2

    back = list(batch_to_rows(sliced))

    assert [r["id"] for r in back] == ["c", "d"]
    assert_rows_equal(back[0], rows[2])
    assert_rows_equal(back[1], rows[3])
