"""A cache is for a team: what the tool writes follows the writer's umask, so under umask 022
another user reads the cache (files rw-r--r--, folders rwxr-xr-x), tokenizer included."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import make_config

from logitcache.pipeline.teacher.run import run_teacher
from logitcache.storage.merge import expand_parts, merge_caches

SHARED = 0o022  # the usual umask: everyone may read, only the owner may write
NOBODY = 65534


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def shared_dir():
    """A folder another user can reach: pytest's own tmp_path sits under a private (0700) one."""
    d = Path(tempfile.mkdtemp(prefix="logitcache-shared-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def modes_off_the_umask(root: Path, mask: int) -> list[str]:
    """Every path under ``root`` (itself included) whose mode is not what a plain create gives."""
    off = []
    for p in [root, *sorted(root.rglob("*"))]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode != want:
            off.append(f"{p.relative_to(root)}: {oct(mode)}, not {oct(want)}")
    return off


def test_a_teacher_cache_follows_the_umask(shared_dir, teacher_dir, data_file):
    with umask(SHARED):
        run_teacher(make_config(teacher_dir, data_file, shared_dir / "cache"), progress=False)
    assert modes_off_the_umask(shared_dir / "cache", SHARED) == []


def test_a_merged_cache_follows_the_merging_users_umask(shared_dir, teacher_dir, data_file):
    # Parts written under a private umask (077); the merge, run under 022, must not carry the
    # parts' modes into the files it writes itself (tokenizer, manifest, card, copied shards).
    with umask(0o077):
        for i in range(2):
            run_teacher(make_config(teacher_dir, data_file, shared_dir / "parts", num_workers=2, worker_index=i),
                        progress=False)
    with umask(SHARED):
        merge_caches(shared_dir / "merged", expand_parts([shared_dir / "parts"]), link=False)
    assert modes_off_the_umask(shared_dir / "merged", SHARED) == []


def as_nobody(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` as the user nobody (setpriv: the interpreter stays reachable where
    subprocess's own ``user=`` cannot exec a Python that lives under /root)."""
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_another_user_can_verify_a_cache_written_under_umask_022(shared_dir, teacher_dir, data_file):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("acting as a second user needs root and setpriv")
    if as_nobody(sys.executable, "-c", "import logitcache", cwd=shared_dir).returncode != 0:
        pytest.skip("the user nobody cannot run this Python or import logitcache")
    with umask(SHARED):
        run_teacher(make_config(teacher_dir, data_file, shared_dir / "cache"), progress=False)
    r = as_nobody(sys.executable, "-m", "logitcache", "verify", str(shared_dir / "cache"), cwd=shared_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK ")


def test_a_training_run_follows_the_umask(shared_dir, built_cache, student):
    from logitcache.pipeline.student.train import TrainConfig, run_train

    cfg = TrainConfig(student=str(student), cache=str(built_cache), out=str(shared_dir / "run"), max_steps=2,
                      save_steps=2, batch_size=4, progress=False)
    with umask(SHARED):
        run_train(cfg)
    assert list((shared_dir / "run").glob("checkpoint-2"))
    assert modes_off_the_umask(shared_dir / "run", SHARED) == []
