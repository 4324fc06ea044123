"""A cache written with --codec compact: verified, read, streamed and trained on like v1."""

import numpy as np
import pytest
from conftest import make_config

from logitcache import LogitCacheError, open_cache, verify_cache
from logitcache.pipeline.teacher.run import run_teacher
from logitcache.storage.codec import ERROR_BOUND_NATS


@pytest.fixture(scope="module")
def compact_cache(tmp_path_factory, teacher_dir, data_file):
    out = tmp_path_factory.mktemp("compact") / "cache"
    run_teacher(make_config(teacher_dir, data_file, out, codec="compact"), progress=False)
    return out


def test_compact_cache_verifies_and_records_its_codec(compact_cache):
    report = verify_cache(compact_cache)
    assert report.ok, report.problems
    assert open_cache(compact_cache).manifest.codec == "compact"


def test_compact_rows_match_v1_rows_within_the_codec_bound(compact_cache, built_cache):
    v1 = {row["id"]: row for row in open_cache(built_cache)}
    rows = list(open_cache(compact_cache))
    assert len(rows) == len(v1) == 24
    for row in rows:
        ref = v1[row["id"]]
        for key in ("text", "prompt_chars", "input_ids", "char_start", "char_end", "topk_ids", "label_logprob"):
            np.testing.assert_array_equal(np.asarray(row[key]), np.asarray(ref[key]), err_msg=key)
        # v1 holds fp16 (|lp| * 2^-11 from the engine's fp32); compact is within its bound of the fp32
        lp, lp16 = row["topk_logprobs"].astype(np.float64), ref["topk_logprobs"].astype(np.float64)
        assert (np.abs(lp - lp16) <= ERROR_BOUND_NATS + np.abs(lp16) * 2.0**-11 + 1e-9).all()


def test_random_access_and_the_student_dataset_read_compact(compact_cache, built_cache):
    from logitcache.pipeline.student.dataset import LogitCacheDataset
    from logitcache.pipeline.tiny import generate_corpus, train_unigram_tokenizer

    c = open_cache(compact_cache)
    assert c["ex-00023"]["topk_ids"].tolist() == open_cache(built_cache)["ex-00023"]["topk_ids"].tolist()
    tok = train_unigram_tokenizer(generate_corpus(500, 7), 300)
    examples = list(LogitCacheDataset(compact_cache, tok, shuffle=True, seed=1))
    assert len(examples) == 24 and all("teacher_logprobs" in e for e in examples)


def test_rerun_with_the_other_codec_refuses(compact_cache, teacher_dir, data_file):
    with pytest.raises(LogitCacheError, match="codec"):
        run_teacher(make_config(teacher_dir, data_file, compact_cache, codec="v1"), progress=False)


def test_unknown_codec_is_refused(tmp_path, teacher_dir, data_file):
    with pytest.raises(LogitCacheError, match="codec"):
        run_teacher(make_config(teacher_dir, data_file, tmp_path / "c", codec="zip"), progress=False)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_compact_parts_merge_and_verify(tmp_path, teacher_dir, data_file):
    from logitcache.storage.merge import merge_caches

    parts = tmp_path / "parts"
    for i in range(2):
        run_teacher(make_config(teacher_dir, data_file, parts, codec="compact", num_workers=2, worker_index=i), progress=False)
    merge_caches(tmp_path / "merged", sorted(parts.iterdir()))
    assert verify_cache(tmp_path / "merged").ok and len(list(open_cache(tmp_path / "merged"))) == 24


def test_cli_writes_inspects_and_verifies_a_compact_cache(tmp_path, teacher_dir, data_file):
    from typer.testing import CliRunner

    from logitcache.cli import app

    out = tmp_path / "c"
    runner = CliRunner()
    r = runner.invoke(app, ["teacher", "--model", str(teacher_dir), "--data", str(data_file), "--out", str(out),
                            "--top-k", "8", "--codec", "compact", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["inspect", str(out)]).exit_code == 0
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 0 and r.output.startswith("OK"), r.output


def test_a_shard_from_a_newer_codec_version_is_refused_in_one_line(compact_cache, tmp_path):
    """A shard whose sha256 is right but whose codec version this logitcache does not know (a
    newer writer): the reader and verify name the version and the fix, no traceback."""
    import hashlib
    import json
    import shutil

    import pyarrow.parquet as pq

    from logitcache.pipeline.student.dataset import LogitCacheDataset
    from logitcache.storage.codec import META_IDS, META_VERSION, PARQUET_OPTIONS

    cache = tmp_path / "cache"
    shutil.copytree(compact_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    shard = manifest["shards"][0]
    path = cache / shard["path"]
    f = pq.ParquetFile(path)
    schema = f.schema_arrow.with_metadata({**f.schema_arrow.metadata, META_VERSION: b"9"})
    ids = f.metadata.metadata[META_IDS]
    table = f.read().replace_schema_metadata(schema.metadata)
    with pq.ParquetWriter(path, schema, **PARQUET_OPTIONS) as w:
        w.write_table(table)
        w.add_key_value_metadata({META_IDS: ids})
    shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    shard["bytes"] = path.stat().st_size
    (cache / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(LogitCacheError, match="version 9.*upgrade logitcache"):
        list(LogitCacheDataset(cache, None, shuffle=False))
    report = verify_cache(cache)
    assert not report.ok and any("version 9" in p for p in report.problems), report.problems
