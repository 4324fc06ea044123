"""`logitcache copy` / `push` / `pull`: a cache moved between a local disk and a loopback S3 server,
verified against the manifest's sha256, resumable, with the manifest written last."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from logitcache import LogitCacheError, verify_cache
from logitcache.cli import app
from logitcache.storage.fsutil import CRASH_ENV
from logitcache.storage.manifest import load_manifest
from logitcache.storage.remote import url_fs
from logitcache.storage.sync import copy_cache

runner = CliRunner()


def _files(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def _objects(url: str) -> list[str]:
    fs, root = url_fs(url)
    fs.invalidate_cache()
    return sorted(p[len(root) + 1:] for p in fs.find(root))


def test_a_cache_copied_to_s3_and_back_is_the_same_bytes(built_cache, s3_bucket, tmp_path):
    url = f"{s3_bucket}/copies/a"

    copy_cache(str(built_cache), url)
    copy_cache(url, str(tmp_path / "back"))

    assert _files(tmp_path / "back") == _files(built_cache)
    assert verify_cache(tmp_path / "back").ok


def test_a_second_copy_sends_only_the_card_and_the_manifest(built_cache, s3_bucket):
    url = f"{s3_bucket}/cache"
    first = copy_cache(str(built_cache), url)

    again = copy_cache(str(built_cache), url)

    assert again.copied == 2 and again.skipped == first.copied - 2


def test_s3_to_s3_goes_through_the_staging(built_cache, s3_bucket, tmp_path):
    a, b = f"{s3_bucket}/a", f"{s3_bucket}/b"
    copy_cache(str(built_cache), a)

    copy_cache(a, b, staging=tmp_path / "staging")

    assert _objects(a) == _objects(b)
    assert _files(tmp_path / "staging") == _files(built_cache)


def test_a_damaged_local_shard_is_never_published(cache_copy, s3_bucket):
    shard = cache_copy / load_manifest(cache_copy).shards[1].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    with pytest.raises(LogitCacheError, match="shard-00001.parquet: sha256 differs from the manifest"):
        copy_cache(str(cache_copy), f"{s3_bucket}/cache")

    assert "manifest.json" not in _objects(f"{s3_bucket}/cache")


def test_an_object_replaced_on_the_remote_is_caught_on_download(built_cache, s3_bucket, tmp_path):
    url = f"{s3_bucket}/cache"
    copy_cache(str(built_cache), url)
    fs, root = url_fs(url)
    rel = load_manifest(built_cache).shards[2].path
    fs.pipe_file(f"{root}/{rel}", (built_cache / load_manifest(built_cache).shards[0].path).read_bytes())

    with pytest.raises(LogitCacheError, match=f"{rel}: sha256 differs from the manifest"):
        copy_cache(url, str(tmp_path / "out"))

    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_directory_holding_something_else_is_refused_untouched(built_cache, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")

    with pytest.raises(LogitCacheError, match="not empty and holds no cache"):
        copy_cache(str(built_cache), str(tmp_path / "out"))

    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_a_killed_copy_resumes_with_the_same_command(built_cache, s3_bucket, tmp_path):
    url = f"{s3_bucket}/cache"
    cmd = [sys.executable, "-m", "logitcache", "copy", str(built_cache), url]

    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, CRASH_ENV: "upload.shard:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "manifest.json" not in _objects(url)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    assert r.returncode == 0, r.stderr
    assert "already there" in r.stdout
    copy_cache(url, str(tmp_path / "back"))
    assert _files(tmp_path / "back") == _files(built_cache)


def test_push_and_pull_are_copy_shorthands(built_cache, s3_bucket, tmp_path):
    url = f"{s3_bucket}/cache"

    pushed = runner.invoke(app, ["push", str(built_cache), url])
    pulled = runner.invoke(app, ["pull", url, str(tmp_path / "pulled")])

    assert pushed.exit_code == 0 and pulled.exit_code == 0, pushed.output + pulled.output
    assert "every shard and tokenizer file matched the manifest's sha256" in pulled.output
    assert _files(tmp_path / "pulled") == _files(built_cache)


def test_push_refuses_a_remote_source(s3_bucket):
    r = runner.invoke(app, ["push", f"{s3_bucket}/cache", "hf://datasets/me/cache"])

    assert r.exit_code != 0 and "logitcache copy SRC DST" in r.output


def test_convert_reads_and_writes_urls(built_cache, s3_bucket, tmp_path):
    source, out = f"{s3_bucket}/v1", f"{s3_bucket}/compact"
    copy_cache(str(built_cache), source)

    r = runner.invoke(app, ["convert", source, out, "--codec", "compact", "--local-cache", str(tmp_path / "staging")])

    assert r.exit_code == 0, r.output
    assert f"into {out} (compact)" in r.output
    back = tmp_path / "back"
    copy_cache(out, str(back))
    assert load_manifest(back).codec == "compact" and verify_cache(back).ok


def test_merge_joins_parts_written_to_s3(teacher_dir, data_file, built_cache, s3_bucket, tmp_path):
    from conftest import make_config

    from logitcache import open_cache
    from logitcache.pipeline.teacher.run import run_teacher

    run = f"{s3_bucket}/run"
    for i in range(2):
        run_teacher(make_config(teacher_dir, data_file, run, num_workers=2, worker_index=i,
                                local_cache=str(tmp_path / "teacher-staging")), progress=False)
    assert _objects(run)[0].startswith("part-00000-of-00002/")

    r = runner.invoke(app, ["merge", f"{s3_bucket}/merged", run, "--local-cache", str(tmp_path / "staging")])

    assert r.exit_code == 0, r.output
    merged = tmp_path / "merged"
    copy_cache(f"{s3_bucket}/merged", str(merged))
    assert verify_cache(merged).ok
    ids = lambda cache: sorted(row["id"] for row in open_cache(cache))  # noqa: E731
    assert ids(merged) == ids(built_cache)


def test_merge_refuses_a_url_that_already_holds_a_cache(built_cache, s3_bucket, tmp_path):
    copy_cache(str(built_cache), f"{s3_bucket}/merged")

    r = runner.invoke(app, ["merge", f"{s3_bucket}/merged", str(built_cache), "--local-cache", str(tmp_path / "s")])

    assert r.exit_code != 0 and "already holds a cache" in r.output
