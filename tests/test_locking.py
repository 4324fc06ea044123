"""One writer per cache: a second process refuses; a dead process's lock is taken over."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from conftest import make_config
from typer.testing import CliRunner

from logitcache import LogitCacheError, verify_cache
from logitcache.cli import app
from logitcache.pipeline.teacher.run import part_name, run_teacher
from logitcache.storage import lock as lock_mod
from logitcache.storage.lock import LOCK_NAME, CacheLock
from logitcache.storage.manifest import MANIFEST_NAME
from logitcache.storage.merge import merge_caches

HOLD = (
    "import sys, time; from logitcache.storage.lock import CacheLock; "
    "CacheLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)"
)


@pytest.fixture
def holder():
    """Start a process that takes the lock on a directory and keeps it until killed."""
    procs = []

    def start(directory) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_teacher_run_refuses_and_names_the_holder(tmp_path, teacher_dir, data_file, holder):
    out = tmp_path / "cache"
    p = holder(out)

    with pytest.raises(LogitCacheError) as e:
        run_teacher(make_config(teacher_dir, data_file, out), progress=False)

    message = str(e.value)
    assert f"another logitcache process (pid {p.pid} on host {socket.gethostname()}, started " in message
    assert f"is writing to {out}; wait for it" in message
    assert not (out / MANIFEST_NAME).exists(), "the refused run wrote nothing"


def test_the_command_line_refuses_in_one_line(tmp_path, teacher_dir, data_file, holder):
    out = tmp_path / "cache"
    p = holder(out)
    args = ["teacher", "--model", teacher_dir, "--data", data_file, "--out", out, "--top-k", 8,
            "--prompt-field", "prompt", "--response-field", "response", "--no-progress"]

    r = CliRunner().invoke(app, [str(a) for a in args])

    assert r.exit_code == 2 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"pid {p.pid}" in errors[0], r.output


def test_the_lock_is_per_worker_part(tmp_path, teacher_dir, data_file, holder):
    out = tmp_path / "parts"
    holder(out / part_name(0, 2))

    r = run_teacher(make_config(teacher_dir, data_file, out, num_workers=2, worker_index=1), progress=False)
    with pytest.raises(LogitCacheError, match="another logitcache process"):
        run_teacher(make_config(teacher_dir, data_file, out, num_workers=2, worker_index=0), progress=False)

    assert r.complete and verify_cache(out / part_name(1, 2)).ok


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, teacher_dir, data_file, holder, capsys):
    out = tmp_path / "cache"
    p = holder(out)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / LOCK_NAME).exists(), "SIGKILL leaves the lock file behind"

    r = run_teacher(make_config(teacher_dir, data_file, out), progress=False)

    assert r.complete and verify_cache(out).ok
    assert f"taking over the lock on {out} left by pid {p.pid}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists(), "a finished run removes its lock"


FORK_AND_DIE = (
    "import os, sys, time; from logitcache.storage.lock import CacheLock; "
    "CacheLock(sys.argv[1]).acquire(); child = os.fork(); "
    "time.sleep(120) if child == 0 else (print(child, flush=True), time.sleep(120))"
)


def test_a_lock_kept_by_a_forked_child_of_a_dead_run_names_the_problem(tmp_path):
    # An engine worker forked by the run inherits the lock and keeps it after the run is killed.
    run = subprocess.Popen([sys.executable, "-c", FORK_AND_DIE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(run.stdout.readline())
    try:
        run.kill()
        run.wait()
        with pytest.raises(LogitCacheError, match=f"although pid {run.pid} .* is gone: a process it started"):
            CacheLock(tmp_path).acquire()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_merge_into_a_locked_directory_refuses(tmp_path, built_cache, holder):
    out = tmp_path / "merged"
    holder(out)

    with pytest.raises(LogitCacheError, match=re.escape(f"is writing to {out}; wait for it")):
        merge_caches(out, [built_cache])


def test_release_removes_the_lock_and_the_directories_it_made(tmp_path):
    lock = CacheLock(tmp_path / "new" / "cache").acquire()
    assert (tmp_path / "new" / "cache" / LOCK_NAME).exists()

    lock.release()

    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_deleted_between_open_and_lock_is_not_trusted(tmp_path, monkeypatch):
    # The holder releases (deletes the file) just after we opened it: locking that orphaned
    # file would let a third process lock a new file at the same path at the same time.
    real = lock_mod.fcntl.flock
    released = []

    def flock_after_release(fd, op):
        if not released:
            released.append(True)
            (tmp_path / LOCK_NAME).unlink()
        return real(fd, op)

    monkeypatch.setattr(lock_mod.fcntl, "flock", flock_after_release)
    lock = CacheLock(tmp_path).acquire()

    assert os.fstat(lock._fd).st_ino == os.stat(tmp_path / LOCK_NAME).st_ino
    lock.release()


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock (some Lustre and NFS mounts)."""

    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_mod.fcntl, "flock", unsupported)


def _write_lock_file(directory, pid: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))


def test_without_flock_a_live_holder_pid_refuses(tmp_path, no_flock):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock_file(tmp_path, sleeper.pid)
        with pytest.raises(LogitCacheError, match=f"pid {sleeper.pid} on host"):
            CacheLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_without_flock_a_dead_holder_pid_is_taken_over(tmp_path, no_flock):
    gone = subprocess.Popen(["true"])
    gone.wait()
    _write_lock_file(tmp_path, gone.pid)

    lock = CacheLock(tmp_path).acquire()

    assert lock.taken_over is not None and lock.taken_over.pid == gone.pid
    lock.release()
