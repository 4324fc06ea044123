"""Reading a cache from object storage: a real S3 API on loopback (moto's server, tests/conftest.py).

The cache is built locally and uploaded with fsspec, as any copy tool would; every read then
goes through our URL code: the manifest fetched, the tokenizer downloaded and checked, each
row group one ranged GET checked against its sha256 before it is parsed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.errors import LogitCacheError
from logitcache.pipeline.student.dataset import LogitCacheDataset
from logitcache.storage import load_manifest, open_cache, verify_cache


def upload(local: Path, url: str) -> str:
    fs = fsspec.filesystem("s3")
    fs.put(str(local), url.removeprefix("s3://"), recursive=True)
    return url


@pytest.fixture
def s3_cache(built_cache, s3_bucket) -> str:
    return upload(built_cache, f"{s3_bucket}/cache")


def replace_object(url: str, change) -> None:
    """Overwrite an object with ``change(bytes)``, as a writer replacing it after the manifest would."""
    fs = fsspec.filesystem("s3")
    path = url.removeprefix("s3://")
    data = bytearray(fs.cat_file(path))
    fs.pipe_file(path, bytes(change(data)))


def flip_in_row_group(cache_url: str, shard: int = 0, group: int = 1) -> str:
    """Flip one byte inside row group ``group`` of shard ``shard`` (same size); returns the shard's path."""
    info = open_cache(cache_url).manifest.shards[shard]
    offset, length, _ = info.row_groups[group]

    def flip(data: bytearray) -> bytearray:
        data[offset + length // 2] ^= 0xFF
        return data

    replace_object(f"{cache_url}/{info.path}", flip)
    return info.path


def rows_equal(a: dict, b: dict) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k]
                                        for k in a)


def cli(*args: str) -> subprocess.CompletedProcess:
    """The console script in its own process (the environment points s3fs at the loopback server)."""
    return subprocess.run([sys.executable, "-m", "logitcache", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LOGITCACHE_NO_PROGRESS": "1"})


def test_the_writer_records_each_row_group_and_the_footer_with_its_sha256(built_cache):
    m = load_manifest(built_cache)

    for info in m.shards:
        segments = [*info.row_groups, info.footer]
        assert [s[0] for s in segments] == [0] + [a + n for a, n, _ in segments[:-1]], "contiguous, from byte 0"
        assert sum(n for _, n, _ in segments) == info.bytes


def test_reading_from_s3_gives_the_rows_of_the_local_cache(built_cache, s3_cache):
    local, remote = open_cache(built_cache), open_cache(s3_cache)

    assert remote.manifest.shards == local.manifest.shards
    pairs = list(zip(local, remote, strict=True))
    assert len(pairs) == 24 and all(rows_equal(a, b) for a, b in pairs)
    some_id = pairs[17][0]["id"]
    assert rows_equal(remote[some_id], local[some_id])


def test_a_row_group_is_fetched_by_range_not_the_whole_shard(s3_cache):
    cache = open_cache(s3_cache)
    info = cache.manifest.shards[0]
    f = cache.remote._segment_file(info)

    import pyarrow.parquet as pq

    pq.ParquetFile(f, metadata=f.metadata()).read_row_group(1)

    assert f.fetched == info.footer[1] + info.row_groups[1][1] < info.bytes


def test_the_teacher_tokenizer_is_downloaded_and_checked(s3_cache, built_cache):
    cache = open_cache(s3_cache)

    tok = cache.verified_tokenizer_dir()

    assert sorted(p.name for p in tok.iterdir()) == sorted(p.name for p in (built_cache / "tokenizer").iterdir())


def test_two_ranks_read_every_example_exactly_once_from_s3(s3_cache, built_cache):
    ids = []
    for rank in (0, 1):
        ds = LogitCacheDataset(s3_cache, None, rank=rank, world_size=2, seed=3, shuffle_buffer=5)
        ids += [row["id"] for row in ds]

    assert sorted(ids) == sorted(open_cache(built_cache).ids())  # 24 examples: no padding


def test_dataloader_workers_read_every_example_once_from_s3(s3_cache):
    from torch.utils.data import DataLoader

    ds = LogitCacheDataset(s3_cache, None, rank=0, world_size=1, num_workers=2, batch_size=4)

    ids = [row["id"] for row in DataLoader(ds, batch_size=None, num_workers=2)]  # forked: each its own client

    assert len(ids) == 24 and len(set(ids)) == 24


def test_verify_a_url_through_the_console_script(s3_cache):
    r = cli("verify", s3_cache)

    assert r.returncode == 0 and r.stdout.startswith(f"OK {s3_cache}: 4 shards, 24 examples"), r.stdout + r.stderr


def test_inspect_a_url_through_the_console_script(s3_cache):
    r = cli("inspect", s3_cache, "--tokens", "4")

    assert r.returncode == 0 and f"cache {s3_cache}" in r.stdout, r.stderr


def test_an_object_replaced_after_the_manifest_is_named_by_verify(s3_cache):
    path = flip_in_row_group(s3_cache)

    report = verify_cache(s3_cache)

    assert report.problems == [f"{path} row group 1: sha256 differs from the manifest (the object was replaced "
                               "or damaged after the manifest was written)"]


def test_training_refuses_a_replaced_object_naming_shard_and_row_group(s3_cache):
    path = flip_in_row_group(s3_cache)
    ds = LogitCacheDataset(s3_cache, None, shuffle=False, rank=0, world_size=1)  # sizes and footers are sound

    with pytest.raises(LogitCacheError, match=rf"{s3_cache}/{path} row group 1: sha256 differs.*--skip-bad-shards"):
        list(ds)


def test_skip_bad_shards_passes_over_a_replaced_row_group(s3_cache):
    flip_in_row_group(s3_cache)
    ds = LogitCacheDataset(s3_cache, None, shuffle=False, rank=0, world_size=1, skip_bad_shards=True)

    rows = list(ds)

    assert ds.bad_row_groups == {(0, 1)} and 0 < len(rows) < 24


def test_train_through_the_cli_refuses_a_replaced_object(s3_cache, student, tmp_path):
    path = flip_in_row_group(s3_cache)

    r = CliRunner().invoke(app, ["train", "--student", str(student), "--cache", s3_cache, "--out", str(tmp_path / "o"),
                                 "--loss", "kl", "--max-steps", "2", "--batch-size", "2", "--no-progress"])

    assert r.exit_code != 0 and f"{path} row group 1: sha256 differs" in r.output and "Traceback" not in r.output


def test_train_with_local_cache_reads_through_verified_copies(s3_cache, student, tmp_path):
    copies = tmp_path / "copies"

    r = CliRunner().invoke(app, ["train", "--student", str(student), "--cache", s3_cache, "--out", str(tmp_path / "o"),
                                 "--loss", "kl", "--max-steps", "2", "--batch-size", "2", "--no-progress",
                                 "--local-cache", str(copies)])

    assert r.exit_code == 0, r.output
    assert len(list((copies / "shards").glob("*.parquet"))) == len(open_cache(s3_cache).manifest.shards)


def test_a_cache_without_row_group_digests_is_read_whole_and_checked(built_cache, s3_bucket, tmp_path):
    old = tmp_path / "old"
    import shutil

    shutil.copytree(built_cache, old)
    data = json.loads((old / "manifest.json").read_text())
    for shard in data["shards"]:  # as written before the digests existed
        del shard["row_groups"], shard["footer"]
    (old / "manifest.json").write_text(json.dumps(data))
    url = upload(old, f"{s3_bucket}/old")

    assert len(list(open_cache(url))) == 24
    replace_object(f"{url}/{data['shards'][0]['path']}", lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:])
    assert verify_cache(url).problems == [f"{data['shards'][0]['path']}: sha256 differs from the manifest "
                                          "(the object was replaced or damaged after the manifest was written)"]


def test_local_cache_keeps_verified_copies_reused_and_refetched_when_damaged(s3_cache, tmp_path):
    local = tmp_path / "copies"
    first = open_cache(s3_cache, local_cache=local)
    rows = len(list(first))
    copies = sorted((local / "shards").glob("*.parquet"))
    assert rows == 24 and [p.stem for p in copies] == sorted(s.sha256 for s in first.manifest.shards)

    stamp = {p: p.stat().st_mtime_ns for p in copies}
    assert len(list(open_cache(s3_cache, local_cache=local))) == 24
    assert {p: p.stat().st_mtime_ns for p in copies} == stamp, "reused, not fetched again"

    damaged = copies[0]
    damaged.write_bytes(b"x" * damaged.stat().st_size)
    assert verify_cache(s3_cache, local_cache=local).ok
    assert damaged.read_bytes() != b"x" * damaged.stat().st_size, "fetched again"


@pytest.mark.parametrize("args, needle", [
    (["train", "--cache", "s3://no-such-bucket-here/cache"], "the bucket 'no-such-bucket-here' does not exist"),
    (["train", "--cache", "foo://bucket/cache"], "unknown protocol foo://"),
    (["inspect", "s3://no-such-bucket-here/cache"], "the bucket 'no-such-bucket-here' does not exist"),
    (["inspect", "s3://test-bucket-that-is-empty/cache"], "no manifest.json there"),
    (["inspect", "foo://bucket/cache"], "unknown protocol foo://"),
    (["verify", "s3://no-such-bucket-here/cache", "--local-cache", __file__], "--local-cache"),
])
def test_a_missing_bucket_or_unknown_protocol_is_one_line(args, needle, s3_endpoint, student, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="test-bucket-that-is-empty")
    if args[0] == "train":
        args = [*args, "--student", str(student), "--out", str(tmp_path / "o"), "--no-progress"]

    r = CliRunner().invoke(app, args)

    assert r.exit_code != 0 and needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not Path("s3:").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_train_from_the_s3_cache(s3_cache, student, tmp_path):
    """DDP with gloo from the remote cache: each rank streams its own half, as from a local one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGITCACHE_NO_PROGRESS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
        "-m", "logitcache", "train", "--student", str(student), "--cache", s3_cache,
        "--out", str(tmp_path / "ddp"), "--loss", "kl", "--max-steps", "6", "--batch-size", "2",
        "--save-steps", "6", "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    states = [json.loads((tmp_path / "ddp" / "checkpoint-6" / f"logitcache_data_state_rank{i}.json").read_text())
              for i in (0, 1)]
    assert [sum(s["consumed"].values()) for s in states] == [12, 12]  # one epoch: 24 examples, 12 per rank


def flaky_fetches(monkeypatch, cache, errors: list[BaseException]) -> None:
    """The storage drops the next ``len(errors)`` GETs (a reset connection), then answers."""
    fs = cache.remote.fs
    real, left = fs.cat_file, list(errors)

    def cat_file(*args, **kwargs):
        if left:
            raise left.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", cat_file)


def test_a_network_error_mid_read_is_retried(s3_cache, monkeypatch):
    cache = open_cache(s3_cache)
    flaky_fetches(monkeypatch, cache, [ConnectionError("connection reset by peer")] * 2)

    assert len(list(cache)) == 24


def test_a_network_error_that_lasts_is_one_line_naming_the_shard(s3_cache, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_REMOTE_RETRIES", "2")
    cache = open_cache(s3_cache)
    flaky_fetches(monkeypatch, cache, [ConnectionError("connection reset by peer")] * 100)

    with pytest.raises(LogitCacheError, match=rf"^{s3_cache}/data/shard-00000.parquet: the storage did not answer "
                                              r"after 2 tries \(connection reset by peer\)"):
        list(cache)


def test_hub_urls_name_their_files_as_the_hub_does():
    """hf:// cannot be reached from here: the path handling, without the network."""
    pytest.importorskip("huggingface_hub")
    from logitcache.storage.remote_cache import RemoteCache

    cache = RemoteCache("hf://datasets/me/cache/")

    assert cache.root == "datasets/me/cache"
    assert cache.url / "data/shard-00000.parquet" == "hf://datasets/me/cache/data/shard-00000.parquet"


def test_a_compact_cache_reads_from_s3_as_from_disk(built_cache, s3_bucket, tmp_path):
    from logitcache.storage.convert import convert_cache

    compact = tmp_path / "compact"
    convert_cache(built_cache, compact, "compact", shard_bytes=6_000, row_group_bytes=2_000)  # its id table: in the footer
    url = upload(compact, f"{s3_bucket}/compact")

    local, remote = open_cache(compact), open_cache(url)

    assert any(len(s.row_groups) > 1 for s in remote.manifest.shards)
    assert all(rows_equal(a, b) for a, b in zip(local, remote, strict=True))
    assert verify_cache(url).ok


def test_a_cache_being_written_to_s3_can_be_followed(built_cache, s3_bucket):
    """The teacher uploads each shard, then the manifest listing it: a followed epoch re-reads the
    manifest object and takes every example once, whenever its shard arrived."""
    import dataclasses
    import threading
    import time

    from logitcache.pipeline.student.follow import Follow

    url = upload(built_cache, f"{s3_bucket}/growing")
    fs, full = fsspec.filesystem("s3"), load_manifest(built_cache)

    def list_shards(n: int) -> None:
        m = dataclasses.replace(full, shards=full.shards[:n], status="complete" if n == len(full.shards) else "partial")
        fs.pipe_file(f"{url.removeprefix('s3://')}/manifest.json", json.dumps(m.to_dict()).encode())

    list_shards(1)
    ds = LogitCacheDataset(url, follow=Follow(poll=0.01, announce=False), shuffle_buffer=4, seed=3)
    grower = threading.Thread(target=lambda: [(time.sleep(0.05), list_shards(n)) for n in range(2, len(full.shards) + 1)])
    grower.start()
    ids = [row["id"] for row in ds]
    grower.join()

    assert sorted(ids) == sorted(open_cache(built_cache).ids())
