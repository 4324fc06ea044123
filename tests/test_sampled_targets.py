"""Sampled targets (issue 15 §3): stage-1 draws from the teacher, stored as ids + counts, and the
forward KL to them (Random Sampling KD), unbiased where top-k is not."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config

from logitcache import LogitCacheError, open_cache, verify_cache
from logitcache.pipeline.student.losses import kl_loss, sampled_kl_loss
from logitcache.pipeline.teacher.draws import draw_uniforms, sequence_key
from logitcache.pipeline.teacher.run import run_teacher
from logitcache.pipeline.teacher.topk import chunked_topk_from_logits_fn
from logitcache.storage.samples import counts_from_draws

N = 12


@pytest.fixture(scope="session")
def sampled_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    """The 24 records with top-8 and 12 draws per position."""
    out = tmp_path_factory.mktemp("cache") / "sampled"
    run_teacher(make_config(teacher_dir, data_file, out, sample=N), progress=False)
    return out


@pytest.fixture(scope="session")
def sample_only_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    """The same draws without any top-k (--top-k 0 --sample 12)."""
    out = tmp_path_factory.mktemp("cache") / "sample-only"
    run_teacher(make_config(teacher_dir, data_file, out, top_k=0, sample=N), progress=False)
    return out


def _draws(cache) -> dict:
    return {r["id"]: (r["sample_ids"], r["sample_counts"]) for r in open_cache(cache)}


def _same_draws(a, b) -> bool:
    da, db = _draws(a), _draws(b)
    return da.keys() == db.keys() and all(
        np.array_equal(da[i][0], db[i][0]) and np.array_equal(da[i][1], db[i][1]) for i in da)


# --- stage 1 ----------------------------------------------------------------------------------


def test_counts_sum_to_n_and_the_manifest_says_how_they_were_drawn(sampled_cache):
    m = json.loads((sampled_cache / "manifest.json").read_text())
    assert m["sample"] == N and m["sample_proposal"]["distribution"] == "teacher" and m["sample_proposal"]["seed"] == 0
    for ids, counts in _draws(sampled_cache).values():
        assert (counts.astype(int).sum(axis=1) == N).all()
        assert ((ids < 512) & (ids >= 0)).all()
    assert verify_cache(sampled_cache).ok


def test_a_resumed_run_draws_the_same(tmp_path, teacher_dir, data_file, sampled_cache):
    out = tmp_path / "resumed"
    # A first run stops after 10 records; the rerun batches the rest differently.
    run_teacher(make_config(teacher_dir, data_file, out, sample=N, limit=10, batch_size=3), progress=False)
    run_teacher(make_config(teacher_dir, data_file, out, sample=N, batch_size=3), progress=False)
    got, want = _draws(out), _draws(sampled_cache)
    assert got.keys() == want.keys()
    for rid in want:
        np.testing.assert_array_equal(got[rid][0][:, : want[rid][0].shape[1]], want[rid][0])
        np.testing.assert_array_equal(got[rid][1][:, : want[rid][1].shape[1]], want[rid][1])


def test_a_resume_with_another_sample_is_refused(tmp_path, teacher_dir, data_file):
    out = tmp_path / "c"
    run_teacher(make_config(teacher_dir, data_file, out, sample=N, limit=4), progress=False)
    with pytest.raises(LogitCacheError, match="sample"):
        run_teacher(make_config(teacher_dir, data_file, out, sample=N + 1), progress=False)


def test_draw_frequencies_match_the_teacher_softmax():
    torch.manual_seed(0)
    V, P, S = 16, 4000, 12
    logits = torch.randn(V) * 2
    p = torch.softmax(logits, -1).double().numpy()
    rows = logits.expand(P, V).contiguous()
    uniforms = torch.from_numpy(draw_uniforms([sequence_key(0, "x")], [P], S))
    top = chunked_topk_from_logits_fn(lambda a, b: rows[a:b].clone(), P, torch.zeros(P, dtype=torch.long), 4,
                                      chunk=512, uniforms=uniforms)
    freq = np.bincount(top.sample_ids.reshape(-1).numpy(), minlength=V) / (P * S)
    sd = np.sqrt(p * (1 - p) / (P * S))
    assert np.all(np.abs(freq - p) < 5 * sd + 1e-4), (freq, p)  # a loose 5-sigma bound per id


def test_counts_from_draws_keeps_distinct_ids_ascending():
    ids, counts = counts_from_draws(np.array([[5, 2, 5, 5], [1, 1, 1, 1]]))
    np.testing.assert_array_equal(ids, [[2, 5, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(counts, [[1, 3, 0, 0], [4, 0, 0, 0]])


def test_sample_only_cache_opens_and_verifies(sample_only_cache, sampled_cache):
    m = json.loads((sample_only_cache / "manifest.json").read_text())
    assert m["k"] == 0 and m["sample"] == N
    assert verify_cache(sample_only_cache).ok
    row = next(iter(open_cache(sample_only_cache)))
    assert row["topk_ids"].shape == (len(row["input_ids"]) - 1, 0)
    want = _draws(sampled_cache)[row["id"]]
    np.testing.assert_array_equal(row["sample_ids"], want[0])


def test_verify_names_counts_that_do_not_sum_to_n(tmp_path, sampled_cache):
    cache = tmp_path / "c"
    shutil.copytree(sampled_cache, cache)
    m = json.loads((cache / "manifest.json").read_text())
    m["sample"] = N + 1  # the stored counts still sum to N
    (cache / "manifest.json").write_text(json.dumps(m))
    report = verify_cache(cache)
    assert not report.ok
    assert any("do not sum to the manifest's sample=13" in p and "shard-" in p and "first: id" in p
               for p in report.problems), report.problems


@pytest.mark.parametrize("overrides, match", [
    (dict(sample=-1), "--sample must be between 1 and 255"),
    (dict(sample=256), "--sample must be between 1 and 255"),
    (dict(top_k=0), "--top-k 0 stores sampled targets alone, with --sample N"),
    (dict(sample=4, engine="vllm", temperatures=(), word_start=False), "--sample needs the teacher's full distribution"),
])
def test_stage1_refusals(tmp_path, overrides, match):
    cfg = make_config(Path("t"), Path("d"), tmp_path / "c", **overrides)
    with pytest.raises(LogitCacheError, match=re_escape(match)):
        cfg.validate()


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


# --- the loss -----------------------------------------------------------------------------------


def _reference(student_logits, ids, w):
    """Slow and plain: per position, sum over the drawn ids of w (log w - log softmax)."""
    total = 0.0
    for n in range(student_logits.shape[0]):
        log_s = torch.log_softmax(student_logits[n].double(), -1)
        total += sum(float(w[n, j]) * (math.log(float(w[n, j])) - float(log_s[ids[n, j]]))
                     for j in range(ids.shape[1]) if w[n, j] > 0)
    return total / student_logits.shape[0]


def test_sampled_kl_matches_a_slow_reference():
    torch.manual_seed(1)
    z = torch.randn(5, 30)
    draws = torch.multinomial(torch.softmax(torch.randn(30), -1), 5 * 8, replacement=True).reshape(5, 8).numpy()
    ids, counts = counts_from_draws(draws)
    w = torch.from_numpy(counts.astype(np.float32) / 8)
    got = sampled_kl_loss(z, torch.from_numpy(ids).long(), w, torch.ones(5, dtype=torch.bool))
    assert float(got) == pytest.approx(_reference(z, ids, w), rel=1e-5)


def test_sampled_kl_by_hand():
    # Uniform student over 4 ids (log s = -log 4); draws 3 x id 1, 1 x id 2 of N = 4:
    # 0.75 (log 0.75 + log 4) + 0.25 (log 0.25 + log 4) = 0.75 log 3 + 0 = 0.8240
    z = torch.zeros(1, 4)
    loss = sampled_kl_loss(z, torch.tensor([[1, 2, 0]]), torch.tensor([[0.75, 0.25, 0.0]]), torch.tensor([True]))
    assert float(loss) == pytest.approx(0.75 * math.log(3), abs=1e-6)


def test_sampled_kl_masked_out_is_zero_with_a_gradient():
    z = torch.randn(2, 5, requires_grad=True)
    loss = sampled_kl_loss(z, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3) / 3, torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and z.grad is not None and float(z.grad.abs().sum()) == 0.0


def _grad(loss_fn, z0):
    z = z0.clone().requires_grad_(True)
    loss_fn(z).backward()
    return z.grad


def test_sampled_gradient_is_unbiased_where_top_k_is_not():
    """Averaged over many draws, d(loss)/d(student logits) -> softmax(z) - p (full forward KL's
    gradient); top-k's gradient stays off by the tail it drops."""
    gen = torch.Generator().manual_seed(2)
    V, S, seeds = 40, 12, 3000
    # A heavy tail: the top 4 ids hold about half the mass.
    t_logits = torch.cat([torch.full((4,), 3.0), torch.randn(V - 4, generator=gen) * 0.3 + 1.0])
    p = torch.softmax(t_logits, -1)
    z0 = torch.randn(1, V, generator=gen)
    full = torch.softmax(z0, -1) - p[None]
    mask = torch.tensor([True])
    draws = torch.multinomial(p, seeds * S, replacement=True, generator=gen).reshape(seeds, S).numpy()
    ids, counts = counts_from_draws(draws)
    z = z0.expand(seeds, V).clone().requires_grad_(True)
    # One position per seed, the mean over them: the gradient of each row is that seed's estimate.
    sampled_kl_loss(z, torch.from_numpy(ids).long(), torch.from_numpy(counts.astype(np.float32) / S),
                    torch.ones(seeds, dtype=torch.bool)).backward()
    mean_grad = z.grad.sum(0, keepdim=True)  # undo the 1/seeds of the mean
    # Per id, the estimate's standard error is sqrt(p (1 - p) / (S * seeds)).
    se = torch.sqrt(p * (1 - p) / (S * seeds))
    assert torch.all((mean_grad - full).abs() < 5 * se + 1e-5), (mean_grad - full).abs().max()
    lp, top = torch.topk(torch.log(p), 4)
    g_top = _grad(lambda zz: kl_loss(zz, lp[None], top[None], mask, kind="forward", chunk_size=None), z0)
    assert (g_top - full).abs().max() > 20 * float(se.max())  # biased: far outside the sampling error


# --- stage 2 ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sample_student(tmp_path_factory, sample_only_cache) -> Path:
    from transformers import AutoTokenizer

    from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_model

    out = tmp_path_factory.mktemp("student") / "tiny"
    tok = AutoTokenizer.from_pretrained(sample_only_cache / "tokenizer")
    build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=1)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _train_cfg(student, cache, out, **kw):
    from logitcache.pipeline.student.train import TrainConfig

    base = dict(student=str(student), cache=str(cache), out=str(out), max_steps=3, batch_size=4, learning_rate=1e-3,
                save_steps=100, logging_steps=1, progress=False, shuffle_buffer=8, loss="kl", kd_targets="sample")
    base.update(kw)
    return TrainConfig(**base)


def test_a_sample_only_cache_trains_with_kl(tmp_path, sample_only_cache, sample_student):
    from logitcache.pipeline.student.train import run_train

    r = run_train(_train_cfg(sample_student, sample_only_cache, tmp_path / "run"))
    assert r.global_step == 3 and math.isfinite(r.train_loss)


@pytest.mark.parametrize("kw, match", [
    (dict(loss="uld"), "--kd-targets sample works with --loss kl only"),
    (dict(loss="mlot"), "--kd-targets sample works with --loss kl only"),
    (dict(kl_kind="reverse"), "estimates forward KL only"),
    (dict(kl_kind="jsd"), "estimates forward KL only"),
    (dict(kd_temperature=2.0), "draws from the teacher at temperature 1"),
])
def test_stage2_refusals(tmp_path, kw, match):
    with pytest.raises(LogitCacheError, match=re_escape(match)):
        _train_cfg("s", "c", tmp_path / "run", **kw).validate()


def test_topk_targets_on_a_sample_only_cache_are_refused(tmp_path, sample_only_cache, sample_student):
    from logitcache.pipeline.student.train import run_train

    with pytest.raises(LogitCacheError, match="sampled targets only"):
        run_train(_train_cfg(sample_student, sample_only_cache, tmp_path / "run", kd_targets="topk"))


# --- the other commands on a cache of draws -------------------------------------------------


@pytest.mark.parametrize("codec", ["compact", "v1"])
def test_convert_keeps_the_draws(tmp_path, sample_only_cache, codec):
    from logitcache.storage.convert import convert_cache

    convert_cache(sample_only_cache, tmp_path / "out", codec)
    assert _same_draws(tmp_path / "out", sample_only_cache)
    assert verify_cache(tmp_path / "out").ok


def test_merged_parts_hold_the_draws_of_a_single_run(tmp_path, teacher_dir, data_file, sample_only_cache):
    from logitcache.storage.merge import merge_caches

    for index in range(2):
        run_teacher(make_config(teacher_dir, data_file, tmp_path / "parts", top_k=0, sample=N, num_workers=2,
                                worker_index=index), progress=False)
    merge_caches(tmp_path / "merged", sorted((tmp_path / "parts").glob("part-*")))
    assert _same_draws(tmp_path / "merged", sample_only_cache)


def test_inspect_stats_on_a_cache_of_draws_only(sample_only_cache):
    from typer.testing import CliRunner

    from logitcache.cli import app

    r = CliRunner().invoke(app, ["inspect", str(sample_only_cache), "--stats"])
    assert r.exit_code == 0, r.output
    assert "k = 0" in r.output and "draws per position" in r.output and "top-0" not in r.output
