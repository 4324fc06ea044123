"""Hostile merge parts, through the real console script (issue 13 §3): one line, bounded.

The two parts of a real split run (the tiny teacher, ``--num-parts 2``) are built once; each
case copies them, damages them one way as an attacker who controls every byte would (hashes made
to match unless the case is the hash), and runs ``logitcache merge``. It must refuse: exit != 0,
exactly one short ``error:`` line and no traceback, no merged cache left behind (the output
directory, new before, is gone), within 30 s and 1 GiB of peak RSS.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config
from hostile import assert_bounded, edit_manifest, error_lines, rehash, rewrite_shard, run_cli, with_metadata, zlib_bomb

from logitcache.pipeline.teacher.run import part_name, run_teacher

P0, P1 = part_name(0, 2), part_name(1, 2)
SHARD = "data/shard-00001.parquet"
MAX_ERROR_CHARS = 1000


def _split_run(root: Path, teacher_dir: Path, data_file: Path, **overrides) -> Path:
    for i in range(2):
        run_teacher(make_config(teacher_dir, data_file, root, num_workers=2, worker_index=i, **overrides), progress=False)
    return root


@pytest.fixture(scope="module")
def v1_parts(tmp_path_factory, teacher_dir, data_file) -> Path:
    """The two complete parts of a split run of the 24 records, several shards each."""
    return _split_run(tmp_path_factory.mktemp("v1") / "parts", teacher_dir, data_file)


@pytest.fixture(scope="module")
def compact_parts(tmp_path_factory, teacher_dir, data_file) -> Path:
    return _split_run(tmp_path_factory.mktemp("compact") / "parts", teacher_dir, data_file, codec="compact")


def _ids(part: Path) -> list[str]:
    return [rid for s in sorted((part / "data").glob("*.parquet")) for rid in pq.read_table(s, columns=["id"])["id"].to_pylist()]


def _set_ids(part: Path, change) -> None:
    """The id column of ``part``'s SHARD as ``change(ids)`` (a list, None for a null)."""

    def rewrite(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("id")
        return t.set_column(i, t.schema.field(i), pa.array(change(t["id"].to_pylist()), pa.string()))

    rewrite_shard(part, SHARD, rewrite)


# --- the damage, to the parts directory (both parts in it) -----------------------------------------


def fifo_shard(parts: Path) -> None:
    (parts / P1 / SHARD).unlink()
    os.mkfifo(parts / P1 / SHARD)
    edit_manifest(parts / P1, lambda d: d["shards"][1].update(bytes=0))


def symlink_loop_shard(parts: Path) -> None:
    (parts / P1 / SHARD).unlink()
    (parts / P1 / SHARD).symlink_to(Path(SHARD).name)


def tokenizer_fifo(parts: Path) -> None:
    (parts / P0 / "tokenizer" / "tokenizer.json").unlink()
    os.mkfifo(parts / P0 / "tokenizer" / "tokenizer.json")


def nested_manifest(parts: Path) -> None:
    (parts / P1 / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def manifest_not_json(parts: Path) -> None:
    (parts / P1 / "manifest.json").write_text("{'k': 8, shards: [")


def manifest_truncated(parts: Path) -> None:
    text = (parts / P1 / "manifest.json").read_text()
    (parts / P1 / "manifest.json").write_text(text[: len(text) // 2])


def k_a_string(parts: Path) -> None:
    edit_manifest(parts / P1, lambda d: d.update(k="8"))


def num_records_a_string(parts: Path) -> None:
    for p in (P0, P1):
        edit_manifest(parts / p, lambda d: d["dataset"].update(num_records="24"))


def num_records_a_list(parts: Path) -> None:
    for p in (P0, P1):
        edit_manifest(parts / p, lambda d: d["dataset"].update(num_records=[24]))


def teacher_a_list(parts: Path) -> None:
    edit_manifest(parts / P1, lambda d: d.update(teacher=["tiny"]))


def worker_a_list(parts: Path) -> None:
    edit_manifest(parts / P1, lambda d: d.update(worker=[1, 2]))


def num_records_a_trillion(parts: Path) -> None:
    for p in (P0, P1):
        edit_manifest(parts / p, lambda d: d["dataset"].update(num_records=10**12))


def a_billion_workers(parts: Path) -> None:
    for p in (P0, P1):
        edit_manifest(parts / p, lambda d: d["worker"].update(count=10**9))


def another_split(parts: Path) -> None:
    edit_manifest(parts / P1, lambda d: d["worker"].update(count=3))


def another_teacher(parts: Path) -> None:
    edit_manifest(parts / P1, lambda d: d["teacher"].update(fingerprint="f" * 64))


def another_tokenizer(parts: Path) -> None:
    edit_manifest(parts / P1, lambda d: d["tokenizer"].update(sha256="0" * 64))


def another_dataset(parts: Path) -> None:
    edit_manifest(parts / P1, lambda d: d["dataset"].update(fingerprint="beef"))


def an_id_in_both_parts(parts: Path) -> None:
    first = _ids(parts / P0)[0]
    _set_ids(parts / P1, lambda ids: [first, *ids[1:]])


def a_huge_id_in_both_parts(parts: Path) -> None:
    huge = "x" * (4 << 20)  # zstd makes it a few hundred bytes in each shard
    _set_ids(parts / P0, lambda ids: [huge, *ids[1:]])
    _set_ids(parts / P1, lambda ids: [huge, *ids[1:]])


def a_null_id(parts: Path) -> None:
    def rewrite(t: pa.Table) -> pa.Table:  # the format's id column is non-null: Parquet cannot hold a null there
        i = t.schema.get_field_index("id")
        return t.set_column(i, pa.field("id", pa.string(), nullable=True), pa.array([None, *t["id"].to_pylist()[1:]], pa.string()))

    rewrite_shard(parts / P1, SHARD, rewrite)


def ids_of_another_type(parts: Path) -> None:
    def rewrite(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("id")
        return t.set_column(i, pa.field("id", pa.int64()), pa.array(range(t.num_rows), pa.int64()))

    rewrite_shard(parts / P1, SHARD, rewrite)


def a_skipped_id_of_the_other_part(parts: Path) -> None:
    first = _ids(parts / P0)[0]
    edit_manifest(parts / P1, lambda d: d["skipped"].update({first: "empty text"}))


def sha256_differs(parts: Path) -> None:
    path = parts / P1 / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def huge_k(parts: Path) -> None:
    edit_manifest(parts / P1, lambda d: d.update(k=10**12))


def shard_path_outside(parts: Path) -> None:
    edit_manifest(parts / P1, lambda d: d["shards"][0].update(path="../../../../etc/passwd"))


def footer_longer_than_the_file(parts: Path) -> None:
    path = parts / P1 / SHARD
    data = bytearray(path.read_bytes())
    data[-8:-4] = (2**31 - 1).to_bytes(4, "little")  # the footer's length, before the closing PAR1
    path.write_bytes(bytes(data))
    rehash(parts / P1, SHARD)


def zlib_bomb_id_table(parts: Path) -> None:
    from logitcache.storage.codec import META_IDS

    rewrite_shard(parts / P1, SHARD, lambda t: with_metadata(t, {META_IDS: zlib_bomb(1024)}))  # 1 GiB inflated


V1 = [fifo_shard, symlink_loop_shard, tokenizer_fifo, nested_manifest, manifest_not_json, manifest_truncated, k_a_string,
      num_records_a_string, num_records_a_list, teacher_a_list, worker_a_list, num_records_a_trillion, a_billion_workers,
      another_split, another_teacher, another_tokenizer, another_dataset, an_id_in_both_parts, a_huge_id_in_both_parts,
      a_null_id, ids_of_another_type, a_skipped_id_of_the_other_part, sha256_differs, huge_k, shard_path_outside,
      footer_longer_than_the_file]
COMPACT = [zlib_bomb_id_table]


# About half a second a case (a process apiece). With -m slow only: more of a kind the default
# cases already show (other wrong types, another truncation, another settings mismatch, a path
# the manifest schema refuses as it does for verify and train).
SLOW = {"manifest_truncated", "k_a_string", "worker_a_list", "num_records_a_list", "shard_path_outside",
        "another_dataset"}


def _cases():
    for damage in V1 + COMPACT:
        marks = (pytest.mark.slow,) if damage.__name__ in SLOW else ()
        yield pytest.param(damage, "compact" if damage in COMPACT else "v1", id=damage.__name__, marks=marks)


def _merge(tmp_path: Path, source: Path, damage=None):
    parts = tmp_path / "parts"
    shutil.copytree(source, parts, symlinks=True)
    if damage is not None:
        damage(parts)
    out = tmp_path / "merged"
    return out, *run_cli("merge", out, parts)


def test_the_undamaged_parts_merge_within_the_same_bounds(tmp_path, v1_parts):
    """The matrix's harness on sound parts: what fails below fails for its damage."""
    out, r, seconds, rss = _merge(tmp_path, v1_parts)

    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "manifest.json").is_file() and not error_lines(r)
    assert_bounded(r, seconds, rss)


@pytest.mark.parametrize("damage, codec", list(_cases()))
def test_merge_refuses_in_one_line_within_bounds(tmp_path, v1_parts, compact_parts, damage, codec):
    out, r, seconds, rss = _merge(tmp_path, compact_parts if codec == "compact" else v1_parts, damage)

    assert r.returncode != 0, r.stdout
    errors = error_lines(r)
    assert len(errors) == 1 and len(errors[0]) < MAX_ERROR_CHARS, r.stderr[-3000:]
    assert_bounded(r, seconds, rss)
    assert not out.exists()  # new before the merge: nothing half-written stays
