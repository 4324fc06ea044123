"""Stage 1 writing to object storage: `teacher --out s3://...` against a real S3 API on loopback.

The cache is written in a local staging directory and uploaded shard by shard, the manifest
last; a rerun resumes from what the remote lists; a lease object keeps a second writer out.
Bad URLs, buckets and credentials are one line each, and leave nothing local behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import make_config

from logitcache import LogitCacheError, open_cache, verify_cache
from logitcache.pipeline.teacher.run import run_teacher
from logitcache.storage.lease import LEASE_NAME, Lease
from logitcache.storage.manifest import load_manifest
from logitcache.storage.remote import check_protocol, url_fs
from logitcache.storage.sync import Place, copy_cache, default_staging


def _content(cache_dir) -> dict:
    """Every example's text, ids and top-k ids, keyed by id (shard boundaries aside)."""
    return {row["id"]: (row["text"], list(row["input_ids"]), row["topk_ids"].tolist()) for row in open_cache(cache_dir)}


def _pulled(url: str, where: Path) -> Path:
    copy_cache(url, str(where))
    return where


def _objects(url: str) -> list[str]:
    fs, root = url_fs(url)
    fs.invalidate_cache()
    return sorted(p[len(root) + 1:] for p in fs.find(root))


def test_teacher_writes_a_cache_to_s3_that_equals_a_local_run(s3_bucket, teacher_dir, data_file, built_cache, tmp_path):
    url = f"{s3_bucket}/caches/run1"

    result = run_teacher(make_config(teacher_dir, data_file, url, local_cache=str(tmp_path / "staging")), progress=False)

    assert result.complete and result.out == url
    objects = _objects(url)
    assert "manifest.json" in objects and "README.md" in objects and LEASE_NAME not in objects
    assert any(o.startswith("tokenizer/") for o in objects)
    pulled = _pulled(url, tmp_path / "pulled")
    assert verify_cache(pulled).ok
    assert _content(pulled) == _content(built_cache)


def test_a_rerun_with_an_empty_staging_resumes_from_the_remote(s3_bucket, teacher_dir, data_file, built_cache, tmp_path):
    url = f"{s3_bucket}/cache"
    run_teacher(make_config(teacher_dir, data_file, url, limit=10, local_cache=str(tmp_path / "a")), progress=False)

    result = run_teacher(make_config(teacher_dir, data_file, url, local_cache=str(tmp_path / "b")), progress=False)

    assert result.already_done == 10 and result.written == 14
    assert _content(_pulled(url, tmp_path / "pulled")) == _content(built_cache)


def test_the_staging_drops_what_the_remote_does_not_list(s3_bucket, teacher_dir, data_file, built_cache, tmp_path):
    url = f"{s3_bucket}/cache"
    staging = tmp_path / "staging"
    run_teacher(make_config(teacher_dir, data_file, url, limit=10, local_cache=str(staging)), progress=False)
    # The remote goes back to an earlier state (its manifest listing fewer shards than the staging).
    fs, root = url_fs(url)
    m = json.loads(fs.cat_file(f"{root}/manifest.json"))
    m["shards"] = m["shards"][:1]
    fs.pipe_file(f"{root}/manifest.json", json.dumps(m).encode())

    result = run_teacher(make_config(teacher_dir, data_file, url, local_cache=str(staging)), progress=False)

    assert result.already_done == m["shards"][0]["rows"]
    assert len(load_manifest(staging).shards) == len(load_manifest(_pulled(url, tmp_path / "pulled")).shards)
    assert _content(tmp_path / "pulled") == _content(built_cache)


def test_the_default_staging_is_named_for_the_url(monkeypatch, tmp_path):
    monkeypatch.setenv("LOGITCACHE_STAGING", str(tmp_path))

    a, b = default_staging("s3://bucket/caches/run1"), default_staging("s3://bucket/caches/run2")

    assert a.parent == tmp_path and a != b and "bucket-caches-run1" in a.name


# --- the lease ------------------------------------------------------------------------------


def _foreign_lease(url: str, *, expires_in: float) -> None:
    fs, root = url_fs(url)
    expires = datetime.now(timezone.utc) + timedelta(seconds=expires_in)
    fs.pipe_file(f"{root}/{LEASE_NAME}", json.dumps({
        "owner": "someone", "host": "gpu-node-7", "pid": 4242, "command": "logitcache teacher ...",
        "doing": "writing to", "acquired": "2026-01-01T00:00:00+00:00", "expires": expires.isoformat(timespec="seconds"),
    }).encode())


def test_a_live_lease_of_another_writer_is_refused_naming_it(s3_bucket):
    url = f"{s3_bucket}/cache"
    _foreign_lease(url, expires_in=600)

    with pytest.raises(LogitCacheError, match=r"pid 4242 on host gpu-node-7.*lease expires at") as e:
        Lease(url).acquire()

    assert "\n" not in str(e.value)


def test_an_expired_lease_is_taken_over_with_a_notice(s3_bucket, capsys):
    url = f"{s3_bucket}/cache"
    _foreign_lease(url, expires_in=-5)

    with Lease(url) as lease:
        assert lease.taken_over["host"] == "gpu-node-7"
        assert "taking over the lease" in capsys.readouterr().err
    assert LEASE_NAME not in _objects(url)


def test_two_writers_at_once_get_one_lease(s3_bucket):
    url = f"{s3_bucket}/cache"
    with Lease(url):
        with pytest.raises(LogitCacheError, match="another logitcache process"):
            Lease(url).acquire()


def test_a_writer_whose_lease_was_taken_stops_before_publishing(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/cache"
    monkeypatch.setenv("LOGITCACHE_LEASE_SECONDS", "0.3")
    lease = Lease(url).acquire()
    try:
        _foreign_lease(url, expires_in=600)  # another writer took it while this one stalled
        lease._thread.join(2)  # the next renewal finds the lease changed

        with pytest.raises(LogitCacheError, match="was taken over by pid 4242"):
            lease.check()
    finally:
        lease.release()
    assert LEASE_NAME in _objects(url)  # the other writer's lease is not removed


def test_hf_urls_are_parsed_without_the_network(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("LOGITCACHE_STAGING", str(tmp_path))

    place = Place.of("hf://datasets/me/my-logits")

    assert check_protocol("hf://datasets/me/my-logits") == "hf"
    assert place.root == "datasets/me/my-logits" and not place.local
    assert place.path("data/shard-00000.parquet") == "datasets/me/my-logits/data/shard-00000.parquet"
    assert default_staging("hf://datasets/me/my-logits").name.startswith("datasets-me-my-logits")


# --- bad input through the console script ------------------------------------------------------


def _teacher(teacher_dir, data_file, out: str, cwd: Path, env: dict | None = None, *extra: str):
    return subprocess.run(
        [sys.executable, "-m", "logitcache", "teacher", "--model", str(teacher_dir), "--data", str(data_file),
         "--out", out, "--prompt-field", "prompt", "--response-field", "response", "--top-k", "8",
         "--local-cache", str(cwd / "staging"), *extra],
        capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ, **(env or {})},
    )


def _assert_one_line(r, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _nothing_local(cwd: Path) -> None:
    assert sorted(p.name for p in cwd.iterdir()) == [], "a local folder appeared (s3:, the staging ...)"


def test_a_missing_extra_is_one_line_and_creates_nothing(teacher_dir, data_file, tmp_path):
    # (an unknown protocol, and the other commands, are in tests/test_bad_inputs.py)
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here, so gs:// lacks no extra")
    except ImportError:
        pass
    r = _teacher(teacher_dir, data_file, "gs://bucket/cache", tmp_path)

    _assert_one_line(r, "pip install 'logitcache[gcs]'")
    _nothing_local(tmp_path)


def _teacher_here(teacher_dir, data_file, out: str, cwd: Path):
    """The same command in this process (the S3 server's address is in its environment)."""
    from typer.testing import CliRunner

    from logitcache.cli import app

    args = ["teacher", "--model", str(teacher_dir), "--data", str(data_file), "--out", out, "--prompt-field", "prompt",
            "--response-field", "response", "--top-k", "8", "--local-cache", str(cwd / "staging")]
    r = CliRunner().invoke(app, args)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def test_a_missing_bucket_is_one_line_and_creates_nothing(s3_endpoint, teacher_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    r = _teacher_here(teacher_dir, data_file, "s3://no-such-bucket-here/cache", tmp_path)

    _assert_one_line(r, "bucket no-such-bucket-here does not exist")
    _nothing_local(tmp_path)


def test_a_live_lease_is_one_line_and_creates_nothing(s3_bucket, teacher_dir, data_file, tmp_path, monkeypatch):
    url = f"{s3_bucket}/cache"
    _foreign_lease(url, expires_in=600)
    monkeypatch.chdir(tmp_path)

    r = _teacher_here(teacher_dir, data_file, url, tmp_path)

    _assert_one_line(r, "gpu-node-7", "lease expires at")
    _nothing_local(tmp_path)


@pytest.fixture(scope="module")
def auth_endpoint():
    """A second loopback S3 server, in its own process, that checks credentials (moto reads
    INITIAL_NO_AUTH_ACTION_COUNT once, at import, so the session's server cannot)."""
    pytest.importorskip("moto.server")
    code = ("import sys; from moto.server import ThreadedMotoServer; s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False); "
            "s.start(); print('%s:%s' % s.get_host_and_port(), flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         stderr=subprocess.DEVNULL, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield "http://" + p.stdout.readline().strip()
    finally:
        p.stdin.close()
        p.wait(30)


def test_wrong_credentials_are_one_line_and_create_nothing(auth_endpoint, teacher_dir, data_file, tmp_path):
    env = {"FSSPEC_S3_ENDPOINT_URL": auth_endpoint, "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong",
           "AWS_DEFAULT_REGION": "us-east-1"}

    r = _teacher(teacher_dir, data_file, "s3://some-bucket/cache", tmp_path, env)

    _assert_one_line(r, "refused the credentials", "AWS_ACCESS_KEY_ID")
    _nothing_local(tmp_path)


def test_teacher_help_names_the_staging(teacher_dir):
    r = subprocess.run([sys.executable, "-m", "logitcache", "teacher", "--help"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert "--local-cache" in r.stdout and "full local copy" in r.stdout


def test_the_lease_holder_is_this_host_when_it_is_ours(s3_bucket):
    url = f"{s3_bucket}/cache"
    with Lease(url):
        fs, root = url_fs(url)
        content = json.loads(fs.cat_file(f"{root}/{LEASE_NAME}"))
    assert content["host"] == socket.gethostname() and content["pid"] == os.getpid()


# --- killed at any upload point, the rerun completes the same remote cache ----------------------
# Uploads of the tiny cache of test_kill_anywhere.py (4 shards): the first push after the cache is
# created (tokenizer files, card, manifest #1), one per shard (#2-#5), the complete manifest (#6)
# and the final push with the card the writer rewrote (#7).
REMOTE_KILLS = [
    # (point, n, rerun with an empty staging: the machine was lost too)
    pytest.param("upload.shard", 1, False, id="first-shard-uploaded-not-listed"),
    pytest.param("upload.manifest", 3, True, id="second-shard-uploaded-new-staging"),
    pytest.param("upload.tokenizer", 1, False, id="tokenizer-half-uploaded-no-manifest", marks=pytest.mark.slow),
    pytest.param("upload.manifest", 1, False, id="before-the-first-manifest", marks=pytest.mark.slow),
    pytest.param("shard.published", 2, False, id="staging-ahead-of-the-remote", marks=pytest.mark.slow),
    pytest.param("upload.shard", 4, True, id="last-shard-uploaded-new-staging", marks=pytest.mark.slow),
    pytest.param("upload.manifest", 6, False, id="before-the-complete-manifest", marks=pytest.mark.slow),
    pytest.param("upload.manifest", 7, True, id="complete-remote-lease-left", marks=pytest.mark.slow),
]


def _remote_cli(argv: list[str], crash_at: str | None, log: str, env: dict) -> None:
    """Child process: the forkserver may predate the S3 server, so its address comes along."""
    os.environ.update(env)
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)
    from test_kill_anywhere import _cli

    _cli(argv, crash_at, log)


@pytest.fixture(scope="module")
def remote_launcher(s3_endpoint, teacher_dir, data_file, tmp_path_factory):
    from test_kill_anywhere import Launcher

    launcher = Launcher(teacher_dir, data_file, tmp_path_factory.mktemp("remote-logs"))
    launcher.env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                                  "FSSPEC_S3_ENDPOINT_URL")}
    return launcher


def _launch(launcher, out: str, staging: Path, crash_at: str | None = None) -> tuple[int | None, str]:
    log = launcher.logs / f"run-{len(list(launcher.logs.iterdir()))}.log"
    argv = launcher.args(out) + ["--local-cache", str(staging)]
    p = launcher.ctx.Process(target=_remote_cli, args=(argv, crash_at, str(log), launcher.env))
    p.start()
    p.join(180)
    if p.exitcode is None:
        p.kill()
        p.join()
    return p.exitcode, log.read_text() if log.exists() else ""


@pytest.fixture(scope="module")
def remote_reference(remote_launcher, tmp_path_factory):
    """The rows of an uninterrupted local run with the same flags."""
    from test_kill_anywhere import _rows

    out = tmp_path_factory.mktemp("remote-reference") / "cache"
    code, log = _launch(remote_launcher, str(out), out.parent / "unused")
    assert code == 0, log
    assert len(load_manifest(out).shards) == 4, "REMOTE_KILLS count on 4 shards"
    return _rows(out)


@pytest.mark.parametrize("point, n, new_staging", REMOTE_KILLS)
def test_killed_while_uploading_the_rerun_completes_the_same_remote_cache(
        remote_launcher, remote_reference, s3_bucket, tmp_path, point, n, new_staging):
    from test_kill_anywhere import _assert_same_as_reference

    url = f"{s3_bucket}/cache"
    code, log = _launch(remote_launcher, url, tmp_path / "staging", crash_at=f"{point}:{n}")
    assert code == -9, f"never reached {point} #{n} (exit {code}):\n{log}"

    code, log = _launch(remote_launcher, url, tmp_path / ("staging2" if new_staging else "staging"))

    assert code == 0, log
    assert "taking over the lease" in log and "no longer running" in log  # the killed run's, at once
    assert LEASE_NAME not in _objects(url)
    _assert_same_as_reference(_pulled(url, tmp_path / "pulled"), remote_reference)


def test_a_rerun_with_other_settings_names_the_url(s3_bucket, teacher_dir, data_file, tmp_path):
    url = f"{s3_bucket}/cache"
    run_teacher(make_config(teacher_dir, data_file, url, limit=4, local_cache=str(tmp_path / "a")), progress=False)

    with pytest.raises(LogitCacheError, match=rf"^{url} already holds a cache made with other settings \(k: cache has 8, this run has 4\)"):
        run_teacher(make_config(teacher_dir, data_file, url, top_k=4, local_cache=str(tmp_path / "b")), progress=False)


def test_a_lease_not_renewed_within_its_time_to_live_stops_the_writer(s3_bucket, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_LEASE_SECONDS", "0.2")
    lease = Lease(f"{s3_bucket}/cache").acquire()
    lease._stop.set()  # as if the process stalled: no renewal happens
    lease._thread.join()
    try:
        import time

        time.sleep(0.3)
        with pytest.raises(LogitCacheError, match="not renewed for .* past its 0.2 s time to live"):
            lease.check()
    finally:
        lease._thread = None
