"""A training job killed while it saves a checkpoint resumes from the last complete one.

transformers writes a checkpoint file by file (weights, optimizer, scheduler, RNG, and
``trainer_state.json`` last); our DataStateCallback writes each rank's data state before
them. A SIGKILL in between leaves a ``checkpoint-N`` that transformers' own
``get_last_checkpoint`` would pick (weights without optimizer or trainer state: the
resume crashes, or with another missing file goes on wrongly). ``run_train --resume``
passes over it, says so, and resumes from the checkpoint before it, ending with the same
weights as a run that was never killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from logitcache.pipeline.student.train import DATA_STATE, DataStateCallback, TrainConfig, run_train


def _cfg(student: Path, cache: Path, out: Path, **kw) -> TrainConfig:
    # 24 examples, batch 4: six steps in one epoch; checkpoints at steps 2, 4 and 6.
    base = dict(student=str(student), cache=str(cache), out=str(out), loss="kl", max_steps=6, batch_size=4,
                save_steps=2, save_total_limit=None, logging_steps=1, learning_rate=1e-3, progress=False,
                shuffle_buffer=8)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# --- what "complete" means ----------------------------------------------------------------


def _fake_checkpoint(out: Path, step: int, *, trainer_state: bool = True, ranks: tuple[int, ...] = (0,),
                     world_size: int = 1) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    if trainer_state:
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for r in ranks:
        (ckpt / DATA_STATE.format(rank=r)).write_text(json.dumps({"world_size": world_size}))
    return ckpt


def test_the_highest_complete_checkpoint_is_chosen(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    four = _fake_checkpoint(tmp_path, 4)

    assert DataStateCallback.last_complete_checkpoint(tmp_path) == (four, [])


def test_a_checkpoint_without_trainer_state_is_passed_over(tmp_path):
    two = _fake_checkpoint(tmp_path, 2)
    four = _fake_checkpoint(tmp_path, 4, trainer_state=False)

    assert DataStateCallback.last_complete_checkpoint(tmp_path) == (two, [four])


def test_a_checkpoint_without_every_ranks_data_state_is_passed_over(tmp_path):
    two = _fake_checkpoint(tmp_path, 2, ranks=(0, 1), world_size=2)
    four = _fake_checkpoint(tmp_path, 4, ranks=(0,), world_size=2)  # rank 1 never wrote its state

    assert DataStateCallback.last_complete_checkpoint(tmp_path) == (two, [four])


def test_numbers_not_names_order_the_checkpoints(tmp_path):
    _fake_checkpoint(tmp_path, 9)
    ten = _fake_checkpoint(tmp_path, 10)  # "checkpoint-10" < "checkpoint-9" as strings
    (tmp_path / "checkpoint-final").mkdir()  # not a checkpoint-N folder

    assert DataStateCallback.last_complete_checkpoint(tmp_path) == (ten, [])


# --- a real kill while saving ---------------------------------------------------------------

# Runs run_train in a child process that SIGKILLs itself while transformers writes the
# optimizer of checkpoint-4: the weights and data state are on disk, trainer_state.json is not.
_KILLED_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    from transformers import Trainer
    from logitcache.pipeline.student.train import TrainConfig, run_train

    save = Trainer._save_optimizer_and_scheduler

    def save_then_die(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            open(os.path.join(output_dir, "optimizer.pt"), "wb").write(b"half an optimizer")
            os.kill(os.getpid(), signal.SIGKILL)
        save(self, output_dir)

    Trainer._save_optimizer_and_scheduler = save_then_die
    run_train(TrainConfig(**json.loads(sys.argv[1])))
    """
)


def test_a_kill_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, built_cache, student, capsys):
    straight = run_train(_cfg(student, built_cache, tmp_path / "straight"))

    killed = _cfg(student, built_cache, tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from dataclasses import asdict

    r = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(asdict(killed))],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == -9, r.stderr[-3000:]  # SIGKILL, not an ordinary failure
    partial = tmp_path / "killed" / "checkpoint-4"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()

    capsys.readouterr()
    resumed = run_train(_cfg(student, built_cache, tmp_path / "killed", resume=True))

    err = capsys.readouterr().err
    assert "passed over checkpoint-4" in err and "resuming from checkpoint-2" in err
    assert resumed.global_step == straight.global_step == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # the logged epoch counts on from the checkpoint, as in the run that was never stopped
    logged = json.loads((tmp_path / "killed" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    straight_log = json.loads((tmp_path / "straight" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    epochs = [(h["step"], h["epoch"]) for h in logged if "loss" in h]
    assert epochs == [(h["step"], h["epoch"]) for h in straight_log if "loss" in h]
    assert [e for _, e in epochs] == sorted(e for _, e in epochs)


def test_checkpoints_hold_the_data_state_as_json(tmp_path, built_cache, student):
    run_train(_cfg(student, built_cache, tmp_path / "run", max_steps=2))

    ckpt = tmp_path / "run" / "checkpoint-2"
    state = json.loads((ckpt / DATA_STATE.format(rank=0)).read_text())
    assert state["world_size"] == 1 and sum(state["consumed"].values()) == 8
    assert DataStateCallback.is_complete(ckpt)


def test_a_full_disk_at_a_checkpoint_stops_with_one_line_and_resumes(tmp_path, built_cache, student, monkeypatch):
    import errno

    from transformers import Trainer

    from logitcache import LogitCacheError

    real = Trainer._save_optimizer_and_scheduler

    def full_disk(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, output_dir)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_optimizer_and_scheduler", full_disk)
        with pytest.raises(LogitCacheError) as e:
            run_train(_cfg(student, built_cache, tmp_path / "run"))
    assert "\n" not in str(e.value) and "no space left on the device" in str(e.value) and "--resume" in str(e.value)

    resumed = run_train(_cfg(student, built_cache, tmp_path / "run", resume=True))
    assert resumed.global_step == 6
