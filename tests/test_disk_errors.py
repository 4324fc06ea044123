"""A full disk or a failing one stops stage 1 with one clear line; the rerun resumes exactly.

The failures are simulated where the bytes go: pyarrow's shard writes, the rename that
publishes the manifest, the tokenizer copy, and (through the command line) a crash point
that raises instead of killing.
"""

from __future__ import annotations

import errno
import os
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import make_config
from typer.testing import CliRunner

from logitcache import verify_cache
from logitcache.cli import app
from logitcache.pipeline.teacher.run import run_teacher
from logitcache.storage import fsutil
from logitcache.storage.lock import LOCK_NAME
from logitcache.storage.manifest import MANIFEST_NAME, load_manifest
from logitcache.storage.writer import CacheWriteError


def fail_on_call(monkeypatch, owner, name: str, n: int, code: int, when=lambda *a, **k: True, torn=False) -> list:
    """Make ``owner.name`` raise OSError(code) on its n-th call that matches ``when``;
    ``torn``: after doing its work, as a write whose data went out but whose flush failed."""
    real = getattr(owner, name)
    calls = []

    def flaky(*args, **kwargs):
        if when(*args, **kwargs):
            calls.append(args)
            if len(calls) == n:
                if torn:
                    real(*args, **kwargs)
                raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    return calls


def assert_stopped_cleanly(out) -> None:
    """Finished shards and manifest valid, nothing half-written in sight, lock released."""
    report = verify_cache(out)
    assert report.ok, report.problems
    assert load_manifest(out).status == "partial"
    assert [p.name for p in out.rglob(".*")] == [], "temp files or the lock were left behind"


def rows_of(cache) -> list:
    m = load_manifest(cache)
    return [row for s in m.shards for row in pq.read_table(cache / s.path).to_pylist()]


def test_no_space_while_writing_a_shard_stops_with_one_clear_message(tmp_path, teacher_dir, data_file, monkeypatch):
    out = tmp_path / "cache"
    fail_on_call(monkeypatch, pq.ParquetWriter, "write_table", 3, errno.ENOSPC)

    with pytest.raises(CacheWriteError) as e:
        run_teacher(make_config(teacher_dir, data_file, out), progress=False)

    message = str(e.value)
    assert "\n" not in message and e.value.errno == errno.ENOSPC
    for needle in ("no space left", "data/shard-", "free some space", "rerun the same command to resume"):
        assert needle in message, message


def test_no_space_mid_shard_keeps_the_finished_shards_and_drops_the_torn_one(tmp_path, teacher_dir, data_file, monkeypatch):
    out = tmp_path / "cache"
    # The row group reached the file before the error: finishing that shard would store it twice.
    fail_on_call(monkeypatch, pq.ParquetWriter, "write_table", 3, errno.ENOSPC, torn=True)

    with pytest.raises(CacheWriteError):
        run_teacher(make_config(teacher_dir, data_file, out), progress=False)

    assert_stopped_cleanly(out)
    ids = [row["id"] for row in rows_of(out)]
    assert len(ids) > 0, "the shards finished before the failure are kept"
    assert len(ids) == len(set(ids)) == load_manifest(out).num_examples


def test_rerun_after_space_is_freed_completes_the_same_cache(tmp_path, teacher_dir, data_file, built_cache, monkeypatch):
    out = tmp_path / "cache"
    with monkeypatch.context() as m:
        fail_on_call(m, pq.ParquetWriter, "write_table", 3, errno.ENOSPC)
        with pytest.raises(CacheWriteError):
            run_teacher(make_config(teacher_dir, data_file, out), progress=False)

    r = run_teacher(make_config(teacher_dir, data_file, out), progress=False)

    assert r.already_done > 0 and r.complete and verify_cache(out).ok
    assert [row["id"] for row in rows_of(out)] == [row["id"] for row in rows_of(built_cache)]


def test_io_error_publishing_the_manifest_keeps_the_previous_one(tmp_path, teacher_dir, data_file, monkeypatch):
    out = tmp_path / "cache"
    # The 3rd manifest rename: the one after the 2nd shard (the 1st is the new cache's).
    fail_on_call(monkeypatch, fsutil.os, "replace", 3, errno.EIO, when=lambda src, dst: str(dst).endswith(MANIFEST_NAME))

    with pytest.raises(CacheWriteError, match=r"I/O error \(EIO\) while updating manifest.json.*check the disk"):
        run_teacher(make_config(teacher_dir, data_file, out), progress=False)

    assert_stopped_cleanly(out)
    assert len(load_manifest(out).shards) == 1
    assert sorted(p.name for p in (out / "data").iterdir()) == ["shard-00000.parquet"], "the unlisted shard is gone"


def test_no_space_while_creating_the_cache_is_redone_by_the_rerun(tmp_path, teacher_dir, data_file, built_cache, monkeypatch):
    out = tmp_path / "cache"
    with monkeypatch.context() as m:
        fail_on_call(m, shutil, "copyfile", 2, errno.ENOSPC)  # the tokenizer copy, its second file
        with pytest.raises(CacheWriteError, match="no space left on the device while creating the cache"):
            run_teacher(make_config(teacher_dir, data_file, out), progress=False)
        assert not (out / MANIFEST_NAME).exists()

    run_teacher(make_config(teacher_dir, data_file, out), progress=False)

    assert verify_cache(out).ok and len(rows_of(out)) == len(rows_of(built_cache))


def test_the_command_line_prints_one_line_and_exits_nonzero(tmp_path, teacher_dir, data_file, monkeypatch):
    out = tmp_path / "cache"
    monkeypatch.setattr(fsutil, "_crash_counts", {})
    monkeypatch.setenv(fsutil.CRASH_ENV, "shard.row_group:3:ENOSPC")
    args = ["teacher", "--model", teacher_dir, "--data", data_file, "--out", out, "--top-k", 8,
            "--prompt-field", "prompt", "--response-field", "response", "--shard-size-mb", 0.005, "--no-progress"]

    r = CliRunner().invoke(app, [str(a) for a in args])

    assert r.exit_code == 2
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no space left on the device while writing shard" in errors[0], r.output
    assert not (out / LOCK_NAME).exists()
