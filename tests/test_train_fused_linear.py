"""``train --fused-linear``: the loss from the student's hidden states and head trains the same
model as the logits path, is used where the head allows it, and ``on`` refuses what cannot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from logitcache import LogitCacheError
from logitcache.pipeline.student import fused_head
from logitcache.pipeline.student.losses import FusedLoss, ce_kd_loss, fused_linear_ce_kd_loss
from logitcache.pipeline.student.train import TrainConfig, run_train


def _cfg(student, cache, out, **kw) -> TrainConfig:
    base = dict(student=str(student), cache=str(cache), out=str(out), max_steps=3, batch_size=4,
                learning_rate=1e-3, logging_steps=1, progress=False, shuffle_buffer=8)
    base = {**base, **kw}
    return TrainConfig(**base, save_steps=base["max_steps"])  # the last checkpoint keeps the log


def _logged(out: Path) -> list[dict]:
    (state,) = out.glob("checkpoint-*/trainer_state.json")
    return [h for h in json.loads(state.read_text())["log_history"] if "loss" in h]


# The losses that couple positions (losses.fused_linear_coupled), each with a student it trains.
COUPLED = [("mlot", "student", {"mlot_k": 8}), ("alm", "metaspace_student", {})]


def _softcapped_student(student: Path, out: Path) -> Path:
    """The tiny student with Gemma-2's logit soft-capping set in its config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(student)
    model.config.final_logit_softcapping = 30.0
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(student).save_pretrained(out)
    return out


@pytest.mark.parametrize("loss", ["kl", "uld"])
def test_hidden_state_and_logits_paths_train_the_same_model(loss, tmp_path, built_cache, student) -> None:
    runs = {mode: run_train(_cfg(student, built_cache, tmp_path / mode, loss=loss, fused_linear=mode))
            for mode in ("on", "off")}
    assert [h["fused_linear"] for h in _logged(tmp_path / "on")] == [1, 1, 1]
    assert [h["fused_linear"] for h in _logged(tmp_path / "off")] == [0, 0, 0]
    assert runs["on"].train_loss == pytest.approx(runs["off"].train_loss, rel=1e-5)
    on, off = (load_file(tmp_path / mode / "model.safetensors") for mode in ("on", "off"))
    for name in off:
        assert torch.allclose(on[name], off[name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize(("loss", "fixture", "extra"), COUPLED)
def test_coupled_losses_from_hidden_states_match_the_logits_path(loss, fixture, extra, tmp_path, built_cache,
                                                                 request) -> None:
    # MultiLevelOT and ALM couple positions: two passes over per-row statistics (losses.fused_linear_coupled).
    student = request.getfixturevalue(fixture)
    runs = {mode: run_train(_cfg(student, built_cache, tmp_path / mode, loss=loss, fused_linear=mode, **extra))
            for mode in ("on", "off")}
    assert [h["fused_linear"] for h in _logged(tmp_path / "on")] == [1, 1, 1]
    on, off = (_logged(tmp_path / mode) for mode in ("on", "off"))
    for a, b in zip(on, off):
        assert a["kd"] > 0 and (a["ce"], a["kd"]) == pytest.approx((b["ce"], b["kd"]), rel=1e-4)
    assert runs["on"].train_loss == pytest.approx(runs["off"].train_loss, rel=1e-4)


@pytest.mark.parametrize(("loss", "fixture", "extra"), COUPLED)
def test_coupled_losses_pass_the_first_step_check_under_bf16_autocast(loss, fixture, extra, tmp_path, built_cache,
                                                                      request) -> None:
    student = request.getfixturevalue(fixture)
    run_train(_cfg(student, built_cache, tmp_path / "run", loss=loss, max_steps=1, bf16=True, fused_linear="on", **extra))
    assert _logged(tmp_path / "run")[0]["fused_linear"] == 1


@pytest.mark.filterwarnings("ignore:.*the cache is not complete")  # 8 of the 24 records, on purpose
def test_multilevel_ot_code_variant_from_hidden_states_matches_the_logits_path(tmp_path, teacher_dir, data_file,
                                                                                student) -> None:
    # "code" divides the logits by their std: the logits path has no fused pass for it (CE, then the loss).
    from conftest import make_config

    from logitcache.pipeline.teacher.run import run_teacher

    cache = tmp_path / "cache"
    run_teacher(make_config(teacher_dir, data_file, cache, logit_stats=True, limit=8), progress=False)
    runs = {mode: run_train(_cfg(student, cache, tmp_path / mode, loss="mlot", mlot_k=8, mlot_variant="code",
                                 fused_linear=mode)) for mode in ("on", "off")}
    assert [h["fused_linear"] for h in _logged(tmp_path / "on")] == [1, 1, 1]
    for a, b in zip(_logged(tmp_path / "on"), _logged(tmp_path / "off")):
        assert a["kd"] > 0 and (a["ce"], a["kd"]) == pytest.approx((b["ce"], b["kd"]), rel=1e-4)
    assert runs["on"].train_loss == pytest.approx(runs["off"].train_loss, rel=1e-4)


def test_auto_uses_it_for_a_plain_linear_head(tmp_path, built_cache, student) -> None:
    run_train(_cfg(student, built_cache, tmp_path / "run", loss="kl", max_steps=1))
    assert _logged(tmp_path / "run")[0]["fused_linear"] == 1


def test_auto_keeps_a_coupled_loss_on_the_logits_on_a_cpu(tmp_path, built_cache, student) -> None:
    """MultiLevelOT's and ALM's hidden-state path makes one more pass over the head: a CPU pays
    more for it than it saves, so `auto` keeps the logits there (`on` is tested above)."""
    run_train(_cfg(student, built_cache, tmp_path / "run", loss="mlot", mlot_k=8, max_steps=1))
    assert _logged(tmp_path / "run")[0]["fused_linear"] == 0


def test_bf16_autocast_passes_the_first_step_check(tmp_path, built_cache, student) -> None:
    run_train(_cfg(student, built_cache, tmp_path / "run", loss="kl", max_steps=1, bf16=True, fused_linear="on"))
    assert _logged(tmp_path / "run")[0]["fused_linear"] == 1


def test_auto_takes_the_logits_for_a_soft_capped_head_and_on_refuses_it(tmp_path, built_cache, student) -> None:
    capped = _softcapped_student(student, tmp_path / "capped")
    run_train(_cfg(capped, built_cache, tmp_path / "auto", loss="kl", max_steps=1))
    assert _logged(tmp_path / "auto")[0]["fused_linear"] == 0
    with pytest.raises(LogitCacheError, match="--fused-linear on: the model's config sets final_logit_softcapping=30") as e:
        run_train(_cfg(capped, built_cache, tmp_path / "on", loss="kl", max_steps=1, fused_linear="on"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"loss": "kl", "kd_chunk_size": 16}, "reads the logits"),
    ({"loss": "kl", "cache": ["a", "b"]}, "several --cache teachers"),
])
def test_on_refuses_a_loss_that_reads_the_logits(overrides, needle) -> None:
    cfg = TrainConfig(student="s", out="o", **{"cache": "c", **overrides, "fused_linear": "on"})
    from logitcache.pipeline.student.train import linear_loss_of

    with pytest.raises(LogitCacheError, match=needle):
        fused_head.wanted(cfg, linear_loss_of(cfg), torch.nn.Module())


def test_a_bad_mode_is_refused() -> None:
    with pytest.raises(LogitCacheError, match="--fused-linear 'yes': use auto, on or off"):
        TrainConfig(student="s", cache="c", out="o", fused_linear="yes").validate()


def _head_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 10, 8, generator=g)
    head = torch.nn.Linear(8, 50, bias=False)
    labels = torch.randint(0, 50, (1, 10), generator=g)
    t = torch.log_softmax(torch.randn(1, 10, 50, generator=g), dim=-1).topk(6, dim=-1)
    return hidden, head, labels, t.values, t.indices, torch.ones(1, 10, dtype=torch.bool)


def test_self_check_passes_when_the_logits_are_the_heads_output() -> None:
    hidden, head, labels, lp, ids, mask = _head_batch()
    spec = FusedLoss("kl")
    assert fused_head.self_check(hidden, head, lambda x: ce_kd_loss(x, labels, lp, ids, mask, spec)[0],
                                 lambda h, w, b: fused_linear_ce_kd_loss(h, w, b, labels, lp, ids, mask, spec)[0]) is None


def test_self_check_names_what_differs_when_the_model_scales_its_logits() -> None:
    # A model that multiplies its logits after the head without saying so in its config.
    hidden, head, labels, lp, ids, mask = _head_batch()
    spec = FusedLoss("kl")
    problem = fused_head.self_check(hidden, head, lambda x: ce_kd_loss(x * 2.0, labels, lp, ids, mask, spec)[0],
                                    lambda h, w, b: fused_linear_ce_kd_loss(h, w, b, labels, lp, ids, mask, spec)[0])
    assert problem is not None and problem.startswith("loss ")
