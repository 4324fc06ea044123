"""Non-finite numbers never pass silently (issue 13 §1).

- Stage 1: a teacher whose float16 activations overflow stops at the first bad batch with one
  line naming the example and the fix; nothing non-finite is written and the cache stays
  incomplete.
- Stage 2: a cache holding NaN, inf or positive log-probabilities (hashes re-recorded, so only
  the values tell) is refused as it is read, naming the shard and row group; with
  ``--skip-bad-shards`` the bad row group is passed over and counted.
- Training stops with one line when the loss or a gradient becomes non-finite, and saves no
  final model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from logitcache import LogitCacheError
from logitcache.pipeline.student.dataset import LogitCacheDataset
from logitcache.storage import load_manifest, verify_cache
from logitcache.storage.fsutil import sha256_file
from logitcache.storage.rows import batch_to_rows, rows_to_table

CLI = [sys.executable, "-m", "logitcache"]
SHARD = "data/shard-00001.parquet"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode not in (0, None), r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


# --- stage 1 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overflowing_teacher(tmp_path_factory, teacher_dir) -> Path:
    """The tiny teacher with its first MLP's output scaled by 1e6: the residual stream overflows in
    float16 (NaN after the next norm) while float32 normalises it back to ordinary logits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("overflow") / "teacher"
    shutil.copytree(teacher_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e6)
    model.save_pretrained(out)
    return out


def test_float16_overflow_stops_stage_1_with_one_line_and_writes_nothing_non_finite(tmp_path, overflowing_teacher, data_file):
    out = tmp_path / "cache"
    r = _cli("teacher", "--model", overflowing_teacher, "--data", data_file, "--out", out, "--top-k", "8",
             "--prompt-field", "prompt", "--response-field", "response", "--dtype", "float16", "--no-progress")

    line = _one_error_line(r)
    assert "NaN/inf" in line and "example '" in line and "--dtype bfloat16" in line and "float16" in line
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "partial" and m["shards"] == []  # the first batch overflowed: nothing written


def test_the_same_teacher_in_float32_is_finite(tmp_path, overflowing_teacher, data_file):
    """So the float16 failure above is the overflow, not a broken model."""
    out = tmp_path / "cache"
    r = _cli("teacher", "--model", overflowing_teacher, "--data", data_file, "--out", out, "--top-k", "8",
             "--prompt-field", "prompt", "--response-field", "response", "--dtype", "float32", "--no-progress")

    assert r.returncode == 0, r.stderr
    assert verify_cache(out).ok


def test_a_stage_1_check_names_what_is_bad():
    from logitcache.pipeline.teacher.engine import ScoredSequence, first_bad_value

    lp = np.array([[-0.1, -2.0]], np.float32)
    good = ScoredSequence(np.zeros((1, 2), np.int32), lp, lp[:, 0], np.zeros(1, np.float32))
    assert first_bad_value(good) is None
    cases = [("topk_logprobs", np.array([[np.nan, -1]], np.float32), "NaN/inf top-k"),
             ("topk_logprobs", np.array([[0.5, -1]], np.float32), "top-k log-probabilities above 0"),
             ("label_logprob", np.array([np.inf], np.float32), "NaN/inf label"),
             ("logsumexp", np.array([-np.inf], np.float32), "NaN/inf log-normalisers"),
             ("lse_tau", np.array([[np.nan]], np.float32), "NaN/inf lse_tau")]
    for field, value, words in cases:
        bad = ScoredSequence(**{**good.__dict__, field: value})
        assert words in (first_bad_value(bad) or ""), field


# --- stage 2: reading ---------------------------------------------------------------------------


def _poison(cache: Path, value: float, column: str = "topk_logprobs", shard: str = SHARD) -> str:
    """Put ``value`` into one position of the shard's second row and re-record size and sha256
    (a damaged or hostile cache whose hashes match). Returns that row's id."""
    m = load_manifest(cache)
    path = cache / shard
    rows = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
            for b in pq.read_table(path).to_batches() for r in batch_to_rows(b)]
    target = rows[1]
    target[column] = target[column].astype(np.float32)
    target[column].reshape(-1)[0] = value
    pq.write_table(rows_to_table(rows, m.k, len(m.temperatures), m.logit_stats, m.word_start), path)
    data = json.loads((cache / "manifest.json").read_text())
    (entry,) = [s for s in data["shards"] if s["path"] == shard]
    entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (cache / "manifest.json").write_text(json.dumps(data))
    return target["id"]


@pytest.mark.parametrize("value, words", [(np.nan, "NaN/inf"), (np.inf, "NaN/inf"), (3.0, "above 0")])
def test_the_training_reader_refuses_bad_values_naming_the_shard_and_row_group(cache_copy, value, words):
    rid = _poison(cache_copy, value)
    ds = LogitCacheDataset(cache_copy, shuffle=False)  # sizes and hashes are sound: construction passes

    with pytest.raises(LogitCacheError) as e:
        list(ds)

    msg = str(e.value)
    assert "\n" not in msg and SHARD in msg and "row group 0" in msg and words in msg and repr(rid) in msg
    assert "logitcache verify" in msg and "--skip-bad-shards" in msg


def test_verify_refuses_what_the_reader_refuses(cache_copy):
    _poison(cache_copy, np.nan, column="label_logprob")

    report = verify_cache(cache_copy)

    assert not report.ok and any(SHARD in p and "label log-prob" in p for p in report.problems)
    with pytest.raises(LogitCacheError, match="label log-prob"):
        list(LogitCacheDataset(cache_copy, shuffle=False))


@pytest.mark.parametrize("shuffle", [False, True])
def test_skip_bad_shards_passes_over_the_bad_row_group_only(cache_copy, shuffle):
    lost = set(pq.read_table(cache_copy / SHARD, columns=["id"]).column("id").to_pylist())
    everything = {r["id"] for r in LogitCacheDataset(cache_copy, shuffle=False)}
    _poison(cache_copy, np.nan)

    ds = LogitCacheDataset(cache_copy, shuffle=shuffle, shuffle_buffer=8, skip_bad_shards=True)
    ids = [r["id"] for r in ds]

    assert len(ids) == len(set(ids)) and set(ids) == everything - lost  # the shard is one row group
    assert ds.bad_row_groups == {(1, 0)}


# --- training -----------------------------------------------------------------------------------


def test_train_refuses_a_poisoned_cache_with_one_line_and_saves_nothing(tmp_path, cache_copy, student):
    _poison(cache_copy, np.inf)
    out = tmp_path / "run"

    r = _cli("train", "--student", student, "--cache", cache_copy, "--out", out, "--loss", "kl", "--max-steps", "4",
             "--batch-size", "4", "--no-progress")

    line = _one_error_line(r)
    assert SHARD in line and "NaN/inf" in line
    assert not (out / "model.safetensors").exists()


@pytest.fixture
def broken_student(tmp_path, student) -> Path:
    """The test student with one weight set to inf: its loss is not finite from the first step."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    shutil.copytree(student, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.get_output_embeddings().weight[3, 0] = float("inf")
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("loss", ["kl", "uld"])
def test_a_non_finite_loss_stops_training_with_one_line_and_no_final_model(tmp_path, built_cache, broken_student, loss):
    out = tmp_path / "run"

    r = _cli("train", "--student", broken_student, "--cache", built_cache, "--out", out, "--loss", loss,
             "--max-steps", "4", "--batch-size", "4", "--no-progress")

    line = _one_error_line(r)
    assert "not finite" in line and "step 1" in line
    assert not (out / "model.safetensors").exists()


def test_a_non_finite_gradient_is_caught_before_the_optimizer_step():
    from logitcache.pipeline.student.train import first_non_finite_gradient

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 3)).sum().backward()
    assert first_non_finite_gradient(model) is None
    model[1].weight.grad[0, 1] = float("nan")
    assert first_non_finite_gradient(model) == "1.weight"
