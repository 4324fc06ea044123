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


@pytest.fixture(scope="session")
def stats_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    """The built_cache's records with the log-partitions at 2 and 4 and the logit statistics."""
    from conftest import make_config

    from logitcache.pipeline.teacher.run import run_teacher

    out = tmp_path_factory.mktemp("cache") / "stats"
    run_teacher(make_config(teacher_dir, data_file, out, temperatures=(2, 4), logit_stats=True), progress=False)
    return out


@pytest.mark.parametrize(
    "loss, extra",
    [("sft", {}), ("uld", {}), ("mlot", {"mlot_k": 8}), ("uld", {"alignment": "offset"})],
)
def test_cross_tokenizer_losses_train_and_save(loss, extra, tmp_path, built_cache, other_vocab_student):
    r = run_train(_cfg(other_vocab_student, built_cache, tmp_path / "run", loss=loss, **extra))
    assert r.global_step == 3 and torch.isfinite(torch.tensor(r.train_loss))
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert r.feature_stats["examples"] > 0


@pytest.mark.parametrize(
    "loss, extra",
    [
        ("mlot", {"mlot_k": 8, "mlot_variant": "code"}),  # needs --logit-stats
        ("uld", {"kd_temperature": 4.0, "kd_reduction": "token"}),
        ("mlot", {"mlot_k": 8, "kd_temperature": 4.0, "kd_chunk_size": 16}),  # tau_SL = 4, tau_SD = 2; unfused
    ],
)
def test_losses_that_need_the_cache_extras_train(loss, extra, tmp_path, stats_cache, other_vocab_student):
    r = run_train(_cfg(other_vocab_student, stats_cache, tmp_path / "run", loss=loss, **extra))
    assert r.global_step == 3 and torch.isfinite(torch.tensor(r.train_loss))


@pytest.mark.parametrize("kind", ["forward", "jsd"])
def test_kl_at_a_temperature_trains(kind, tmp_path, stats_cache, same_vocab_student):
    r = run_train(_cfg(same_vocab_student, stats_cache, tmp_path / "run", loss="kl", kl_kind=kind, kd_temperature=2.0))
    assert r.global_step == 3 and torch.isfinite(torch.tensor(r.train_loss))


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
        ("temperature the cache lacks", "logitcache teacher --temperatures 3"),
        ("mlot code without stats", "logitcache teacher --logit-stats"),
        ("bad reduction", "--kd-reduction 'mean'"),
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
        "temperature the cache lacks": base + ["--cache", str(built_cache), "--out", str(tmp_path / "o"),
                                               "--kd-temperature", "3"],
        "mlot code without stats": base + ["--cache", str(built_cache), "--out", str(tmp_path / "o"), "--loss", "mlot",
                                           "--mlot-k", "8", "--mlot-variant", "code"],
        "bad reduction": base + ["--cache", str(built_cache), "--out", str(tmp_path / "o"), "--kd-reduction", "mean"],
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


# --- exact teacher targets (issue 12 §1b, §1c, §2) and the reduction (§1d) ------------------------
def _manifest(temperatures=(), logit_stats=False, logsumexp=True):
    from types import SimpleNamespace

    return SimpleNamespace(temperatures=list(temperatures), logit_stats=logit_stats, teacher={"logsumexp": logsumexp})


@pytest.mark.parametrize(
    "overrides, manifest, needle",
    [
        ({"loss": "uld", "kd_temperature": 3.0}, _manifest([2.0]), "--loss uld --kd-temperature 3: .*`logitcache teacher --temperatures 3`"),
        ({"loss": "kl", "kd_temperature": 2.0}, _manifest([], logsumexp=False), "--engine hf --temperatures 2"),
        ({"loss": "mlot"}, _manifest([]), "tau_SD.*`logitcache teacher --temperatures 2`.*--approximate-temperature"),
        ({"loss": "mlot", "kd_temperature": 4.0}, _manifest([2.0]), r"temperature 4 \(--kd-temperature\).*--temperatures 4"),
        ({"loss": "mlot", "mlot_variant": "code"}, _manifest([2.0]), "`logitcache teacher --logit-stats`"),
        ({"loss": "mlot", "mlot_variant": "code"}, _manifest([], logsumexp=False), "--engine hf --logit-stats"),
    ],
)
def test_a_cache_without_the_targets_a_loss_needs_is_refused_in_one_line(overrides, manifest, needle):
    from logitcache.pipeline.student.train import check_teacher_targets

    cfg = TrainConfig(student="s", cache="c", out="o", **overrides)
    with pytest.raises(LogitCacheError, match=needle) as e:
        check_teacher_targets(cfg, manifest)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides, manifest",
    [
        ({"loss": "uld"}, _manifest([])),  # temperature 1 needs nothing: caches from before issue 12 work
        ({"loss": "kl", "kd_temperature": 4.0}, _manifest([2.0, 4.0])),
        ({"loss": "mlot"}, _manifest([2.0])),
        ({"loss": "mlot", "approximate_temperature": True}, _manifest([])),  # the biased opt-in
        ({"loss": "mlot", "mlot_variant": "code"}, _manifest([], logit_stats=True)),
        ({"loss": "sft", "kd_temperature": 3.0}, _manifest([], logsumexp=False)),
    ],
)
def test_a_cache_with_what_the_loss_needs_is_accepted(overrides, manifest):
    from logitcache.pipeline.student.train import check_teacher_targets

    check_teacher_targets(TrainConfig(student="s", cache="c", out="o", **overrides), manifest)


def test_teacher_targets_pick_the_cache_column_of_each_temperature():
    from logitcache.pipeline.student.train import teacher_targets

    g = torch.Generator().manual_seed(0)
    lp = torch.randn(2, 3, 4, generator=g)
    lse, lse_tau = torch.randn(2, 3, generator=g), torch.randn(2, 3, 2, generator=g)
    std, lse_std = torch.rand(2, 3, generator=g) + 0.5, torch.randn(2, 3, generator=g)
    extras = {"teacher_lse": lse, "teacher_lse_tau": lse_tau, "teacher_logit_std": std, "teacher_lse_std": lse_std}
    cfg = TrainConfig(student="s", cache="c", out="o", loss="uld", kd_temperature=4.0)
    tempered, std_lp = teacher_targets(cfg, lp, extras, [2.0, 4.0])
    assert list(tempered) == [4.0] and std_lp is None
    torch.testing.assert_close(tempered[4.0], (lp + lse[..., None]) / 4 - lse_tau[..., 1:2])
    mlot = TrainConfig(student="s", cache="c", out="o", loss="mlot", kd_temperature=4.0)
    assert sorted(teacher_targets(mlot, lp, extras, [2.0, 4.0])[0]) == [2.0, 4.0]
    code = TrainConfig(student="s", cache="c", out="o", loss="mlot", mlot_variant="code")
    _, std_lp = teacher_targets(code, lp, extras, [2.0, 4.0])
    torch.testing.assert_close(std_lp, (lp + lse[..., None]) / (std[..., None] + 1e-4) - lse_std[..., None])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kd_temperature": 0.0}, "--kd-temperature must be a positive number"),
        ({"kd_reduction": "batch"}, "--kd-reduction 'batch'"),
        ({"loss": "mlot", "mlot_variant": "code", "kd_temperature": 2.0}, "--mlot-variant code runs at temperature 1"),
    ],
)
def test_bad_temperature_and_reduction_options_are_refused(overrides, message):
    with pytest.raises(LogitCacheError, match=message):
        TrainConfig(student="s", cache="c", out="o", **overrides).validate()


@pytest.mark.parametrize("loss", ["uld", "kl", "mlot"])
@pytest.mark.parametrize("reduction", ["sample", "token"])
def test_fused_and_two_step_trainer_losses_agree_at_a_temperature(loss, reduction):
    # The trainer's two paths (fused; --kd-chunk-size: CE then the standalone loss, which computes in
    # float32; fused == standalone to 1e-10 in float64 is test_losses_fused's).
    from logitcache.pipeline.student.train import batch_loss, fused_loss_of

    g = torch.Generator().manual_seed(1)
    b, t, v, k = 3, 9, 23, 12
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    full = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    lp, ids = torch.log_softmax(full, -1).topk(k, -1)
    tempered = {tau: torch.log_softmax(full / tau, -1).gather(-1, ids) for tau in (2.0, 3.0)}
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, :8], mask[1, 2:4], mask[2, 1:6] = True, True, True
    extra = {"mlot_k": 8} if loss == "mlot" else {}
    results = []
    for chunk in (0, 4):
        cfg = TrainConfig(student="s", cache="c", out="o", loss=loss, kd_temperature=3.0, kd_reduction=reduction,
                          kd_chunk_size=chunk, **extra)
        x = logits.clone().requires_grad_()
        total, ce, kd = batch_loss(cfg, x, labels, lp, ids, mask, fused_loss_of(cfg), tempered)
        total.backward()
        results.append((total.detach(), kd.detach(), x.grad))
    (t0, kd0, g0), (t1, kd1, g1) = results
    assert float(t1) == pytest.approx(float(t0), rel=1e-5) and float(kd1) == pytest.approx(float(kd0), rel=1e-5)
    assert float((g0 - g1).abs().max()) < 1e-6


def test_mlot_with_approximate_temperature_runs_on_a_batch_without_lse_tau():
    # A cache from before issue 12: no teacher_lse_tau in the batch, so MultiLevelOT falls back to
    # the renormalised top-k at tau_SD (the opt-in); without the opt-in the loss refuses.
    from logitcache.pipeline.student.train import kd_term, teacher_targets

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 30, generator=g, dtype=torch.float64, requires_grad=True)
    lp, ids = torch.log_softmax(torch.randn(2, 6, 40, generator=g, dtype=torch.float64), -1).topk(10, -1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    cfg = TrainConfig(student="s", cache="c", out="o", loss="mlot", mlot_k=8, approximate_temperature=True)
    tempered, std_lp = teacher_targets(cfg, lp, {"teacher_lse": torch.zeros(2, 6)}, [])
    assert tempered == {} and std_lp is None
    assert torch.isfinite(kd_term(cfg, logits, lp, ids, mask, tempered, std_lp))
    strict = TrainConfig(student="s", cache="c", out="o", loss="mlot", mlot_k=8)
    with pytest.raises(ValueError, match="--temperatures 2"):
        kd_term(strict, logits, lp, ids, mask, {}, None)


def test_temperature_and_reduction_flags_reach_the_config(tmp_path, built_cache, other_vocab_student):
    from typer.testing import CliRunner

    from logitcache.cli import app

    args = ["train", "--student", str(other_vocab_student), "--cache", str(built_cache), "--out", str(tmp_path / "run"),
            "--loss", "uld", "--kd-temperature", "2", "--kd-reduction", "token", "--max-steps", "1", "--batch-size", "4",
            "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "logitcache_train_config.json").read_text())
    assert (saved["kd_temperature"], saved["kd_reduction"], saved["approximate_temperature"]) == (2.0, "token", False)


def test_an_eval_cache_with_the_temperature_in_another_column_is_refused():
    # The trainer reads teacher_lse_tau's columns in the order of --cache's manifest.
    from logitcache.pipeline.student.train import check_eval_targets

    cfg = TrainConfig(student="s", cache="c", out="o", loss="uld", kd_temperature=4.0)
    check_eval_targets(cfg, _manifest([2.0, 4.0]), _manifest([2.0, 4.0, 8.0]))
    with pytest.raises(LogitCacheError, match="--eval-cache has temperature 4 in another column"):
        check_eval_targets(cfg, _manifest([2.0, 4.0]), _manifest([4.0]))
    with pytest.raises(LogitCacheError, match="--eval-cache: .*--temperatures 4"):
        check_eval_targets(cfg, _manifest([2.0, 4.0]), _manifest([2.0]))
