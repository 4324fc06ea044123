"""End to end: `--loss hybrid` and `--loss alm` train a student of another tokenizer from a tiny cache."""

import json
from pathlib import Path

import pytest
import torch

from logitcache.pipeline.student.train import TrainConfig, run_train


def _cfg(student, cache, out, **kw) -> TrainConfig:
    base = dict(student=str(student), cache=str(cache), out=str(out), max_steps=2, batch_size=4, learning_rate=1e-3,
                save_steps=2, logging_steps=1, progress=False, shuffle_buffer=8)
    base.update(kw)
    return TrainConfig(**base)


def _logged(out: Path) -> list[dict]:
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def test_hybrid_trains_and_logs_the_mapped_mass(tmp_path, built_cache, metaspace_student, capfd):
    r = run_train(_cfg(metaspace_student, built_cache, tmp_path / "run", loss="hybrid"))
    assert r.global_step == 2 and torch.isfinite(torch.tensor(r.train_loss))
    logged = _logged(tmp_path / "run")
    assert logged and all(0 < h["hybrid_mapped_mass"] <= 1 and h["kd"] > 0 for h in logged)
    assert "of the teacher's top-k mass" in capfd.readouterr().err
    assert list((tmp_path / "run").glob("vocab-map-*.npy"))


@pytest.mark.parametrize("kd_chunk_size", [0, 16])
def test_alm_trains_on_its_chunks(tmp_path, built_cache, metaspace_student, kd_chunk_size):
    r = run_train(_cfg(metaspace_student, built_cache, tmp_path / "run", loss="alm", kd_chunk_size=kd_chunk_size))
    assert r.global_step == 2 and torch.isfinite(torch.tensor(r.train_loss))
    assert all(h["kd"] > 0 for h in _logged(tmp_path / "run"))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(loss="alm", alignment="position"), "its own chunks"),
        (dict(loss="hybrid", alignment="chunk"), "ALM's"),
        (dict(loss="alm", kd_temperature=2.0), "chunk likelihoods, which have no temperature"),
        (dict(loss="hybrid", hybrid_matched_weight=1.0), "both"),
        (dict(loss="hybrid", hybrid_beta=1.5), r"\[0, 1\]"),
        (dict(loss="alm", alm_mode="merge"), "use debias"),
        (dict(loss="alm", alm_merge_threshold=1.0), r"\[0, 1\)"),
    ],
)
def test_bad_hybrid_and_alm_options_are_refused_in_one_line(kw, message, tmp_path):
    from logitcache import LogitCacheError

    with pytest.raises(LogitCacheError, match=message):
        _cfg("s", "c", tmp_path / "run", **kw).validate()


def test_hybrid_and_alm_flags_reach_the_config(tmp_path, built_cache, metaspace_student):
    from typer.testing import CliRunner

    from logitcache.cli import app

    args = ["train", "--student", str(metaspace_student), "--cache", str(built_cache), "--out", str(tmp_path / "run"),
            "--loss", "alm", "--alm-temperature", "10", "--alm-divergence", "binary_ce", "--hybrid-beta", "0.25",
            "--hybrid-matched-weight", "0.7", "--hybrid-unmatched-weight", "0.3", "--max-steps", "1",
            "--batch-size", "4", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "logitcache_train_config.json").read_text())
    assert (saved["alm_temperature"], saved["alm_divergence"], saved["hybrid_beta"]) == (10.0, "binary_ce", 0.25)
    assert (saved["hybrid_matched_weight"], saved["hybrid_unmatched_weight"]) == (0.7, 0.3)


@pytest.mark.filterwarnings("ignore:.*the cache is not complete")  # 8 of the 24 records, on purpose
def test_hybrid_trains_at_a_temperature_from_a_cache_with_it(tmp_path, teacher_dir, data_file, metaspace_student):
    from conftest import make_config

    from logitcache.pipeline.teacher.run import run_teacher

    cache = tmp_path / "cache"
    run_teacher(make_config(teacher_dir, data_file, cache, temperatures=(2,), limit=8), progress=False)
    r = run_train(_cfg(metaspace_student, cache, tmp_path / "run", loss="hybrid", kd_temperature=2.0))
    assert r.global_step == 2 and torch.isfinite(torch.tensor(r.train_loss))
    assert all(h["kd"] > 0 for h in _logged(tmp_path / "run"))


def test_alm_batches_carry_debiased_chunks_by_default(built_cache, metaspace_student):
    from transformers import AutoTokenizer

    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.dataset import LogitCacheDataset

    tok = AutoTokenizer.from_pretrained(metaspace_student)
    def examples(threshold):
        return list(LogitCacheDataset(built_cache, tok, alignment="chunk", shuffle=False, alm_merge_threshold=threshold))

    plain = list(LogitCacheDataset(built_cache, tok, alignment="chunk", shuffle=False))
    # the tiny teacher puts more than 0.1 on word starts almost everywhere: few merges at the
    # default, many where a word must be nearly certain to follow
    counts = [sum(len(e["alm_teacher_ll"]) for e in ex) for ex in (plain, examples(0.1), examples(0.6))]
    assert counts[0] >= counts[1] > counts[2] > 0, counts
    merged = examples(0.6)
    batch = KDCollator()(merged[:4])
    assert batch["alm_end"].shape == batch["alm_teacher_ll"].shape and "alm_end" not in plain[0]
    for m, p in zip(merged, plain):
        assert abs(float(m["alm_teacher_ll"].sum()) - float(p["alm_teacher_ll"].sum())) < 1e-3
    ends = batch["alm_end"][batch["alm_end"] >= 0]
    assert len(ends) and (ends < batch["input_ids"].shape[1]).all()
    assert torch.isfinite(batch["alm_teacher_ws"][batch["alm_end"] >= 0]).float().mean() > 0.9


@pytest.mark.filterwarnings("ignore:.*the cache is not complete")
def test_alm_on_a_cache_without_word_starts_is_refused_naming_the_flag_and_plain_mode_trains(
        tmp_path, teacher_dir, data_file, metaspace_student):
    from conftest import make_config

    from logitcache import LogitCacheError
    from logitcache.pipeline.teacher.run import run_teacher

    cache = tmp_path / "cache"
    run_teacher(make_config(teacher_dir, data_file, cache, word_start=False, limit=8), progress=False)
    with pytest.raises(LogitCacheError, match="--word-start.*--alm-mode plain") as e:
        run_train(_cfg(metaspace_student, cache, tmp_path / "run", loss="alm"))
    assert "\n" not in str(e.value)
    r = run_train(_cfg(metaspace_student, cache, tmp_path / "plain", loss="alm", alm_mode="plain"))
    assert r.global_step == 2 and all(h["kd"] > 0 for h in _logged(tmp_path / "plain"))


def test_alms_default_kd_weight_is_its_temperature_and_a_given_weight_wins(tmp_path):
    assert _cfg("s", "c", tmp_path, loss="alm").kd_weight == 100.0
    assert _cfg("s", "c", tmp_path, loss="alm", alm_temperature=10.0).kd_weight == 10.0
    assert _cfg("s", "c", tmp_path, loss="alm", kd_weight=3.0).kd_weight == 3.0
    assert _cfg("s", "c", tmp_path, loss="uld").kd_weight == 1.0
