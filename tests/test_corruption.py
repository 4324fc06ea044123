"""A damaged cache is caught by both stages: `verify` names each problem and exits non-zero;
stage 2 refuses to start (one line naming the shard, pointing to `logitcache verify` and
`--skip-bad-shards`), or with `--skip-bad-shards` trains without the bad shards and says
how many examples that cost.

Each case damages its own copy of the session's cache (24 examples, several shards) in
one way: a flipped byte, a truncated shard, a deleted shard, an extra shard the manifest
does not list, and manifest edits (a row count, a sha256, k, a removed shard entry).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from logitcache import LogitCacheError
from logitcache.cli import app
from logitcache.pipeline.student.dataset import LogitCacheDataset

SHARD = "data/shard-00001.parquet"  # the shard the tests damage (a middle one)
runner = CliRunner()


# --- the damage ----------------------------------------------------------------------------


def _edit_manifest(cache: Path, edit: Callable[[dict], None]) -> None:
    path = cache / "manifest.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _entry(data: dict, rel: str = SHARD) -> dict:
    (entry,) = [s for s in data["shards"] if s["path"] == rel]
    return entry


def flip_a_byte(cache: Path) -> None:
    path = cache / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(cache: Path) -> None:
    path = cache / SHARD
    path.write_bytes(path.read_bytes()[:-100])


def delete(cache: Path) -> None:
    (cache / SHARD).unlink()


def add_unknown_shard(cache: Path) -> None:
    (cache / "data" / "shard-09999.parquet").write_bytes((cache / SHARD).read_bytes())


def edit_row_count(cache: Path) -> None:
    _edit_manifest(cache, lambda d: _entry(d).update(rows=_entry(d)["rows"] + 1))


def edit_sha256(cache: Path) -> None:
    _edit_manifest(cache, lambda d: _entry(d).update(sha256="0" * 64))


def edit_k(cache: Path) -> None:
    _edit_manifest(cache, lambda d: d.update(k=d["k"] + 1))


def remove_shard_entry(cache: Path) -> None:
    _edit_manifest(cache, lambda d: d["shards"].remove(_entry(d)))


# case -> (damage, the shard named first, what verify says about it, what stage 2 says)
CASES = {
    "flipped byte": (flip_a_byte, SHARD, "sha256 differs from the manifest", "sha256 differs from the manifest"),
    "truncated shard": (truncate, SHARD, "bytes, the manifest says", "bytes, the manifest says"),
    "deleted shard": (delete, SHARD, "missing", "shard missing"),
    "manifest row count edited": (edit_row_count, SHARD, "rows", "rows, the manifest says"),
    "manifest sha256 edited": (edit_sha256, SHARD, "sha256 differs from the manifest", "sha256 differs from the manifest"),
    # every shard disagrees with the new k: the first is named
    "manifest k edited": (edit_k, "data/shard-00000.parquet", "schema differs", "columns differ from the manifest's"),
}
# Damage that stage 2 does not refuse: it reads the shards the manifest lists, all sound.
READ_ON = {
    "unknown extra shard": (add_unknown_shard, "data/shard-09999.parquet", "not listed in the manifest"),
    "shard entry removed from the manifest": (remove_shard_entry, SHARD, "not listed in the manifest"),
}


# --- verify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_verify_names_the_damaged_shard_and_exits_nonzero(case, cache_copy):
    damage, shard, words, _ = CASES[case]
    damage(cache_copy)

    r = runner.invoke(app, ["verify", str(cache_copy)])

    assert r.exit_code == 1, r.output
    assert r.output.startswith("FAILED") and "Traceback" not in r.output
    assert any(shard in line and words in line for line in r.output.splitlines()), r.output


@pytest.mark.parametrize("case", READ_ON)
def test_verify_names_a_shard_the_manifest_does_not_list(case, cache_copy):
    damage, named, words = READ_ON[case]
    damage(cache_copy)

    r = runner.invoke(app, ["verify", str(cache_copy)])

    assert r.exit_code == 1, r.output
    assert any(named in line and words in line for line in r.output.splitlines()), r.output


@pytest.fixture(scope="module")
def compact_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    from conftest import make_config

    from logitcache.pipeline.teacher.run import run_teacher

    out = tmp_path_factory.mktemp("compact") / "cache"
    run_teacher(make_config(teacher_dir, data_file, out, codec="compact"), progress=False)
    return out


def test_an_edited_k_is_caught_in_a_compact_cache_too(compact_cache, tmp_path):
    """The compact columns are the same for every k: the shard's footer records its k."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(compact_cache, cache)
    edit_k(cache)

    r = runner.invoke(app, ["verify", str(cache)])
    with pytest.raises(LogitCacheError, match="shard-00000.parquet: the shard holds top-8 entries, the manifest says k=9"):
        LogitCacheDataset(cache)

    assert r.exit_code == 1 and "the shard holds top-8 entries, the manifest says k=9" in r.output, r.output


# --- stage 2 refuses to start ----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_dataset_refuses_at_construction_naming_shard_verify_and_skip_flag(case, cache_copy):
    damage, shard, _, words = CASES[case]
    damage(cache_copy)

    with pytest.raises(LogitCacheError) as e:
        LogitCacheDataset(cache_copy, shuffle=False)

    msg = str(e.value)
    assert "\n" not in msg
    for needle in (shard, words, "logitcache verify", "--skip-bad-shards"):
        assert needle in msg, msg


def test_a_shard_damaged_after_the_start_is_caught_when_read(cache_copy):
    ds = LogitCacheDataset(cache_copy, shuffle=False)  # sound at construction
    flip_a_byte(cache_copy)
    first_shard_rows = len(_ids(cache_copy, "data/shard-00000.parquet"))

    got = []
    with pytest.raises(LogitCacheError, match=r"shard-00001.parquet: shard sha256 differs .*logitcache verify"):
        for row in ds:
            got.append(row)

    assert len(got) == first_shard_rows


def test_dataset_refusal_counts_the_other_bad_shards(cache_copy):
    flip_a_byte(cache_copy)
    (cache_copy / "data" / "shard-00002.parquet").unlink()

    with pytest.raises(LogitCacheError, match=r"shard-00001.*\(and 1 more bad shard\(s\)\)"):
        LogitCacheDataset(cache_copy)


def _ids(cache: Path, shard: str | None = None) -> set[str]:
    if shard is not None:
        return set(pq.read_table(cache / shard, columns=["id"]).column("id").to_pylist())
    return {row["id"] for row in LogitCacheDataset(cache, shuffle=False)}


@pytest.mark.parametrize("case", READ_ON)
def test_dataset_reads_only_the_shards_the_manifest_lists(case, cache_copy):
    damage, _, _ = READ_ON[case]
    lost = _ids(cache_copy, SHARD) if case.startswith("shard entry removed") else set()
    everything = _ids(cache_copy)
    damage(cache_copy)

    assert _ids(cache_copy) == everything - lost


def test_train_refuses_to_start_with_one_line(tmp_path, cache_copy, student):
    flip_a_byte(cache_copy)

    r = runner.invoke(app, ["train", "--student", str(student), "--cache", str(cache_copy), "--out",
                            str(tmp_path / "run"), "--loss", "kl", "--no-progress"])

    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output
    assert SHARD in errors[0] and "logitcache verify" in errors[0] and "--skip-bad-shards" in errors[0]
    assert not (tmp_path / "run").exists()


# --- --skip-bad-shards -----------------------------------------------------------------------


def test_skip_bad_shards_reads_every_other_example_once(cache_copy):
    lost = _ids(cache_copy, SHARD)
    everything = _ids(cache_copy)
    flip_a_byte(cache_copy)

    ds = LogitCacheDataset(cache_copy, shuffle=False, skip_bad_shards=True)
    ids = [row["id"] for row in ds]

    assert len(ids) == len(set(ids)) == len(ds) == 24 - len(lost)
    assert set(ids) == everything - lost


def test_skip_bad_shards_names_the_shards_and_counts_the_examples(cache_copy):
    lost = len(_ids(cache_copy, SHARD)) + len(_ids(cache_copy, "data/shard-00002.parquet"))
    flip_a_byte(cache_copy)
    (cache_copy / "data" / "shard-00002.parquet").unlink()

    ds = LogitCacheDataset(cache_copy, skip_bad_shards=True)

    assert ds.skipped_summary() == (
        f"{cache_copy}: skipped 2 bad shard(s) ({lost} examples): data/shard-00001.parquet, data/shard-00002.parquet"
    )
    assert [b.reason.split(" ")[0:2] for b in ds.skipped_shards] == [["shard", "sha256"], ["shard", "missing"]]


def test_skip_bad_shards_refuses_when_no_shard_is_left(cache_copy):
    edit_k(cache_copy)  # every shard now disagrees with the manifest

    with pytest.raises(LogitCacheError, match=r"all \d+ shards are bad .*nothing is left to read"):
        LogitCacheDataset(cache_copy, skip_bad_shards=True)


def test_skip_bad_shards_on_a_sound_cache_skips_nothing(built_cache):
    ds = LogitCacheDataset(built_cache, skip_bad_shards=True)

    assert ds.skipped_shards == [] and ds.skipped_summary() is None and len(ds) == 24


def test_train_with_skip_bad_shards_trains_and_reports_the_loss(tmp_path, cache_copy, student):
    lost = len(_ids(cache_copy, SHARD))
    flip_a_byte(cache_copy)

    r = runner.invoke(app, ["train", "--student", str(student), "--cache", str(cache_copy), "--out",
                            str(tmp_path / "run"), "--loss", "kl", "--max-steps", "1", "--batch-size", "4",
                            "--skip-bad-shards", "--no-progress"])

    assert r.exit_code == 0, r.output
    assert f"skipped 1 bad shard(s) ({lost} examples): {SHARD}" in r.output
    assert "trained kl student for 1 steps" in r.output
