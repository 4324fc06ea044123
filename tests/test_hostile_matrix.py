"""Hostile caches, through the real console script (issue 13 §3): bounded time and memory, and
verify agrees with train.

An attacker controls every byte of the cache and makes the hashes match. Each case damages a
copy of a small cache one way; ``verify`` must fail (exit != 0) and ``train`` must refuse in one
``error:`` line; neither may show a traceback, run past 30 s or reach 1 GB of RSS. ``verify``
runs for every case; ``train`` for a few by default and for all with ``-m slow``.
"""

from __future__ import annotations

import base64
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hostile import assert_bounded, edit_manifest, error_lines, rewrite_shard, run_cli, with_metadata, zlib_bomb

SHARD = "data/shard-00001.parquet"


# --- the damage ---------------------------------------------------------------------------------


def _rewrite(cache: Path, change) -> None:
    rewrite_shard(cache, SHARD, change)


def _set_list_values(table: pa.Table, name: str, fill) -> pa.Table:
    """``fill(values numpy) -> values`` on the flat values of a list column (fixed-size inner lists kept)."""
    i = table.schema.get_field_index(name)
    col = table.column(i).combine_chunks()
    inner = col.values
    if pa.types.is_fixed_size_list(inner.type):
        flat = fill(inner.values.to_numpy(zero_copy_only=False).copy())
        values = pa.FixedSizeListArray.from_arrays(pa.array(flat, inner.type.value_type), inner.type.list_size)
    else:
        values = pa.array(fill(inner.to_numpy(zero_copy_only=False).copy()), inner.type)
    return table.set_column(i, table.schema.field(i), pa.ListArray.from_arrays(col.offsets, values))


def fifo(cache: Path) -> None:
    (cache / SHARD).unlink()
    os.mkfifo(cache / SHARD)
    edit_manifest(cache, lambda d: d["shards"][1].update(bytes=0))


def huge_text(cache: Path) -> None:
    def change(t):
        texts = t.column("text").to_pylist()
        texts[0] = "a" * (64 << 20)  # 64 MiB behind a handful of tokens: zstd makes it a few KB
        return t.set_column(t.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))

    _rewrite(cache, change)


def ids_near_2_31(cache: Path) -> None:
    _rewrite(cache, lambda t: _set_list_values(t, "topk_ids", lambda v: np.full_like(v, 2**31 - 10)))
    edit_manifest(cache, lambda d: (d["tokenizer"].update(vocab_size=2**31 - 1), d["teacher"].update(vocab_size=2**31 - 1)))


def negative_ids(cache: Path) -> None:
    _rewrite(cache, lambda t: _set_list_values(t, "topk_ids", lambda v: np.full_like(v, -7)))


def nan_logprobs(cache: Path) -> None:
    _rewrite(cache, lambda t: _set_list_values(t, "topk_logprobs", lambda v: np.full_like(v, np.nan)))


def null_in_a_list(cache: Path) -> None:
    def change(t):
        i = t.schema.get_field_index("input_ids")
        col = t.column(i).combine_chunks()
        values = pa.array(col.values.to_numpy(), mask=np.arange(len(col.values)) == 3)
        return t.set_column(i, t.schema.field(i), pa.ListArray.from_arrays(col.offsets, values))

    _rewrite(cache, change)


def invalid_utf8_text(cache: Path) -> None:
    def change(t):
        texts = t.column("text").combine_chunks()
        data = bytearray(texts.buffers()[2].to_pybytes())
        data[3] = 0xFF
        bad = pa.StringArray.from_buffers(len(texts), texts.buffers()[1], pa.py_buffer(bytes(data)))
        return t.set_column(t.schema.get_field_index("text"), "text", bad)

    _rewrite(cache, change)


def symlink_loop(cache: Path) -> None:
    (cache / SHARD).unlink()
    (cache / SHARD).symlink_to(Path(SHARD).name)


def nested_manifest(cache: Path) -> None:
    (cache / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def huge_k(cache: Path) -> None:
    edit_manifest(cache, lambda d: d.update(k=10**12))


def template_of_the_wrong_type(cache: Path) -> None:
    edit_manifest(cache, lambda d: d["template"].update(text_field=[1], kind={"a": 1}))


def zlib_bomb_id_table(cache: Path) -> None:
    from logitcache.storage.codec import META_IDS

    _rewrite(cache, lambda t: with_metadata(t, {META_IDS: zlib_bomb(1024)}))  # 1 GiB inflated


def compact_ranks_out_of_range(cache: Path) -> None:
    from logitcache.storage.codec import META_IDS

    one_id = base64.b64encode(zlib.compress(np.array([3], "<i4").tobytes()))  # every other rank points past it
    _rewrite(cache, lambda t: with_metadata(t, {META_IDS: one_id}))


V1 = [fifo, huge_text, ids_near_2_31, negative_ids, nan_logprobs, null_in_a_list, invalid_utf8_text, symlink_loop,
      nested_manifest, huge_k, template_of_the_wrong_type]
COMPACT = [zlib_bomb_id_table, compact_ranks_out_of_range]
TRAIN_BY_DEFAULT = {"fifo", "huge_text", "zlib_bomb_id_table"}


@pytest.fixture(scope="module")
def compact_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    from conftest import make_config

    from logitcache.pipeline.teacher.run import run_teacher

    out = tmp_path_factory.mktemp("compact") / "cache"
    run_teacher(make_config(teacher_dir, data_file, out, codec="compact"), progress=False)
    return out


def _hostile(tmp_path: Path, source: Path, damage) -> Path:
    cache = tmp_path / "hostile"
    shutil.copytree(source, cache)
    damage(cache)
    return cache


def _cases():
    for damage in V1 + COMPACT:
        codec = "compact" if damage in COMPACT else "v1"
        yield pytest.param(damage, codec, id=damage.__name__)


@pytest.mark.parametrize("damage, codec", list(_cases()))
def test_verify_fails_within_bounds(tmp_path, built_cache, compact_cache, damage, codec):
    cache = _hostile(tmp_path, compact_cache if codec == "compact" else built_cache, damage)

    r, seconds, rss = run_cli("verify", cache)

    assert r.returncode != 0, r.stdout
    assert_bounded(r, seconds, rss)


def _train_cases():
    for p in _cases():
        damage = p.values[0]
        marks = () if damage.__name__ in TRAIN_BY_DEFAULT else (pytest.mark.slow,)
        yield pytest.param(*p.values, id=p.id, marks=marks)


@pytest.mark.parametrize("damage, codec", list(_train_cases()))
def test_train_refuses_in_one_line_within_bounds(tmp_path, built_cache, compact_cache, student, damage, codec):
    cache = _hostile(tmp_path, compact_cache if codec == "compact" else built_cache, damage)

    r, seconds, rss = run_cli("train", "--student", student, "--cache", cache, "--out", tmp_path / "run", "--loss", "kl",
                           "--max-steps", "2", "--batch-size", "4", "--no-progress")

    assert r.returncode != 0, r.stderr[-2000:]
    assert len(error_lines(r)) == 1, r.stderr[-3000:]
    assert_bounded(r, seconds, rss)
    assert not (tmp_path / "run" / "model.safetensors").exists()
