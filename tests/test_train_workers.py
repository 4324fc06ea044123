"""Training with dataloader workers is exact (issue 13 §4): every example once per epoch, full batches,
a bit-exact resume, the alignment stats of the examples trained on; a finished run resumed is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from logitcache.pipeline.student.dataset import LogitCacheDataset
from logitcache.pipeline.student.train import TrainConfig, run_train


def _cfg(student: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(student=str(student), cache=str(cache), out=str(out), loss="kl", max_steps=5, batch_size=4,
                learning_rate=1e-3, save_steps=100, logging_steps=1, progress=False, shuffle_buffer=8,
                lr_scheduler="constant")
    base.update(kw)
    return TrainConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _batches(cache: Path, batch_size: int, workers: int, shuffle: bool = False) -> list[list[str]]:
    ds = LogitCacheDataset(cache, shuffle=shuffle, shuffle_buffer=8, num_workers=workers, batch_size=batch_size)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=lambda rows: [r["id"] for r in rows])
    return list(loader)


@pytest.mark.parametrize("batch_size", [4, 5, 7])
def test_workers_deal_whole_batches_in_the_single_process_order(built_cache, batch_size):
    alone = _batches(built_cache, batch_size, 0)

    together = _batches(built_cache, batch_size, 2)

    assert together == alone  # unshuffled: the same batches in the same order
    assert [len(b) for b in together[:-1]] == [batch_size] * (len(together) - 1)
    assert len(together) == -(-24 // batch_size)


def test_shuffled_with_workers_every_example_once_and_only_the_last_batch_short(built_cache):
    batches = _batches(built_cache, 5, 2, shuffle=True)

    ids = [i for b in batches for i in b]
    assert len(ids) == len(set(ids)) == 24
    assert [len(b) for b in batches] == [5, 5, 5, 5, 4]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_with_workers_equals_an_uninterrupted_run(tmp_path, built_cache, student, workers):
    straight = run_train(_cfg(student, built_cache, tmp_path / "straight", num_workers=workers, save_steps=5))
    run_train(_cfg(student, built_cache, tmp_path / "resumed", num_workers=workers, max_steps=2, save_steps=2))
    state = json.loads((tmp_path / "resumed" / "checkpoint-2" / "logitcache_data_state_rank0.json").read_text())
    assert sum(state["consumed"].values()) == 8

    resumed = run_train(_cfg(student, built_cache, tmp_path / "resumed", num_workers=workers, save_steps=5, resume=True))

    assert resumed.global_step == straight.global_step == 5
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_summary_counts_the_examples_trained_in_the_workers(tmp_path, built_cache, student):
    r = run_train(_cfg(student, built_cache, tmp_path / "run", num_workers=2, max_steps=6))  # one epoch

    stats = r.feature_stats
    assert stats["examples"] == 24 and stats["fraction_matched"] > 0.9


def test_a_finished_run_resumed_is_a_no_op_that_says_so(tmp_path, built_cache, student, capsys):
    first = run_train(_cfg(student, built_cache, tmp_path / "run", max_steps=3, save_steps=3))
    before = _weights(tmp_path / "run")
    capsys.readouterr()

    again = run_train(_cfg(student, built_cache, tmp_path / "run", max_steps=3, save_steps=3, resume=True))

    assert "already holds this run, finished at step 3; nothing to do" in capsys.readouterr().err
    assert again.global_step == first.global_step == 3
    after = _weights(tmp_path / "run")
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_finished_run_resumed_with_more_steps_trains_on(tmp_path, built_cache, student):
    run_train(_cfg(student, built_cache, tmp_path / "run", max_steps=3, save_steps=3))

    more = run_train(_cfg(student, built_cache, tmp_path / "run", max_steps=5, save_steps=5, resume=True))

    assert more.global_step == 5
