"""`train --follow` (issue 16 §3): a student trains while the teacher writes the cache.

Epoch 1 holds every example of the complete cache once, whenever its shards arrived; ranks and
workers agree on it without talking to each other; a resume mid-follow continues exactly; a cache
that stops growing is named, not waited on silently.

The unit tests grow a cache the way the writer does: the shard files are there, and the
manifest, rewritten atomically, lists one more shard each time (the last one says complete).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from logitcache.errors import LogitCacheError
from logitcache.pipeline.student.dataset import LogitCacheDataset
from logitcache.pipeline.student.follow import Follow, wait_for_manifest
from logitcache.pipeline.student.train import TrainConfig, run_train
from logitcache.storage.manifest import load_manifest
from logitcache.storage.reader import CacheReader

QUICK = Follow(poll=0.01, announce=False)


class GrowingCache:
    """A copy of a finished cache whose manifest lists its shards one more at a time."""

    def __init__(self, finished: Path, where: Path, listed: int = 1) -> None:
        self.path = where
        shutil.copytree(finished, where)
        self.full = load_manifest(finished)
        self.list(listed)

    def list(self, n: int) -> None:
        done = n >= len(self.full.shards)
        dataclasses.replace(self.full, shards=self.full.shards[:n], status="complete" if done else "partial").save(self.path)

    def grow_in_background(self, every: float = 0.05) -> threading.Thread:
        def grow() -> None:
            for n in range(len(load_manifest(self.path).shards) + 1, len(self.full.shards) + 1):
                time.sleep(every)
                self.list(n)

        thread = threading.Thread(target=grow, daemon=True)
        thread.start()
        return thread


def _ids(ds: LogitCacheDataset) -> list[str]:
    return [row["id"] for row in ds]


def _followed(cache: GrowingCache, **kw) -> list[str]:
    ds = LogitCacheDataset(cache.path, follow=QUICK, shuffle_buffer=4, seed=3, **kw)
    grower = cache.grow_in_background()
    ids = _ids(ds)
    grower.join()
    return ids


def test_a_followed_epoch_holds_every_example_once_whenever_its_shards_arrive(built_cache, tmp_path):
    all_ids = sorted(CacheReader(built_cache).ids())

    slowly = _followed(GrowingCache(built_cache, tmp_path / "slow"))
    at_once = GrowingCache(built_cache, tmp_path / "fast")
    ds = LogitCacheDataset(at_once.path, follow=QUICK, shuffle_buffer=4, seed=3)
    at_once.list(4)  # complete before the first example is read
    quickly = _ids(ds)

    assert sorted(slowly) == all_ids
    assert slowly == quickly  # the order is the shard list's, not the clock's


def test_unshuffled_a_followed_epoch_is_the_cache_order(built_cache, tmp_path):
    followed = _followed(GrowingCache(built_cache, tmp_path / "c"), shuffle=False)

    assert followed == list(CacheReader(built_cache).ids())


def test_the_reader_says_when_it_waits_for_the_teacher(built_cache, tmp_path, capsys):
    cache = GrowingCache(built_cache, tmp_path / "c")
    ds = LogitCacheDataset(cache.path, follow=Follow(poll=0.02), shuffle=False)
    grower = cache.grow_in_background(every=0.1)

    assert len(_ids(ds)) == 24
    grower.join()
    err = capsys.readouterr().err
    assert "waiting for the teacher: 8 of 24 records cached, next check in 0.02 s" in err


@pytest.mark.parametrize("world, batch", [(2, 3), (5, 2)])
def test_ranks_split_a_followed_epoch_evenly_with_at_most_world_minus_one_repeats(built_cache, tmp_path, world, batch):
    per_rank = []
    for rank in range(world):  # rank 0 follows the writer; the others read the finished cache
        cache = GrowingCache(built_cache, tmp_path / f"rank{rank}")
        per_rank.append(_followed(cache, rank=rank, world_size=world, batch_size=batch))

    per = -(-24 // world)
    assert [len(ids) for ids in per_rank] == [per] * world
    seen = Counter(i for ids in per_rank for i in ids)
    assert sorted(seen) == sorted(CacheReader(built_cache).ids())
    assert sum(seen.values()) - len(seen) == world * per - 24  # the padding: 0 for 2 ranks, 1 for 5


def test_dataloader_workers_of_two_ranks_read_a_followed_epoch_once(built_cache, tmp_path):
    ids = []
    for rank in (0, 1):
        cache = GrowingCache(built_cache, tmp_path / f"rank{rank}")
        ds = LogitCacheDataset(cache.path, follow=QUICK, shuffle_buffer=4, rank=rank, world_size=2, num_workers=2, batch_size=3)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=lambda rows: [r["id"] for r in rows])
        grower = cache.grow_in_background()
        batches = list(loader)
        grower.join()
        assert [len(b) for b in batches] == [3, 3, 3, 3]  # full batches, 12 per rank
        ids += [i for b in batches for i in b]

    assert sorted(ids) == sorted(CacheReader(built_cache).ids())


def test_a_resume_mid_follow_continues_the_same_epoch(built_cache, tmp_path):
    straight = _followed(GrowingCache(built_cache, tmp_path / "straight"))
    cache = GrowingCache(built_cache, tmp_path / "c", listed=2)  # 14 examples so far
    first = LogitCacheDataset(cache.path, follow=QUICK, shuffle_buffer=4, seed=3)
    taken = []
    for row in first:
        taken.append(row["id"])
        first.mark_consumed(row["_worker"], row["_index"])
        if len(taken) == 10:
            break
    state = first.state_dict()

    again = LogitCacheDataset(cache.path, follow=QUICK, shuffle_buffer=4, seed=3)
    again.load_state_dict(state)
    grower = cache.grow_in_background()
    rest = _ids(again)
    grower.join()

    assert state["followed"] and taken + rest == straight


def test_a_resume_of_a_followed_epoch_needs_follow(built_cache, tmp_path):
    cache = GrowingCache(built_cache, tmp_path / "c", listed=2)
    state = LogitCacheDataset(cache.path, follow=QUICK).state_dict()

    with pytest.warns(UserWarning, match="not complete"):
        plain = LogitCacheDataset(cache.path)
    with pytest.raises(LogitCacheError, match="resume with --follow"):
        plain.load_state_dict(state)


def test_epochs_after_the_followed_one_are_those_of_the_complete_cache(built_cache, tmp_path):
    cache = GrowingCache(built_cache, tmp_path / "c")
    ds = LogitCacheDataset(cache.path, follow=QUICK, shuffle_buffer=4, seed=3)
    with pytest.raises(TypeError, match="still being written"):
        len(ds)
    grower = cache.grow_in_background()
    _ids(ds)
    grower.join()

    ds.set_epoch(1)
    complete = LogitCacheDataset(built_cache, shuffle_buffer=4, seed=3)
    complete.set_epoch(1)

    assert len(ds) == len(complete) == 24
    assert _ids(ds) == _ids(complete)


def test_on_a_complete_cache_follow_changes_nothing(built_cache):
    followed = LogitCacheDataset(built_cache, follow=QUICK, shuffle_buffer=4, seed=3)

    assert len(followed) == 24 and not followed.followed
    assert _ids(followed) == _ids(LogitCacheDataset(built_cache, shuffle_buffer=4, seed=3))


def test_a_cache_that_stops_growing_is_named_with_the_teachers_resume_command(built_cache, tmp_path):
    cache = GrowingCache(built_cache, tmp_path / "c")
    ds = LogitCacheDataset(cache.path, follow=Follow(poll=0.01, timeout=0.1, announce=False))

    with pytest.raises(LogitCacheError, match=r"no new shard after waiting 0 s \(--follow-timeout\), 8 of 24 records cached") as e:
        _ids(ds)
    assert f"`logitcache teacher --model {cache.full.teacher['name']} --data" in str(e.value)
    assert f"--out {cache.path} ...`" in str(e.value) and "--resume" in str(e.value)


def test_a_cache_rewritten_while_followed_is_refused(built_cache, tmp_path):
    cache = GrowingCache(built_cache, tmp_path / "c")
    ds = LogitCacheDataset(cache.path, follow=QUICK)
    other = [dataclasses.replace(cache.full.shards[0], sha256="0" * 64), cache.full.shards[1]]
    dataclasses.replace(cache.full, shards=other, status="partial").save(cache.path)

    with pytest.raises(LogitCacheError, match="rewritten while training followed it"):
        _ids(ds)


# --- train --follow ------------------------------------------------------------------------------


def _cfg(student: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(student=str(student), cache=str(cache), out=str(out), loss="kl", batch_size=4, learning_rate=1e-3,
                save_steps=100, logging_steps=1, progress=False, shuffle_buffer=8, follow=True, follow_poll=0.05)
    base.update(kw)
    return TrainConfig(**base)


def test_train_follow_on_a_complete_cache_just_trains(tmp_path, built_cache, student):
    r = run_train(_cfg(student, built_cache, tmp_path / "run"))  # one epoch: no --max-steps needed

    assert r.global_step == 6 and r.feature_stats["examples"] == 24


def test_train_follow_on_a_cache_being_written_needs_max_steps(tmp_path, built_cache, student):
    cache = GrowingCache(built_cache, tmp_path / "c")

    with pytest.raises(LogitCacheError, match=r"still being written \(8 of 24 records cached\), needs --max-steps"):
        run_train(_cfg(student, cache.path, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_a_run_resumed_from_a_checkpoint_taken_mid_follow_equals_an_uninterrupted_one(tmp_path, built_cache, student):
    steady = dict(max_steps=6, lr_scheduler="constant", save_steps=6)
    straight_cache = GrowingCache(built_cache, tmp_path / "c1")
    grower = straight_cache.grow_in_background()
    straight = run_train(_cfg(student, straight_cache.path, tmp_path / "straight", **steady))
    grower.join()
    cache = GrowingCache(built_cache, tmp_path / "c2", listed=3)  # 22 of 24 examples: partial throughout
    run_train(_cfg(student, cache.path, tmp_path / "resumed", **{**steady, "max_steps": 2, "save_steps": 2}))

    grower = cache.grow_in_background()
    resumed = run_train(_cfg(student, cache.path, tmp_path / "resumed", **steady, resume=True))
    grower.join()

    assert resumed.global_step == straight.global_step == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_logged_epoch_counts_epochs_of_the_complete_cache_while_following(tmp_path, built_cache, student):
    cache = GrowingCache(built_cache, tmp_path / "c")
    grower = cache.grow_in_background()
    run_train(_cfg(student, cache.path, tmp_path / "run", max_steps=12, save_steps=12))  # two epochs of 6 steps
    grower.join()

    history = json.loads((tmp_path / "run" / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    logged = [(h["step"], round(h["epoch"], 4)) for h in history if "loss" in h]
    assert len(logged) == 12 and [e for _, e in logged] == sorted(e for _, e in logged)  # never backwards
    # the followed epoch: whole (0) until its length is known (the cache complete), then exact
    assert all(e in (0.0, round(s / 6, 4)) for s, e in logged[:6])
    assert [e for _, e in logged[6:]] == [round(s / 6, 4) for s, _ in logged[6:]]


class _Resume(logging.Handler):
    """Lets the stopped teacher go on once the student says it waits for it, noting how many
    examples the student had taken into batches by then."""

    def __init__(self, pid: int, trained: list[str]) -> None:
        super().__init__()
        self.pid, self.trained, self.waits, self.batched_before = pid, trained, 0, None

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for the teacher" in record.getMessage():
            self.waits += 1
            if self.batched_before is None:
                self.batched_before = len(self.trained)
            os.kill(self.pid, signal.SIGCONT)


@pytest.mark.slow  # about 30 s on 2 shared cores: a teacher process starting takes most of it
def test_a_student_trains_while_a_real_teacher_writes_every_example_once(tmp_path, teacher_dir, data_file, student,
                                                                       monkeypatch):
    cache = tmp_path / "cache"
    teacher = subprocess.Popen(
        [sys.executable, "-m", "logitcache", "teacher", "--model", str(teacher_dir), "--data", str(data_file),
         "--out", str(cache), "--top-k", "8", "--batch-size", "1", "--shard-size-mb", "0.003",
         "--prompt-field", "prompt", "--response-field", "response", "--no-progress"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        while not (cache / "manifest.json").is_file() or len(load_manifest(cache).shards) < 2:
            assert teacher.poll() is None, teacher.stderr.read().decode()
            time.sleep(0.02)
        teacher.send_signal(signal.SIGSTOP)  # the student starts on a cache surely partial
        trained: list[str] = []
        resume = _Resume(teacher.pid, trained)
        logging.getLogger("logitcache.pipeline.student.follow").addHandler(resume)
        logging.getLogger("logitcache.pipeline.student.follow").setLevel(logging.INFO)
        from logitcache.pipeline.student import collate

        batch_of = collate.KDCollator.__call__
        monkeypatch.setattr(collate.KDCollator, "__call__", lambda self, rows: trained.extend(r["id"] for r in rows)
                            or batch_of(self, rows))
        listed_at_start = len(load_manifest(cache).shards)

        r = run_train(_cfg(student, cache, tmp_path / "run", max_steps=6, follow_poll=0.2, shuffle_buffer=2))
    finally:
        logging.getLogger("logitcache.pipeline.student.follow").removeHandler(resume)
        os.kill(teacher.pid, signal.SIGCONT)
        assert teacher.wait(timeout=120) == 0, teacher.stderr.read().decode()

    manifest = load_manifest(cache)
    assert manifest.status == "complete" and listed_at_start < len(manifest.shards)
    assert resume.waits >= 1 and resume.batched_before >= 4  # it trained on what was there, then waited for more
    assert r.global_step == 6  # 24 examples, 4 a batch: epoch 1 exactly
    assert sorted(trained) == sorted(CacheReader(cache).ids())  # every example once, none twice


def test_a_student_started_before_the_teacher_wrote_its_manifest_waits_for_it(built_cache, tmp_path, capsys):
    later = tmp_path / "cache"
    writer = threading.Timer(0.1, shutil.copytree, (built_cache, later))
    writer.start()

    wait_for_manifest(later, Follow(poll=0.02), announce=True)

    writer.join()
    assert f"waiting for the teacher to start {later} (no manifest.json yet), next check in 0.02 s" in capsys.readouterr().err


def test_a_teacher_that_never_starts_is_named_after_the_timeout(tmp_path):
    with pytest.raises(LogitCacheError, match=r"nowhere: no manifest.json after waiting 0 s \(--follow-timeout\); check the path"):
        wait_for_manifest(tmp_path / "nowhere", Follow(poll=0.01, timeout=0.05), announce=False)


@pytest.mark.slow  # two torchrun processes on 2 shared cores: about 30 s
def test_two_ddp_ranks_follow_a_growing_cache_in_step(tmp_path, built_cache, student):
    cache = GrowingCache(built_cache, tmp_path / "c")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "logitcache", "train", "--student", str(student), "--cache", str(cache.path), "--out",
           str(tmp_path / "ddp"), "--loss", "kl", "--max-steps", "3", "--batch-size", "4", "--save-steps", "3",
           "--follow", "--follow-poll", "0.2", "--no-progress"]
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines, grower = [], None
    for line in run.stderr:  # the cache grows once the ranks are up, slower than they step: they wait, together
        lines.append(line)
        if grower is None and "still being written" in line:
            grower = cache.grow_in_background(every=2.0)
    err = "".join(lines)
    assert run.wait(timeout=600) == 0, err[-8000:]
    grower.join()

    states = [json.loads((tmp_path / "ddp" / "checkpoint-3" / f"logitcache_data_state_rank{r}.json").read_text())
              for r in (0, 1)]
    assert [sum(s["consumed"].values()) for s in states] == [12, 12]  # one epoch: 24 examples, half each
    assert all(s["followed"] for s in states)
    assert "waiting for the teacher: 8 of 24 records cached" in err  # rank 0 says it; rank 1 waits quietly
