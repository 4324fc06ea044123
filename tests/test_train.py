"""Stage 2 training: every loss runs, bad combinations are refused, resume continues exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from logitcache import LogitCacheError
from logitcache.pipeline.student.train import TrainConfig, run_train


def _save_student(tokenizer, out: Path) -> Path:
    from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_model

    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=1))
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def same_vocab_student(tmp_path_factory, built_cache) -> Path:
    from transformers import AutoTokenizer

    return _save_student(AutoTokenizer.from_pretrained(built_cache / "tokenizer"), tmp_path_factory.mktemp("student") / "bpe")


@pytest.fixture(scope="session")
def other_vocab_student(tmp_path_factory) -> Path:
    from logitcache.pipeline.tiny import generate_corpus, train_unigram_tokenizer

    tok = train_unigram_tokenizer(generate_corpus(2000, 7), 400)
    return _save_student(tok, tmp_path_factory.mktemp("student") / "unigram")


def _cfg(student, cache, out, **kw) -> TrainConfig:
    base = dict(student=str(student), cache=str(cache), out=str(out), max_steps=3, batch_size=4,
                learning_rate=1e-3, save_steps=100, logging_steps=1, progress=False, shuffle_buffer=8)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(
    "loss, extra",
    [("sft", {}), ("uld", {}), ("mlot", {"mlot_k": 8}), ("mlot", {"mlot_k": 8, "mlot_variant": "code"}), ("uld", {"alignment": "offset"})],
)
def test_cross_tokenizer_losses_train_and_save(loss, extra, tmp_path, built_cache, other_vocab_student):
    r = run_train(_cfg(other_vocab_student, built_cache, tmp_path / "run", loss=loss, **extra))
    assert r.global_step == 3 and torch.isfinite(torch.tensor(r.train_loss))
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert r.feature_stats["examples"] > 0


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_kl_trains_a_same_vocabulary_student(kind, tmp_path, built_cache, same_vocab_student):
    r = run_train(_cfg(same_vocab_student, built_cache, tmp_path / "run", loss="kl", kl_kind=kind))
    assert r.global_step == 3 and r.feature_stats["fraction_matched"] == 1.0


def test_logs_ce_kd_and_aligned_fraction(tmp_path, built_cache, same_vocab_student):
    run_train(_cfg(same_vocab_student, built_cache, tmp_path / "run", loss="kl", save_steps=3))
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert logged and all({"ce", "kd", "kd_fraction"} <= set(h) for h in logged)
    assert all(h["kd"] > 0 for h in logged)


def test_kl_refuses_a_student_with_another_vocabulary(tmp_path, built_cache, other_vocab_student):
    with pytest.raises(LogitCacheError, match="teacher's vocabulary.*uld"):
        run_train(_cfg(other_vocab_student, built_cache, tmp_path / "run", loss="kl"))
    assert not (tmp_path / "run").exists()


def test_mlot_refuses_a_cache_whose_k_is_too_small(tmp_path, built_cache, other_vocab_student):
    with pytest.raises(LogitCacheError, match="k=8.*--top-k 50"):
        run_train(_cfg(other_vocab_student, built_cache, tmp_path / "run", loss="mlot"))


def test_not_a_cache_is_refused(tmp_path, other_vocab_student):
    (tmp_path / "junk").mkdir()
    with pytest.raises(LogitCacheError, match="not a logitcache cache"):
        run_train(_cfg(other_vocab_student, tmp_path / "junk", tmp_path / "run"))


def test_corrupted_shard_is_named_before_training_starts(tmp_path, cache_copy, other_vocab_student):
    shard = cache_copy / "data" / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LogitCacheError, match="shard-00001"):
        run_train(_cfg(other_vocab_student, cache_copy, tmp_path / "run", max_steps=20))


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path, built_cache, other_vocab_student):
    run_train(_cfg(other_vocab_student, built_cache, tmp_path / "run", max_steps=2, save_steps=2))
    with pytest.raises(LogitCacheError, match="--resume"):
        run_train(_cfg(other_vocab_student, built_cache, tmp_path / "run", max_steps=4))


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, built_cache, other_vocab_student):
    # 24 examples, batch 4: 6 steps per epoch; stop after 2 (mid-epoch), resume to 5. A constant
    # learning rate, so that stopping at step 2 leaves the same schedule as a run that was killed.
    kw = dict(loss="uld", lr_scheduler="constant")
    straight = run_train(_cfg(other_vocab_student, built_cache, tmp_path / "straight", max_steps=5, save_steps=5, **kw))
    run_train(_cfg(other_vocab_student, built_cache, tmp_path / "resumed", max_steps=2, save_steps=2, **kw))
    state2 = json.loads((tmp_path / "resumed" / "checkpoint-2" / "logitcache_data_state_rank0.json").read_text())
    assert sum(state2["consumed"].values()) == 8
    resumed = run_train(_cfg(other_vocab_student, built_cache, tmp_path / "resumed", max_steps=5, save_steps=5, resume=True, **kw))
    assert resumed.global_step == straight.global_step == 5
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_config_file_sets_options_and_flags_win(tmp_path, built_cache, other_vocab_student):
    from typer.testing import CliRunner

    from logitcache.cli import app

    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"student: {other_vocab_student}\ncache: {built_cache}\nloss: sft\nmax_steps: 2\nbatch_size: 4\nsave_steps: 100\n")
    r = CliRunner().invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "trained sft student for 1 steps" in r.output
    saved = json.loads((tmp_path / "run" / "logitcache_train_config.json").read_text())
    assert saved["loss"] == "sft" and saved["batch_size"] == 4 and saved["max_steps"] == 1


def test_config_file_with_unknown_key_is_refused(tmp_path):
    from typer.testing import CliRunner

    from logitcache.cli import app

    cfg = tmp_path / "train.yaml"
    cfg.write_text("lerning_rate: 0.1\n")
    r = CliRunner().invoke(app, ["train", "--config", str(cfg)])
    assert r.exit_code == 2 and "unknown keys ['lerning_rate']" in r.output and "Traceback" not in r.output


def test_torchrun_two_processes_on_cpu(tmp_path, built_cache, other_vocab_student):
    """DDP with gloo: both ranks train in lockstep and each reads its own half of the cache."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGITCACHE_NO_PROGRESS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        "-m", "logitcache", "train", "--student", str(other_vocab_student), "--cache", str(built_cache),
        "--out", str(tmp_path / "ddp"), "--loss", "uld", "--max-steps", "3", "--batch-size", "2",
        "--save-steps", "3", "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    ckpt = tmp_path / "ddp" / "checkpoint-3"
    states = [json.loads((ckpt / f"logitcache_data_state_rank{i}.json").read_text()) for i in (0, 1)]
    assert [s["world_size"] for s in states] == [2, 2]
    assert [sum(s["consumed"].values()) for s in states] == [6, 6]  # 3 steps x batch 2 on each rank
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "case, needle",
    [
        ("not a cache", "not a logitcache cache"),
        ("kl, other vocabulary", "teacher's vocabulary"),
        ("mlot, k too small", "--top-k 50"),
        ("missing --out", "missing --out"),
        ("unknown loss", "--loss 'xent'"),
        ("zero batch size", "--batch-size must be positive"),
        ("student path missing", "no such directory"),
    ],
)
def test_train_cli_refusals_are_one_line(case, needle, tmp_path, built_cache, other_vocab_student):
    from typer.testing import CliRunner

    from logitcache.cli import app

    (tmp_path / "junk").mkdir()
    base = ["train", "--student", str(other_vocab_student), "--no-progress"]
    args = {
        "not a cache": base + ["--cache", str(tmp_path / "junk"), "--out", str(tmp_path / "o")],
        "kl, other vocabulary": base + ["--cache", str(built_cache), "--out", str(tmp_path / "o"), "--loss", "kl"],
        "mlot, k too small": base + ["--cache", str(built_cache), "--out", str(tmp_path / "o"), "--loss", "mlot"],
        "missing --out": base + ["--cache", str(built_cache)],
        "unknown loss": base + ["--cache", str(built_cache), "--out", str(tmp_path / "o"), "--loss", "xent"],
        "zero batch size": base + ["--cache", str(built_cache), "--out", str(tmp_path / "o"), "--batch-size", "0"],
        "student path missing": ["train", "--student", str(tmp_path / "nope"), "--cache", str(built_cache),
                                 "--out", str(tmp_path / "o")],
    }[case]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("loss", ["uld", "kl"])
def test_kd_term_is_the_same_chunked_or_in_one_pass(loss):
    from logitcache.pipeline.student.train import kd_term

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t_lp = torch.log_softmax(torch.randn(2, 5, 11, generator=g, dtype=torch.float64), -1).topk(4, -1)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    values, grads = [], []
    for chunk in (0, 3):  # 0: automatic (one pass at this size); 3: chunks of 3 positions
        cfg = TrainConfig(student="s", cache="c", out="o", loss=loss, kd_chunk_size=chunk)
        v = kd_term(cfg, logits, t_lp.values, t_lp.indices, mask)
        (g_,) = torch.autograd.grad(v, logits)
        values.append(v)
        grads.append(g_)
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1])
