"""Issue 12, stage 1 and storage: the end-of-sequence target, temperature-exact targets
(``--temperatures``) and the logit statistics (``--logit-stats``), through to stage-2 batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_config

from logitcache import LogitCacheError, open_cache, verify_cache
from logitcache.pipeline.student.targets import (
    require_logit_stats,
    std_normalised_logprobs,
    tau_column,
    tempered_logprobs,
)
from logitcache.pipeline.teacher.run import run_teacher
from logitcache.pipeline.teacher.topk import chunked_topk_from_logits_fn
from logitcache.storage import load_manifest
from logitcache.storage.fsutil import sha256_file
from logitcache.storage.rows import batch_to_rows, rows_to_table

EOS = 2  # the tiny tokenizer's </s>
FP16_REL = 2.0**-11  # a v1 log-prob is within this relative error of the teacher's fp32 value


@pytest.fixture(scope="module", params=["v1", "compact"])
def extras_cache(request, tmp_path_factory, teacher_dir, data_file) -> Path:
    out = tmp_path_factory.mktemp("extras") / request.param
    cfg = make_config(teacher_dir, data_file, out, codec=request.param, temperatures=(2, 4), logit_stats=True, limit=12)
    run_teacher(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def model(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32).eval()


def codec_step(m) -> float:
    """The compact codec's rounding of a stored log-prob, on top of v1's fp16 (0 for v1)."""
    from logitcache.storage.codec import ERROR_BOUND_NATS

    return ERROR_BOUND_NATS if m.codec == "compact" else 0.0


def full_logits(model, row) -> torch.Tensor:
    """The teacher's [n - 1, V] logits along a row, in float64 (the slow, obvious way)."""
    ids = torch.tensor(row["input_ids"], dtype=torch.long)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, :-1].double()


# --- chunked_topk: the log-normalisers from the chunk already there ---------------------------


@pytest.mark.parametrize("chunk", [3, 64])
def test_lse_at_other_temperatures_matches_float64_logsumexp(chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 32000, generator=g, dtype=torch.float64) * 4
    x[:, :3] += 20  # a peaked distribution, whose tail underflows at tau = 1 in fp32
    taus = [0.5, 2.0, 3.0, 4.0]
    top = chunked_topk_from_logits_fn(lambda a, b: x[a:b].float(), 40, torch.zeros(40, dtype=torch.long), 8, chunk, temperatures=taus)
    xf = x.float().double()  # what the head gives, exactly
    assert top.lse_tau.shape == (40, 4) and top.logit_std is None
    for j, tau in enumerate(taus):
        torch.testing.assert_close(top.lse_tau[:, j].double(), torch.logsumexp(xf / tau, -1), rtol=2e-7, atol=2e-6)
    torch.testing.assert_close(top.logsumexp.double(), torch.logsumexp(xf, -1), rtol=2e-7, atol=2e-6)


def test_logit_stats_match_torch_std_mean_and_the_std_normalised_logsumexp():
    g = torch.Generator().manual_seed(1)
    # std below and above 1 in one chunk: per-row powers of the one exp pass
    x = torch.randn(30, 5000, generator=g, dtype=torch.float64) * torch.linspace(0.1, 8, 30, dtype=torch.float64)[:, None]
    top = chunked_topk_from_logits_fn(lambda a, b: x[a:b].float(), 30, torch.zeros(30, dtype=torch.long), 4, 16, temperatures=[2.0], stats=True)
    xf = x.float().double()
    std = xf.std(-1)  # unbiased, torch's default
    # within float32 rounding of logits of this size (|x| up to ~30: ulp 2e-6)
    torch.testing.assert_close(top.logit_mean.double(), xf.mean(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(top.logit_std.double(), std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(top.lse_std.double(), torch.logsumexp(xf / (std[:, None] + 1e-4), -1), rtol=2e-7, atol=2e-6)


def test_without_extras_the_log_normaliser_is_computed_as_before():
    x = torch.randn(5, 100, generator=torch.Generator().manual_seed(2))
    plain = chunked_topk_from_logits_fn(lambda a, b: x[a:b].clone(), 5, torch.zeros(5, dtype=torch.long), 4)
    want = (x - x.max(-1, keepdim=True).values).exp().sum(-1).log() + x.max(-1).values
    assert torch.equal(plain.logsumexp, want) and plain.lse_tau is None and plain.lse_std is None


# --- targets.py on a tiny teacher: exact at tau, and std-normalised ----------------------------


def test_tempered_logprobs_equal_the_full_softmax_at_tau_and_give_the_true_tail(extras_cache, model):
    m = load_manifest(extras_cache)
    j = tau_column(m.temperatures, 2.0)
    for row in list(open_cache(extras_cache))[:4]:
        lp = torch.tensor(row["topk_logprobs"], dtype=torch.float64)
        got = tempered_logprobs(lp, torch.tensor(row["logsumexp"]).double(), torch.tensor(row["lse_tau"][:, j]).double(), 2.0)
        full = torch.log_softmax(full_logits(model, row) / 2.0, -1)
        want = full.gather(-1, torch.tensor(row["topk_ids"]).long())
        # the stored log-probs are rounded (fp16, or the compact codec's step): that error, halved by tau
        tol = (lp.abs() * FP16_REL + codec_step(m)) / 2.0 + 1e-5
        assert ((got - want).abs() <= tol).all()
        tail = 1 - got.exp().sum(-1)
        true_tail = 1 - want.exp().sum(-1)
        torch.testing.assert_close(tail, true_tail, atol=5e-3, rtol=0)
        assert (tail > 0.05).all()  # at tau = 2 the top-8 leaves real mass outside (renormalising would drop it)


def test_std_normalised_logprobs_equal_log_softmax_of_logits_over_std(extras_cache, model):
    m = load_manifest(extras_cache)
    for row in list(open_cache(extras_cache))[:4]:
        logits = full_logits(model, row)
        std = logits.std(-1)
        torch.testing.assert_close(torch.tensor(row["logit_std"]).double(), std, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(row["logit_mean"]).double(), logits.mean(-1), rtol=1e-5, atol=1e-5)
        lp = torch.tensor(row["topk_logprobs"], dtype=torch.float64)
        got = std_normalised_logprobs(
            lp, torch.tensor(row["logsumexp"]).double(), torch.tensor(row["logit_std"]).double(),
            torch.tensor(row["lse_std"]).double(),
        )
        want = torch.log_softmax(logits / (std[:, None] + 1e-4), -1).gather(-1, torch.tensor(row["topk_ids"]).long())
        tol = (lp.abs() * FP16_REL + codec_step(m)) / (std[:, None] + 1e-4) + 1e-4
        assert ((got - want).abs() <= tol).all()


def test_word_start_logprobs_equal_the_full_softmax_mass_on_word_starts(extras_cache, model, teacher_dir):
    from transformers import AutoTokenizer

    from logitcache.pipeline.token_bytes import word_start_mask

    assert load_manifest(extras_cache).word_start  # on by default with the hf engine
    mask = torch.from_numpy(word_start_mask(AutoTokenizer.from_pretrained(teacher_dir), model.config.vocab_size))
    assert 0 < int(mask.sum()) < len(mask)
    for row in list(open_cache(extras_cache))[:4]:
        want = torch.logsumexp(torch.log_softmax(full_logits(model, row), -1)[:, mask], -1)
        torch.testing.assert_close(torch.tensor(row["word_start_logprob"]).double(), want, rtol=1e-5, atol=1e-5)


def test_asking_for_a_temperature_the_cache_lacks_names_the_teacher_flag():
    assert tau_column([2.0, 4.0], 4) == 1
    with pytest.raises(LogitCacheError, match=r"logitcache teacher --temperatures 3"):
        tau_column([2.0], 3.0)
    with pytest.raises(LogitCacheError, match=r"--engine hf"):
        tau_column([], 2.0, has_logsumexp=False)


def test_a_cache_without_logit_stats_is_refused_naming_the_flag(built_cache):
    with pytest.raises(LogitCacheError, match="logitcache teacher --logit-stats"):
        require_logit_stats(load_manifest(built_cache), "MultiLevelOT code")


# --- the manifest, verify and the card ------------------------------------------------------------


def test_manifest_records_eos_temperatures_and_stats(extras_cache):
    m = load_manifest(extras_cache)
    assert (m.eos_id, m.temperatures, m.logit_stats) == (EOS, [2.0, 4.0], True)
    assert verify_cache(extras_cache).ok
    card = (extras_cache / "README.md").read_text()
    assert "end-of-sequence token (id 2)" in card and "tau = 2, 4" in card and "lse_std" in card


def test_the_default_is_tau_2_and_an_end_on_every_row_that_ended(built_cache):
    m = load_manifest(built_cache)
    assert m.temperatures == [2.0] and m.logit_stats is False and m.eos_id == EOS
    for row in open_cache(built_cache):
        assert row["input_ids"][-1] == EOS
        assert row["char_start"][-1] == row["char_end"][-1] == len(row["text"])
        assert row["lse_tau"].shape == (len(row["input_ids"]) - 1, 1)


def test_text_already_ending_with_eos_gets_no_second_one(teacher_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: hi\nA:", "response": " yes</s>"}) + "\n")
    run_teacher(make_config(teacher_dir, data, tmp_path / "c"), progress=False)
    (row,) = open_cache(tmp_path / "c")
    assert row["input_ids"][-1] == EOS and row["input_ids"][-2] != EOS
    assert row["char_end"][-1] - row["char_start"][-1] == len("</s>")  # the text's own characters
    assert verify_cache(tmp_path / "c").ok


def test_no_eos_appends_nothing_and_records_none(teacher_dir, data_file, tmp_path):
    run_teacher(make_config(teacher_dir, data_file, tmp_path / "c", eos=False, limit=4), progress=False)
    assert load_manifest(tmp_path / "c").eos_id is None
    assert all(row["input_ids"][-1] != EOS for row in open_cache(tmp_path / "c"))


def test_a_truncated_example_gets_no_end(teacher_dir, data_file, tmp_path):
    run_teacher(make_config(teacher_dir, data_file, tmp_path / "c", max_length=12), progress=False)
    rows = list(open_cache(tmp_path / "c"))
    assert any(r["truncated"] for r in rows)
    assert all((r["input_ids"][-1] == EOS) != bool(r["truncated"]) for r in rows)
    assert verify_cache(tmp_path / "c").ok


@pytest.mark.parametrize("change", [{"eos": False}, {"temperatures": (4,)}, {"logit_stats": True}, {"word_start": False}])
def test_a_rerun_with_other_extras_is_refused(teacher_dir, data_file, tmp_path, change):
    run_teacher(make_config(teacher_dir, data_file, tmp_path / "c", limit=2), progress=False)
    key = {"eos": "eos_id", "temperatures": "temperatures", "logit_stats": "logit_stats", "word_start": "word_start"}[next(iter(change))]
    with pytest.raises(LogitCacheError, match=f"{key}: cache has"):
        run_teacher(make_config(teacher_dir, data_file, tmp_path / "c", limit=4, **change), progress=False)


def _rewrite(cache: Path, damage) -> None:
    """Damage the first shard's rows, then re-record its size and hash (only value checks can tell)."""
    m = load_manifest(cache)
    path = cache / m.shards[0].path
    rows = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
            for b in pq.read_table(path).to_batches() for r in batch_to_rows(b)]
    damage(rows)
    pq.write_table(rows_to_table(rows, m.k, len(m.temperatures), m.logit_stats, m.word_start), path)
    data = json.loads((cache / "manifest.json").read_text())
    data["shards"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (cache / "manifest.json").write_text(json.dumps(data))


@pytest.fixture
def v1_extras_copy(tmp_path, teacher_dir, data_file) -> Path:
    out = tmp_path / "c"
    run_teacher(make_config(teacher_dir, data_file, out, temperatures=(2,), logit_stats=True, limit=6), progress=False)
    return out


@pytest.mark.parametrize(
    "column, value, words",
    [
        ("lse_tau", -50.0, "lse_tau at tau=2 is outside"),
        ("lse_tau", np.nan, "non-finite lse_tau"),
        ("logit_std", 0.0, "logit_std that is not positive"),
        ("lse_std", -1e3, "lse_std is outside"),
        ("logit_mean", 1e4, "logit_mean above the largest logit"),
        ("word_start_logprob", np.nan, "word-start log-prob that is not finite"),
        ("word_start_logprob", 0.5, "word-start log-prob that is not finite or above 0"),
    ],
)
def test_verify_reports_impossible_extra_values(v1_extras_copy, column, value, words):
    def damage(rows):
        rows[0][column] = rows[0][column].copy()
        rows[0][column][1] = value

    _rewrite(v1_extras_copy, damage)
    report = verify_cache(v1_extras_copy)
    assert any(words in p for p in report.problems), report.problems


def test_verify_reports_a_row_that_ended_without_its_eos(v1_extras_copy):
    def damage(rows):
        r = rows[0]
        n = len(r["input_ids"]) - 1  # drop the EOS and its position
        for name in ("input_ids", "char_start", "char_end"):
            r[name] = r[name][:n]
        for name in ("topk_ids", "topk_logprobs", "label_logprob", "logsumexp", "lse_tau", "logit_mean", "logit_std", "lse_std",
                     "word_start_logprob"):
            if name in r:
                r[name] = r[name][: n - 1]

    _rewrite(v1_extras_copy, damage)
    assert any("do not end with the end-of-sequence id 2" in p for p in verify_cache(v1_extras_copy).problems)


# --- old caches, merge, vllm --------------------------------------------------------------------


def old_cache(teacher_dir, data_file, out: Path) -> Path:
    """A cache as logitcache wrote it before issue 12: no eos_id, temperatures or logit_stats."""
    run_teacher(make_config(teacher_dir, data_file, out, eos=False, temperatures=(), word_start=False, limit=6), progress=False)
    data = json.loads((out / "manifest.json").read_text())
    for key in ("eos_id", "temperatures", "logit_stats", "word_start"):
        del data[key]
    (out / "manifest.json").write_text(json.dumps(data))
    return out


@pytest.mark.filterwarnings("ignore:.*the cache is not complete")
def test_a_cache_from_before_reads_as_no_eos_no_temperatures_no_stats(teacher_dir, data_file, tmp_path, student_tok):
    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.dataset import LogitCacheDataset

    out = old_cache(teacher_dir, data_file, tmp_path / "old")
    m = load_manifest(out)
    assert (m.eos_id, m.temperatures, m.logit_stats, m.word_start) == (None, [], False, False)
    assert verify_cache(out).ok
    examples = list(LogitCacheDataset(out, student_tok, max_length=64))
    batch = KDCollator()(examples[:3])
    assert not {"teacher_lse", "teacher_lse_tau", "teacher_logit_std", "teacher_lse_std"} & batch.keys()
    with pytest.raises(LogitCacheError, match="--temperatures 2"):
        tau_column(m.temperatures, 2.0)


def test_merge_refuses_parts_with_other_temperatures(teacher_dir, data_file, tmp_path):
    from logitcache.storage.merge import merge_caches

    parts = []
    for i, taus in enumerate([(2,), (4,)]):
        cfg = make_config(teacher_dir, data_file, tmp_path / "run", num_workers=2, worker_index=i, temperatures=taus)
        run_teacher(cfg, progress=False)
        parts.append(cfg.out_dir())
    with pytest.raises(LogitCacheError, match="temperatures"):
        merge_caches(tmp_path / "merged", parts)


def test_vllm_refuses_temperatures_and_stats_in_one_line_and_records_none(teacher_dir, data_file, tmp_path):
    for extra in ({"temperatures": (2,)}, {"logit_stats": True}, {"word_start": True}):
        cfg = make_config(teacher_dir, data_file, tmp_path / "c", engine="vllm", **extra)
        with pytest.raises(LogitCacheError, match="vLLM does not return") as e:
            cfg.validate()
        assert "\n" not in str(e.value) and "--engine hf" in str(e.value)
    cfg = make_config(teacher_dir, data_file, tmp_path / "c", engine="vllm")
    cfg.validate()
    assert cfg.extra_temperatures() == [] and not cfg.stores_word_start()


def test_cli_parses_temperatures():
    from logitcache.cli.teacher import parse_temperatures

    assert parse_temperatures(None) is None
    assert parse_temperatures("none") == parse_temperatures("") == ()
    assert parse_temperatures("2,4") == (2.0, 4.0)
    with pytest.raises(LogitCacheError, match="not a number"):
        parse_temperatures("2,x")


# --- stage 2: gathered at the aligned teacher positions, padded into the batch -------------------


@pytest.fixture(scope="module")
def student_tok():
    from logitcache.pipeline.tiny import generate_corpus, train_unigram_tokenizer

    return train_unigram_tokenizer(generate_corpus(2000, 7), 400)


def test_batches_carry_the_extra_columns_at_the_aligned_positions(extras_cache, teacher_dir):
    from transformers import AutoTokenizer

    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.features import featurizer_for_cache

    cache = open_cache(extras_cache)
    # The teacher's own tokenizer, position alignment: student position q is teacher position q.
    feat = featurizer_for_cache(cache, AutoTokenizer.from_pretrained(teacher_dir), alignment="position")
    rows = list(cache)[:3]
    examples = [feat(r) for r in rows]
    batch = KDCollator()(examples)
    B, T = batch["input_ids"].shape
    assert batch["teacher_lse"].shape == batch["teacher_logit_std"].shape == batch["teacher_lse_std"].shape == (B, T)
    assert batch["teacher_lse_tau"].shape == (B, T, 2) and batch["teacher_lse_tau"].dtype == torch.float32
    for i, row in enumerate(rows):
        q = torch.nonzero(batch["kd_mask"][i]).squeeze(-1)
        assert len(q) > 0
        # same tokenizer: the pairs are q <-> q
        np.testing.assert_array_equal(batch["teacher_ids"][i, q].numpy(), row["topk_ids"][q.numpy()])
        np.testing.assert_array_equal(batch["teacher_lse"][i, q].numpy(), row["logsumexp"][q.numpy()])
        np.testing.assert_array_equal(batch["teacher_lse_tau"][i, q].numpy(), row["lse_tau"][q.numpy()])
        np.testing.assert_array_equal(batch["teacher_lse_std"][i, q].numpy(), row["lse_std"][q.numpy()])
        off = ~batch["kd_mask"][i]
        assert (batch["teacher_logit_std"][i][off] == 1).all()


def test_generate_mode_ends_a_response_the_teacher_stopped(teacher_dir, data_file, tmp_path, monkeypatch):
    from logitcache.pipeline.teacher import run as run_module
    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.engine import GenerationConfig

    real = run_module.make_engine

    def stopping_engine(cfg):
        engine = real(cfg)
        generate = engine.generate
        engine.generate = lambda prompts, gen: [r[:3] for r in generate(prompts, gen)]  # stopped after 3 tokens
        return engine

    monkeypatch.setattr(run_module, "make_engine", stopping_engine)
    cfg = make_config(
        teacher_dir, data_file, tmp_path / "g", mode="generate", template=TextTemplate(prompt_field="prompt"),
        generation=GenerationConfig(max_new_tokens=12, temperature=0.0), limit=4,
    )
    r = run_teacher(cfg, progress=False)
    rows = list(open_cache(tmp_path / "g"))
    assert rows and r.unfinished == 0
    assert all(row["input_ids"][-1] == EOS and not row["truncated"] for row in rows)
    assert verify_cache(tmp_path / "g").ok


def test_resuming_a_cache_from_before_is_refused_naming_the_flags_that_match_it(teacher_dir, data_file, tmp_path):
    out = old_cache(teacher_dir, data_file, tmp_path / "old")
    with pytest.raises(LogitCacheError, match="--no-eos --temperatures none --no-word-start"):
        run_teacher(make_config(teacher_dir, data_file, out, limit=8), progress=False)
    r = run_teacher(make_config(teacher_dir, data_file, out, limit=8, eos=False, temperatures=(), word_start=False), progress=False)
    assert r.already_done == 6 and r.written == 2
