"""`logitcache teacher --ray` (= `python -m logitcache.ray`): stage 1 as Ray tasks, one per part.

The runs start a local Ray instance of their own (``--ray-address local``) in a subprocess, as a
user's command would, so no Ray process outlives a test and no other test starts one. A part's
worker is SIGKILLed mid-run through ``LOGITCACHE_RAY_CRASH`` (pipeline/teacher/ray_parts.py):
Ray reports the dead worker, the part is submitted again and resumes its part directory. The
default test writes to a loopback S3 server (the `s3_bucket` fixture); the slow ones to a local disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import assert_same_rows

from logitcache import open_cache, verify_cache


def _ray_teacher(teacher_dir, data_file, out, *flags, env=None, timeout=300):
    """`python -m logitcache.ray ...` on a fresh local Ray instance, with make_config's settings."""
    args = ["--model", teacher_dir, "--data", data_file, "--out", out, "--top-k", 8, "--batch-size", 4,
            "--prompt-field", "prompt", "--response-field", "response", "--ray-address", "local", "--no-progress",
            *flags]
    return subprocess.run([sys.executable, "-m", "logitcache.ray", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, **(env or {})})


def _finished(stderr: str, part: str) -> tuple[int, int, int]:
    """(written, already there, attempt) from the driver's line for ``part`` ("2 of 3")."""
    m = re.search(rf"part {part}: finished on \S+: (\d+) examples written, (\d+) already there, .* \(attempt (\d+)\)", stderr)
    assert m, stderr
    return int(m[1]), int(m[2]), int(m[3])


def _run_with_part_2_killed(teacher_dir, data_file, out, n: int, shard_mb: float, *flags):
    """A Ray run of ``n`` parts in which part 2's first worker dies (SIGKILL) right after its
    manifest lists its first shard: the run still succeeds, part 2 retried once and resumed."""
    pytest.importorskip("ray")

    r = _ray_teacher(teacher_dir, data_file, out, "--num-parts", n, "--shard-size-mb", shard_mb, *flags,
                     env={"LOGITCACHE_RAY_CRASH": "1:shard.listed:1"})

    assert r.returncode == 0, r.stderr[-3000:]
    for i in range(1, n + 1):  # the driver's own lines, whatever Ray forwards from the workers
        assert re.search(rf"^\[\d+:\d\d\] part {i} of {n}: started on \S+ \(pid \d+, GPUs none, attempt 1\)$", r.stderr, re.M)
    assert f"part 2 of {n}: attempt 1 failed (WorkerCrashedError" in r.stderr
    assert f"part 2 of {n}: started on" in r.stderr.split("attempt 1 failed")[1]  # the retry
    assert "\x1b[" not in r.stderr  # no colour codes in a log file
    written, already, attempt = _finished(r.stderr, f"2 of {n}")
    assert attempt == 2 and already > 0 and written > 0  # resumed: the first shard was kept, not redone
    assert f"ran {n} parts on Ray" in r.stdout and "1 retry (part 2 (1x))" in r.stdout
    assert f"merged {n} parts into {out}" in r.stdout


def test_a_killed_part_resumes_and_the_merged_cache_at_a_url_equals_one_run(tmp_path, teacher_dir, data_file,
                                                                           built_cache, s3_bucket):
    """--out s3://...: each task writes its part to BUCKET/cache-parts/ through its own staging
    (a killed one resumes from the remote), and the driver merges them into BUCKET/cache."""
    url = f"{s3_bucket}/cache"

    # make_config's 6000-byte shards: each of the two parts writes two
    _run_with_part_2_killed(teacher_dir, data_file, url, 2, 6000 / 2**20, "--local-cache", tmp_path / "staging")

    copied = subprocess.run([sys.executable, "-m", "logitcache", "copy", url, tmp_path / "copy"], capture_output=True,
                            text=True, timeout=300, check=False)
    assert copied.returncode == 0, copied.stderr
    assert_same_rows(tmp_path / "copy", built_cache)  # every example once, as one process writes it


@pytest.mark.slow
def test_three_parts_one_killed_as_the_issue_asks(tmp_path, teacher_dir, data_file, built_cache):
    out = tmp_path / "cache"

    _run_with_part_2_killed(teacher_dir, data_file, out, 3, 3000 / 2**20)

    assert verify_cache(out).ok and open_cache(out).manifest.status == "complete"
    assert_same_rows(out, built_cache)
    assert sorted(p.name for p in (tmp_path / "cache-parts").iterdir()) == [f"part-{i:05d}-of-00003" for i in range(3)]


def test_without_ray_installed_it_is_one_line_naming_the_extra(tmp_path, teacher_dir, data_file):
    # A fresh interpreter in which `import ray` fails, as where the extra is not installed.
    code = ("import sys; sys.modules['ray'] = None; sys.argv[0] = 'logitcache'; "
            "from logitcache.cli import main; main()")
    args = ["teacher", "--ray", "--num-parts", "2", "--model", teacher_dir, "--data", data_file,
            "--out", tmp_path / "cache", "--prompt-field", "prompt", "--response-field", "response"]

    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)

    assert r.returncode == 2
    assert r.stderr.strip() == "error: --ray needs the ray package; pip install 'logitcache[ray]'."
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache-parts").exists()


@pytest.mark.slow
def test_a_part_that_keeps_failing_stops_the_run_in_one_line_and_keeps_the_other_parts(tmp_path, teacher_dir,
                                                                                          data_file):
    """--part-retries 0: the killed part is not retried; the error names it and how to resume."""
    pytest.importorskip("ray")
    out = tmp_path / "cache"

    r = _ray_teacher(teacher_dir, data_file, out, "--num-parts", 2, "--part-retries", 0,
                     env={"LOGITCACHE_RAY_CRASH": "1:shard.listed:1"})

    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "part 2 of 2 failed once" in errors[0] and "rerun the same command" in errors[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()  # nothing merged
    assert (tmp_path / "cache-parts" / "part-00001-of-00002" / "manifest.json").exists()  # its first shard is kept


def test_ray_address_auto_without_a_cluster_is_one_line(tmp_path, teacher_dir, data_file, monkeypatch):
    pytest.importorskip("ray")
    from typer.testing import CliRunner

    from logitcache.cli import app

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["teacher", "--ray", "--ray-address", "auto", "--num-parts", "2", "--model", teacher_dir, "--data", data_file,
            "--out", tmp_path / "cache", "--prompt-field", "prompt", "--response-field", "response"]

    r = CliRunner().invoke(app, [str(a) for a in args])

    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert r.stderr.startswith("error: --ray-address auto: no Ray cluster to connect to") and "ray start --head" in r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache-parts").exists()


def test_the_parts_go_beside_the_out_even_for_a_url():
    from logitcache.pipeline.teacher.ray_parts import parts_dir_for

    assert parts_dir_for("/shared/cache/") == "/shared/cache-parts"
    assert parts_dir_for("s3://bucket/team/cache") == "s3://bucket/team/cache-parts"


@pytest.mark.slow
def test_bad_input_found_in_a_task_stops_every_part_at_once_without_retries(tmp_path, teacher_dir):
    pytest.importorskip("ray")

    r = _ray_teacher(teacher_dir, tmp_path / "nope.jsonl", tmp_path / "cache", "--num-parts", 2)

    assert r.returncode == 2 and "retrying" not in r.stderr and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "of 2: --data" in errors[0] and "nope.jsonl" in errors[0], r.stderr


@pytest.mark.slow
def test_sigterm_stops_every_part_and_the_same_command_resumes(tmp_path, teacher_dir, data_file, built_cache):
    """`ray job stop` sends the driver SIGTERM: it stops as Ctrl-C does (exit 143), and says how to resume."""
    import signal

    pytest.importorskip("ray")
    args = ["--model", teacher_dir, "--data", data_file, "--out", tmp_path / "cache", "--top-k", 8, "--batch-size", 4,
            "--prompt-field", "prompt", "--response-field", "response", "--ray-address", "local", "--no-progress",
            "--num-parts", 2]
    driver = subprocess.Popen([sys.executable, "-m", "logitcache.ray", *map(str, args)], stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True)
    seen = []
    for line in driver.stderr:  # the parts are loading their model
        seen.append(line)
        if "started on" in line:
            break
    driver.send_signal(signal.SIGTERM)
    rest = driver.stderr.read()
    assert driver.wait(timeout=120) == 143, "".join(seen) + rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: the shards every part finished are kept in ") and "to resume, run: logitcache teacher --ray" in last

    again = _ray_teacher(teacher_dir, data_file, tmp_path / "cache", "--num-parts", 2)

    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_rows(tmp_path / "cache", built_cache)


def test_a_missing_bucket_is_one_line_before_ray_starts(tmp_path, teacher_dir, data_file, s3_endpoint):
    from typer.testing import CliRunner

    from logitcache.cli import app

    args = ["teacher", "--ray", "--num-parts", "2", "--model", teacher_dir, "--data", data_file,
            "--out", "s3://no-such-bucket/cache", "--prompt-field", "prompt", "--response-field", "response"]

    r = CliRunner().invoke(app, [str(a) for a in args])

    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "the bucket no-such-bucket does not exist" in r.stderr
    assert "submitted" not in r.output  # nothing was sent to Ray
