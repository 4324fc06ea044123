"""A teacher run as a batch job sees it: output to a file (Slurm, nohup), and SIGTERM when pre-empted.

The real `logitcache` console script runs with its stdout and stderr in a file, the way a job
script redirects them; this checkout comes first on its PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.pipeline.tiny import write_demo_dataset
from logitcache.storage import verify_cache
from logitcache.storage.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent
LOGITCACHE = Path(sys.executable).with_name("logitcache")
PROGRESS = re.compile(r"teacher: ([\d,]+)/(?:96|200) examples \(\d+%\), ([\d,]+) tokens, ([\d,]+) tokens/s, elapsed \d+:\d\d, ETA ~\d+:\d\d")


def dataset(tmp_path: Path, n: int) -> Path:
    return write_demo_dataset(tmp_path / "train.jsonl", n=n, seed=5)


def teacher_command(teacher_dir: Path, data: Path, out: Path) -> list[str]:
    """--batch-size 1: windows of 16 examples, a line after each (--log-every 0)."""
    return [str(LOGITCACHE), "teacher", "--model", str(teacher_dir), "--data", str(data), "--out", str(out),
            "--prompt-field", "prompt", "--response-field", "response", "--top-k", "8", "--batch-size", "1",
            "--log-every", "0"]


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as f:  # the child has its own copy of the descriptor
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_for(log: Path, pattern: re.Pattern, p: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text())
        if match or p.poll() is not None:
            return match
        time.sleep(0.05)
    p.kill()
    pytest.fail(f"no {pattern.pattern!r} in {timeout}s:\n{log.read_text()}")


def test_a_teacher_run_logged_to_a_file_prints_progress_lines(tmp_path, teacher_dir):
    log = tmp_path / "job.log"
    p = start(teacher_command(teacher_dir, dataset(tmp_path, 96), tmp_path / "cache"), log)
    assert p.wait(timeout=300) == 0, log.read_text()

    lines = log.read_text().splitlines()
    assert lines[0] == "teacher: 0/96 examples (0%), elapsed 0:00"
    progress = [PROGRESS.fullmatch(line) for line in lines if PROGRESS.fullmatch(line)]
    assert [m[1] for m in progress] == ["16", "32", "48", "64", "80"]
    assert int(progress[-1][2].replace(",", "")) > int(progress[0][2].replace(",", "")) > 0
    assert re.fullmatch(r"teacher: 96/96 examples in \d+:\d\d, [\d,]+ tokens, [\d,]+ tokens/s", lines[-3])
    assert lines[-1].endswith("complete")


@pytest.mark.slow  # two runs, about 40 s on 2 busy cores
def test_sigterm_keeps_what_is_written_and_prints_the_command_that_resumes(tmp_path, teacher_dir):
    out, log = tmp_path / "cache", tmp_path / "job.log"
    command = teacher_command(teacher_dir, dataset(tmp_path, 200), out)
    p = start(command, log)
    assert wait_for(log, PROGRESS, p), log.read_text()  # mid-run: some windows are written, more to come
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143

    last = log.read_text().splitlines()[-1]
    kept = load_manifest(out)
    assert kept.status == "partial" and 0 < kept.num_examples < 200
    assert last.startswith(f"stopped by SIGTERM: {kept.num_examples} examples ({kept.num_tokens:,} tokens) are kept in {out}")
    resume = last.split("to resume, run: ", 1)[1]
    assert shlex.split(resume) == ["logitcache", *command[1:]]

    p = start([str(LOGITCACHE), *shlex.split(resume)[1:]], tmp_path / "resumed.log")
    assert p.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()
    assert f"{kept.num_examples} already in the cache" in (tmp_path / "resumed.log").read_text()
    assert load_manifest(out).status == "complete" and load_manifest(out).num_examples == 200
    assert verify_cache(out).ok


def test_sigterm_between_two_windows_keeps_the_first_and_exits_143(tmp_path, teacher_dir, data_file, monkeypatch):
    """In process, so fast: a real SIGTERM, sent by the run itself as it starts its second window."""
    import logitcache.pipeline.teacher.run as run_module

    score, windows = run_module._score_window, []

    def score_unless_terminated(*args):
        windows.append(args)
        if len(windows) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return score(*args)

    monkeypatch.setattr(run_module, "_score_window", score_unless_terminated)
    out = tmp_path / "cache"
    args = teacher_command(teacher_dir, data_file, out)[1:]  # 24 records: windows of 16 and 8
    monkeypatch.setattr(sys, "argv", ["logitcache", *args])
    r = CliRunner().invoke(app, args)

    assert r.exit_code == 143, r.output
    kept = load_manifest(out)
    assert kept.num_examples == 16 and kept.status == "partial"
    assert r.output.splitlines()[-1] == (
        f"stopped by SIGTERM: 16 examples ({kept.num_tokens:,} tokens) are kept in {out}, partial; "
        f"to resume, run: {shlex.join(['logitcache', *args])}"
    )


def test_a_negative_log_interval_is_refused_in_one_line(tmp_path, teacher_dir, data_file):
    r = CliRunner().invoke(app, [*teacher_command(teacher_dir, data_file, tmp_path / "cache")[1:], "--log-every", "-5"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: --log-every must be 0 or more seconds (got -5.0); 0 logs at every step."
    assert not (tmp_path / "cache").exists()


def test_the_resume_command_of_a_slurm_array_task_names_its_part(tmp_path, monkeypatch):
    from logitcache.cli.teacher import _kept
    from logitcache.pipeline.teacher.run import TeacherConfig

    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setattr(sys, "argv", ["logitcache", "teacher", "--model", "m", "--data", "d", "--out", str(tmp_path)])
    line = _kept(TeacherConfig(model="m", data="d", out=str(tmp_path)))
    assert line == (f"nothing is written to {tmp_path / 'part-00003-of-00008'} yet; to resume, run: "
                    f"logitcache teacher --model m --data d --out {tmp_path} --num-parts 8 --part-index 3")


def test_verify_of_a_long_check_logs_shards_done_on_stderr(built_cache):
    shards = len(load_manifest(built_cache).shards)

    r = CliRunner().invoke(app, ["verify", str(built_cache), "--log-every", "0"])

    assert r.exit_code == 0 and r.stdout.startswith("OK ") and len(r.stdout.splitlines()) == 1
    lines = r.stderr.splitlines()
    assert [line.split(" shards")[0] for line in lines] == [f"verify: {done}/{shards}" for done in range(shards)]


# The first step's line has no loss logged yet and no rate to estimate the time left from.
TRAIN_PROGRESS = re.compile(r"train: (\d+)/6 steps \(\d+%\)(, loss [\d.]+)?, elapsed \d+:\d\d(, ETA ~\d+:\d\d)?")


def test_a_training_run_logged_to_a_file_prints_plain_progress_lines(tmp_path, built_cache, student):
    """No tqdm bar redrawn into the file: a plain line per step (--log-every 0), and the Trainer's metrics."""
    log = tmp_path / "job.log"
    p = start([str(LOGITCACHE), "train", "--student", str(student), "--cache", str(built_cache), "--out",
               str(tmp_path / "run"), "--loss", "uld", "--max-steps", "6", "--batch-size", "4", "--logging-steps", "1",
               "--log-every", "0"], log)
    assert p.wait(timeout=300) == 0, log.read_text()

    text = log.read_text()
    assert "\r" not in text and "it/s]" not in text
    lines = text.splitlines()
    progress = [m for m in map(TRAIN_PROGRESS.fullmatch, lines) if m]
    assert [int(m[1]) for m in progress] == [0, 1, 2, 3, 4, 5]  # the opening line, then each step
    assert all(m[2] and m[3] for m in progress[2:])
    assert any(re.fullmatch(r"train: 6/6 steps in \d+:\d\d, loss [\d.]+", line) for line in lines), text
    assert sum("'kd':" in line for line in lines) == 6  # the Trainer's logged metrics are still there
