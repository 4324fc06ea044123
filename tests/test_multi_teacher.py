"""Several teachers, one student: `train --cache A --cache B` learns CE + λ·Σ w_j·KD_j."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from logitcache import LogitCacheError
from logitcache.pipeline.student.train import TeacherBatch, TrainConfig, batch_loss, run_train, teachers_loss


def _cfg(student, cache, out, **kw) -> TrainConfig:
    base = dict(student=str(student), cache=cache, out=str(out), max_steps=3, batch_size=4, learning_rate=1e-3,
                save_steps=100, logging_steps=1, progress=False, shuffle_buffer=8, loss="uld")
    base.update(kw)
    return TrainConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def _teacher(g: torch.Generator, b: int, t: int, vt: int, k: int, density: float) -> tuple[torch.Tensor, TeacherBatch]:
    full = torch.randn(b, t, vt, generator=g, dtype=torch.float64) * 2
    lp, ids = torch.log_softmax(full, -1).topk(k, -1)
    mask = torch.rand(b, t, generator=g) < density
    mask[:, 0] = True  # every sequence has a position: "sample" and "token" both well defined
    return full, TeacherBatch(lp, ids, mask)


# --- the loss -----------------------------------------------------------------------------------


def slow_uld(logits: torch.Tensor, teacher_full: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ULD with a complete teacher, per sequence then over sequences: sort both, zero-pad, L1 (autograd)."""
    per_seq = []
    for i in range(logits.shape[0]):
        terms = []
        for q in range(logits.shape[1]):
            if mask[i, q]:
                s = torch.softmax(logits[i, q], -1).sort(descending=True).values
                t = torch.softmax(teacher_full[i, q], -1).sort(descending=True).values
                n = max(len(s), len(t))
                terms.append((F.pad(s, (0, n - len(s))) - F.pad(t, (0, n - len(t)))).abs().sum())
        per_seq.append(torch.stack(terms).mean())
    return torch.stack(per_seq).mean()


def test_two_teachers_loss_equals_ce_plus_weighted_kds_of_a_slow_reference():
    g = torch.Generator().manual_seed(3)
    b, t, v = 2, 6, 11
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100
    full0, t0 = _teacher(g, b, t, 9, 9, 0.6)  # K = the teacher's vocabulary: nothing unknown
    full1, t1 = _teacher(g, b, t, 6, 6, 0.5)
    cfg = TrainConfig(student="s", cache=["a", "b"], out="o", loss="uld", kd_weight=0.8)
    from logitcache.pipeline.student.train import fused_loss_of

    x = logits.clone().requires_grad_()
    loss, ce, kds = teachers_loss(cfg, x, labels, [t0, t1], [0.3, 0.7], fused_loss_of(cfg))
    loss.backward()
    y = logits.clone().requires_grad_()
    ref_ce = F.cross_entropy(y[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref_kd = [slow_uld(y, full0, t0.kd_mask), slow_uld(y, full1, t1.kd_mask)]
    ref = ref_ce + 0.8 * (0.3 * ref_kd[0] + 0.7 * ref_kd[1])
    ref.backward()
    # the fused pass (CE, teacher 0) keeps float64; the standalone KD (teacher 1) computes in float32
    assert float(ce.detach()) == pytest.approx(float(ref_ce.detach()), abs=1e-10)
    assert float(kds[0].detach()) == pytest.approx(float(ref_kd[0].detach()), abs=1e-10)
    assert float(kds[1].detach()) == pytest.approx(float(ref_kd[1].detach()), abs=1e-6)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=1e-6)
    assert float((x.grad - y.grad).abs().max()) < 1e-6


@pytest.mark.parametrize("loss, extra", [("uld", {}), ("kl", {}), ("mlot", {"mlot_k": 4, "approximate_temperature": True}), ("hybrid", {}),
                                         ("uld", {"kd_chunk_size": 4}), ("kl", {"kl_kind": "jsd", "kd_reduction": "token"})])
def test_each_loss_with_two_teachers_is_the_weighted_sum_of_one_teacher_runs(loss, extra):
    """Values and gradients equal CE + w0·KD_0 + w1·KD_1 from the one-teacher loss run on each alone."""
    from logitcache.pipeline.student.train import fused_loss_of

    g = torch.Generator().manual_seed(7)
    b, t, v, k = 3, 7, 13, 5
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 1.5
    labels = torch.randint(0, v, (b, t), generator=g)
    _, t0 = _teacher(g, b, t, v, k, 0.7)  # same vocabulary as the student: kl and hybrid read the ids
    _, t1 = _teacher(g, b, t, v, k, 0.4)
    cfg = TrainConfig(student="s", cache=["a", "b"], out="o", loss=loss, kd_weight=1.5, **extra)
    w = [0.25, 0.75]
    x = logits.clone().requires_grad_()
    total, ce, kds = teachers_loss(cfg, x, labels, [t0, t1], w, fused_loss_of(cfg))
    total.backward()
    # separately: each teacher alone (weight 1), then combined by hand
    parts, grads = [], []
    for tb in (t0, t1):
        y = logits.clone().requires_grad_()
        one = TrainConfig(student="s", cache="a", out="o", loss=loss, kd_weight=1.0, **extra)
        total_j, ce_j, kd_j = batch_loss(one, y, labels, tb.logprobs, tb.ids, tb.kd_mask, fused_loss_of(one))
        total_j.backward()  # CE + KD_j (the fused pass hands back KD detached): KD_j's gradient less CE's below
        parts.append((ce_j.detach(), kd_j.detach()))
        grads.append(y.grad)
    y = logits.clone().requires_grad_()
    F.cross_entropy(y[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1)).backward()
    ref = parts[0][0] + 1.5 * (w[0] * parts[0][1] + w[1] * parts[1][1])
    ref_grad = y.grad + 1.5 * (w[0] * (grads[0] - y.grad) + w[1] * (grads[1] - y.grad))
    assert [float(k.detach()) for k in kds] == pytest.approx([float(parts[0][1]), float(parts[1][1])], rel=1e-6, abs=1e-9)
    assert float(total.detach()) == pytest.approx(float(ref), rel=1e-6)
    assert float((x.grad - ref_grad).abs().max()) < 1e-6


def test_one_teacher_is_todays_loss_exactly():
    from logitcache.pipeline.student.train import fused_loss_of

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 9, generator=g)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    _, tb = _teacher(g, 2, 5, 9, 4, 0.6)
    tb = TeacherBatch(tb.logprobs.float(), tb.ids, tb.kd_mask)
    cfg = TrainConfig(student="s", cache="a", out="o", loss="uld")
    a = teachers_loss(cfg, logits, labels, [tb], cfg.resolved_teacher_weights(), fused_loss_of(cfg))
    b = batch_loss(cfg, logits, labels, tb.logprobs, tb.ids, tb.kd_mask, fused_loss_of(cfg))
    assert cfg.resolved_teacher_weights() == [1.0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2][0], b[2])


# --- the data ------------------------------------------------------------------------------------


def test_the_caches_are_read_in_lockstep_by_id(built_cache, other_teacher_cache):
    from logitcache.pipeline.student.dataset import LogitCacheDataset

    ds = LogitCacheDataset(built_cache, None, shuffle=True, shuffle_buffer=5, seed=4, rank=0, world_size=1,
                           companions=[other_teacher_cache])
    rows = list(ds)
    assert len(rows) == len(ds) == 24 and len({r["id"] for r in rows}) == 24
    for r in rows:
        mate = r["_teachers"][0]
        assert mate["id"] == r["id"] and mate["text"] == r["text"]
        assert not torch.equal(torch.as_tensor(mate["input_ids"]), torch.as_tensor(r["input_ids"]))  # other tokens


def test_workers_and_ranks_read_every_record_once_with_two_caches(built_cache, other_teacher_cache, metaspace_student):
    from transformers import AutoTokenizer

    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.dataset import LogitCacheDataset

    tok = AutoTokenizer.from_pretrained(metaspace_student)
    seen = 0
    for rank in (0, 1):
        ds = LogitCacheDataset(built_cache, tok, alignment="position", shuffle=True, shuffle_buffer=4, rank=rank,
                               world_size=2, num_workers=2, batch_size=3, companions=[other_teacher_cache])
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=KDCollator())
        for batch in loader:
            assert {"teacher_logprobs_1", "teacher_ids_1", "kd_mask_1"} <= set(batch)
            assert batch["kd_mask_1"].shape == batch["kd_mask"].shape
            seen += len(batch["stream_index"])
    assert seen == 24  # 12 per rank


def _cache_of(tmp_path_factory, teacher_dir, data_file, name: str, edit) -> Path:  # noqa: ANN001
    """A cache from the built_cache's teacher over an edited copy of its data."""
    from conftest import make_config

    from logitcache.pipeline.teacher.run import run_teacher

    records = [json.loads(line) for line in data_file.read_text().splitlines()]
    data = tmp_path_factory.mktemp("data") / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in edit(records)))
    out = tmp_path_factory.mktemp("cache") / name
    run_teacher(make_config(teacher_dir, data, out), progress=False)
    return out


@pytest.fixture(scope="module")
def edited_text_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    def edit(records):
        records[5]["response"] += " And more."
        return records

    return _cache_of(tmp_path_factory, teacher_dir, data_file, "edited", edit)


@pytest.fixture(scope="module")
def fewer_records_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    return _cache_of(tmp_path_factory, teacher_dir, data_file, "fewer", lambda records: records[:3] + records[7:])


def test_a_record_with_another_text_is_refused_naming_it(tmp_path, built_cache, edited_text_cache, metaspace_student):
    with pytest.raises(LogitCacheError, match=r"edited: record 'ex-00005' has another text") as e:
        run_train(_cfg(metaspace_student, [str(built_cache), str(edited_text_cache)], tmp_path / "run"))
    assert "\n" not in str(e.value)


def test_records_missing_from_one_cache_are_refused(tmp_path, built_cache, fewer_records_cache, metaspace_student):
    with pytest.raises(LogitCacheError, match=r"record 'ex-00003' is in .* but not in .*fewer \(4 records.*--on-missing skip.*20 records"):
        run_train(_cfg(metaspace_student, [str(built_cache), str(fewer_records_cache)], tmp_path / "run"))


def test_on_missing_skip_trains_on_the_records_every_cache_holds(tmp_path, built_cache, fewer_records_cache,
                                                                 metaspace_student, capsys):
    from logitcache.pipeline.student.dataset import LogitCacheDataset

    ds = LogitCacheDataset(fewer_records_cache, None, shuffle=False, rank=0, world_size=1,
                           companions=[built_cache], on_missing="skip")
    assert len(ds) == 20 and len(ds.missing) == 4
    assert [r["id"] for r in ds] == [f"ex-{i:05d}" for i in (0, 1, 2, *range(7, 24))]
    cfg = _cfg(metaspace_student, [str(built_cache), str(fewer_records_cache)], tmp_path / "run", on_missing="skip",
               max_steps=5, save_steps=5, batch_size=4)  # 20 records: one epoch is 5 steps
    assert run_train(cfg).global_step == 5
    assert "4 records are not in every cache and were left out ('ex-00003'" in capsys.readouterr().err
    state = json.loads((tmp_path / "run" / "checkpoint-5" / "logitcache_data_state_rank0.json").read_text())
    assert state["num_examples"] == 20 and sum(state["consumed"].values()) == 20


# --- training ------------------------------------------------------------------------------------


def test_the_same_cache_twice_at_half_weight_trains_as_one_cache(tmp_path, built_cache, metaspace_student):
    one = run_train(_cfg(metaspace_student, str(built_cache), tmp_path / "one"))
    two = run_train(_cfg(metaspace_student, [str(built_cache), str(built_cache)], tmp_path / "two",
                         teacher_weights="0.5,0.5"))
    assert two.train_loss == pytest.approx(one.train_loss, abs=1e-6)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)


def test_two_teachers_of_other_tokenizers_train_and_log_each_term(tmp_path, built_cache, other_teacher_cache,
                                                                  metaspace_student):
    r = run_train(_cfg(metaspace_student, [str(built_cache), str(other_teacher_cache)], tmp_path / "run",
                       teacher_weights=[0.25, 0.75], save_steps=3))
    assert r.global_step == 3 and torch.isfinite(torch.tensor(r.train_loss))
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert logged and all({"ce", "kd", "kd_0", "kd_1"} <= set(h) for h in logged)
    for h in logged:
        assert h["kd_0"] > 0 and h["kd_1"] > 0 and h["kd_0"] != h["kd_1"]
        assert h["kd"] == pytest.approx(0.25 * h["kd_0"] + 0.75 * h["kd_1"], abs=2e-4)
    saved = json.loads((tmp_path / "run" / "logitcache_train_config.json").read_text())
    assert saved["cache"] == [str(built_cache), str(other_teacher_cache)]


def test_resume_mid_epoch_with_two_caches_equals_an_uninterrupted_run(tmp_path, built_cache, other_teacher_cache,
                                                                       metaspace_student):
    caches = [str(built_cache), str(other_teacher_cache)]
    kw = dict(lr_scheduler="constant")
    straight = run_train(_cfg(metaspace_student, caches, tmp_path / "straight", max_steps=5, save_steps=5, **kw))
    run_train(_cfg(metaspace_student, caches, tmp_path / "resumed", max_steps=2, save_steps=2, **kw))
    state = json.loads((tmp_path / "resumed" / "checkpoint-2" / "logitcache_data_state_rank0.json").read_text())
    assert sum(state["consumed"].values()) == 8 and state["num_caches"] == 2
    resumed = run_train(_cfg(metaspace_student, caches, tmp_path / "resumed", max_steps=5, save_steps=5, resume=True, **kw))
    assert resumed.global_step == straight.global_step == 5
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_cli_and_a_config_file_take_several_caches(tmp_path, built_cache, other_teacher_cache, metaspace_student):
    from typer.testing import CliRunner

    from logitcache.cli import app

    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"cache: [{built_cache}, {other_teacher_cache}]\nteacher_weights: [0.6, 0.4]\n")
    r = CliRunner().invoke(app, ["train", "--config", str(cfg), "--student", str(metaspace_student), "--out",
                                 str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "logitcache_train_config.json").read_text())
    assert saved["cache"] == [str(built_cache), str(other_teacher_cache)] and saved["teacher_weights"] == [0.6, 0.4]
    r = CliRunner().invoke(app, ["train", "--student", str(metaspace_student), "--cache", str(built_cache), "--cache",
                                 str(other_teacher_cache), "--teacher-weights", "1,3", "--out", str(tmp_path / "cli"),
                                 "--max-steps", "1", "--batch-size", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cli" / "logitcache_train_config.json").read_text())["teacher_weights"] == "1,3"


@pytest.mark.parametrize("loss, extra", [("hybrid", {}), ("alm", {}), ("mlot", {"mlot_k": 8}), ("sft", {})])
def test_every_loss_trains_with_two_teachers_of_other_tokenizers(loss, extra, tmp_path, built_cache, other_teacher_cache,
                                                                 metaspace_student):
    r = run_train(_cfg(metaspace_student, [str(built_cache), str(other_teacher_cache)], tmp_path / "run", loss=loss,
                       max_steps=2, save_steps=2, **extra))
    assert r.global_step == 2 and torch.isfinite(torch.tensor(r.train_loss))
    logged = [h for h in json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
              if "loss" in h]
    assert all({"kd_0", "kd_1"} <= set(h) for h in logged)
    if loss != "sft":
        assert all(h["kd_0"] != 0 and h["kd_1"] != 0 for h in logged)


def test_torchrun_two_ranks_read_two_caches_in_lockstep(tmp_path, built_cache, other_teacher_cache, metaspace_student):
    """Real DDP (gloo, 2 processes): each rank reads its own half of the driving cache, with the
    other teacher's rows of the same ids, and both log each teacher's term."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGITCACHE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "logitcache", "train", "--student", str(metaspace_student), "--cache", str(built_cache),
           "--cache", str(other_teacher_cache), "--out", str(tmp_path / "ddp"), "--loss", "uld", "--max-steps", "3",
           "--batch-size", "2", "--save-steps", "3", "--logging-steps", "1", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    ckpt = tmp_path / "ddp" / "checkpoint-3"
    states = [json.loads((ckpt / f"logitcache_data_state_rank{i}.json").read_text()) for i in (0, 1)]
    assert [(s["world_size"], s["num_caches"]) for s in states] == [(2, 2), (2, 2)]
    assert [sum(s["consumed"].values()) for s in states] == [6, 6]  # 3 steps x batch 2 on each rank
    logged = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    assert all({"kd_0", "kd_1"} <= set(entry) for entry in logged if "loss" in entry)
