"""The trainer's one-pass CE + KD (losses.fused) equals CE + the standalone losses, value and gradient.

References: CE as a loop over positions of ``-log_softmax(row)[label]``; the KD terms are the
standalone losses unchunked (themselves tested against slow loop references), all in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from logitcache.pipeline.student.losses import (
    FusedLoss,
    MLOTConfig,
    ce_kd_loss,
    fused_supports,
    kd_weights,
    kl_loss,
    multilevel_ot_loss,
    uld_loss,
)
from logitcache.pipeline.student.train import TrainConfig, fused_loss_of


TEMPERATURES = (2.0, 3.0)


def _batch(b=2, t=12, v=70, k=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=dtype) * 2.5
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100  # a prompt: no CE target there
    full = torch.randn(b, t, v, generator=g, dtype=dtype) * 2.5
    teacher = torch.log_softmax(full, dim=-1).topk(k, dim=-1)
    kd_mask = torch.rand(b, t, generator=g) > 0.25
    return logits, labels, teacher.values, teacher.indices, kd_mask


def _tempered(b=2, t=12, v=70, k=16, seed=0, dtype=torch.float64) -> dict:
    """The teacher of ``_batch`` at other temperatures, exact at its top-K ids (as a cache gives it)."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(b, t, v, generator=g, dtype=dtype)
    torch.randint(0, v, (b, t), generator=g)
    full = torch.randn(b, t, v, generator=g, dtype=dtype) * 2.5
    ids = torch.log_softmax(full, dim=-1).topk(k, dim=-1).indices
    return {tau: torch.log_softmax(full / tau, dim=-1).gather(-1, ids) for tau in TEMPERATURES}


def _ce_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    terms = []
    for i in range(logits.shape[0]):
        for q in range(logits.shape[1] - 1):
            y = int(labels[i, q + 1])
            if y != -100:
                terms.append(-torch.log_softmax(logits[i, q], dim=-1)[y])
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


def _kd_reference(spec: FusedLoss, logits, t_lp, t_ids, mask, tempered) -> torch.Tensor:
    if spec.loss == "sft":
        return logits.sum() * 0.0
    if spec.loss == "mlot":
        # return_parts takes the plain autograd path (the scalar form itself runs the fused pass).
        return multilevel_ot_loss(logits, t_lp, t_ids, mask, spec.mlot, tempered=tempered, reduction=spec.reduction,
                                  return_parts=True)["total"]
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    n = flat.shape[0]
    lp = t_lp if spec.temperature == 1.0 else tempered[spec.temperature]
    w = kd_weights(mask, spec.reduction).reshape(-1)
    if spec.loss == "uld":
        return uld_loss(flat, lp.reshape(n, -1), mask.reshape(-1), temperature=spec.temperature, weights=w, chunk_size=None)
    return kl_loss(flat, lp.reshape(n, -1), t_ids.reshape(n, -1), mask.reshape(-1), kind=spec.kl_kind,
                   beta=spec.kl_beta, temperature=spec.temperature, weights=w, chunk_size=None)


SPECS = {
    "sft": FusedLoss("sft"),
    "kl-forward": FusedLoss("kl", weight=0.7),
    "kl-reverse": FusedLoss("kl", kl_kind="reverse"),
    "kl-jsd": FusedLoss("kl", kl_kind="jsd", kl_beta=0.3),
    "uld": FusedLoss("uld", weight=2.0),
    "mlot-paper": FusedLoss("mlot", mlot=MLOTConfig(k=10)),
    "mlot-paper-batch-rank": FusedLoss("mlot", mlot=MLOTConfig(k=10, rank_over="batch", tau_sl=3.0)),
    # --kd-temperature and --kd-reduction (issue 12 §2, §1d)
    "uld-tau2": FusedLoss("uld", temperature=2.0),
    "uld-tau3-token": FusedLoss("uld", temperature=3.0, reduction="token"),
    "kl-forward-tau2": FusedLoss("kl", temperature=2.0, weight=0.5),
    "kl-reverse-tau2-token": FusedLoss("kl", kl_kind="reverse", temperature=2.0, reduction="token"),
    "kl-jsd-tau3": FusedLoss("kl", kl_kind="jsd", kl_beta=0.3, temperature=3.0),
    "kl-token": FusedLoss("kl", reduction="token"),
    "mlot-paper-token": FusedLoss("mlot", mlot=MLOTConfig(k=10), reduction="token"),
    "mlot-paper-tau_sl2-scaled": FusedLoss("mlot", mlot=MLOTConfig(k=10, tau_sl=2.0, hinton_scale=True)),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_value_and_gradient_equal_ce_plus_standalone_loss(name: str) -> None:
    spec = SPECS[name]
    logits, labels, t_lp, t_ids, mask = _batch()
    tempered = _tempered()
    a = logits.clone().requires_grad_()
    ce_ref = _ce_reference(a, labels)
    kd_ref = _kd_reference(spec, a, t_lp, t_ids, mask, tempered)
    (ce_ref + spec.weight * kd_ref).backward()

    b = logits.clone().requires_grad_()
    total, ce, kd = ce_kd_loss(b, labels, t_lp, t_ids, mask, spec, tempered=tempered)
    total.backward()

    assert float(ce) == pytest.approx(float(ce_ref.detach()), abs=1e-12)
    assert float(kd) == pytest.approx(float(kd_ref.detach()), abs=1e-12)
    assert torch.allclose(b.grad, a.grad, atol=1e-12, rtol=0)


def test_uniform_student_and_teacher_known_by_hand() -> None:
    # Student uniform over V; teacher cached over the whole vocabulary, uniform too:
    # CE = log V, forward KL = 0, and the KD gradient is 0 (the CE gradient is softmax - onehot).
    v, t = 8, 5
    logits = torch.zeros(1, t, v, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(t)[None] % v
    t_lp = torch.full((1, t, v), -math.log(v), dtype=torch.float64)
    t_ids = torch.arange(v).expand(1, t, v)
    total, ce, kd = ce_kd_loss(logits, labels, t_lp, t_ids, torch.ones(1, t, dtype=torch.bool), FusedLoss("kl"))
    total.backward()
    assert float(ce) == pytest.approx(math.log(v), abs=1e-12)
    assert float(kd) == pytest.approx(0.0, abs=1e-12)
    expected = torch.full((1, t, v), 1.0 / v, dtype=torch.float64) / (t - 1)
    for q in range(t - 1):
        expected[0, q, int(labels[0, q + 1])] -= 1.0 / (t - 1)
    expected[0, t - 1] = 0.0  # the last position predicts nothing
    assert torch.allclose(logits.grad, expected, atol=1e-12)


def test_no_targets_and_no_kd_positions_give_zero_loss_and_gradient() -> None:
    logits, labels, t_lp, t_ids, _ = _batch()
    logits.requires_grad_()
    total, ce, kd = ce_kd_loss(logits, torch.full_like(labels, -100), t_lp, t_ids,
                               torch.zeros(labels.shape, dtype=torch.bool), FusedLoss("uld"))
    total.backward()
    assert total.item() == 0.0 and float(ce) == 0.0 and float(kd) == 0.0
    assert not logits.grad.any()


def test_kl_tail_smaller_than_fp32_rounding_of_one_minus_the_top_k() -> None:
    # The student puts all but ~1e-10 of its mass on the teacher's ids: 1 - sum(s_ids) is pure
    # rounding noise in fp32, the directly summed tail is not. Compare with fp64.
    v, k = 50, 10
    logits = torch.full((1, 2, v), -30.0)
    t_ids = torch.arange(k).expand(1, 2, k)
    logits[..., :k] = torch.linspace(0, 1, k)
    t_lp = torch.log_softmax(torch.linspace(1, 0, k), dim=-1).expand(1, 2, k) - 1e-3  # a small teacher tail
    labels = torch.zeros(1, 2, dtype=torch.long)
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, _, kd32 = ce_kd_loss(logits, labels, t_lp, t_ids, mask, FusedLoss("kl"))
    _, _, kd64 = ce_kd_loss(logits.double(), labels, t_lp.double(), t_ids, mask, FusedLoss("kl"))
    assert float(kd32) == pytest.approx(float(kd64), rel=1e-5)


def test_bfloat16_logits_get_a_bfloat16_gradient_computed_in_fp32() -> None:
    logits, labels, t_lp, t_ids, mask = _batch(dtype=torch.float32)
    a = logits.clone().requires_grad_()
    total32, *_ = ce_kd_loss(a, labels, t_lp, t_ids, mask, FusedLoss("uld"))
    total32.backward()
    b = logits.to(torch.bfloat16).requires_grad_()
    total16, *_ = ce_kd_loss(b, labels, t_lp, t_ids, mask, FusedLoss("uld"))
    total16.backward()
    assert total16.dtype == torch.float32 and b.grad.dtype == torch.bfloat16
    assert total16.item() == pytest.approx(total32.item(), rel=2e-2)
    assert torch.allclose(b.grad.float(), a.grad, atol=2e-3)


def test_kl_with_a_teacher_id_outside_the_student_vocabulary_is_refused() -> None:
    logits, labels, t_lp, t_ids, mask = _batch(v=70)
    t_ids = t_ids.clone()
    t_ids[0, 5, 0] = 70
    mask[0, 5] = True
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        ce_kd_loss(logits, labels, t_lp, t_ids, mask, FusedLoss("kl"))


def test_mlot_code_variant_and_assignment_ranking_are_not_fused() -> None:
    assert fused_supports(FusedLoss("mlot"))
    assert not fused_supports(FusedLoss("mlot", mlot=MLOTConfig(variant="code")))
    assert not fused_supports(FusedLoss("mlot", mlot=MLOTConfig(student_rank="assignment")))
    with pytest.raises(ValueError, match="cannot fuse"):
        ce_kd_loss(*_batch(), FusedLoss("mlot", mlot=MLOTConfig(variant="code", k=10)))


@pytest.mark.parametrize(
    ("overrides", "fused"),
    [
        ({"loss": "uld"}, True),
        ({"loss": "kl", "kl_kind": "jsd"}, True),
        ({"loss": "sft"}, True),
        ({"loss": "mlot"}, True),
        ({"loss": "mlot", "mlot_variant": "code"}, False),
        ({"loss": "uld", "kd_chunk_size": 256}, False),  # asks for the standalone chunked loss
    ],
)
def test_trainer_fuses_what_can_be_fused(overrides: dict, fused: bool) -> None:
    cfg = TrainConfig(student="s", cache="c", out="o", **overrides)
    assert (fused_loss_of(cfg) is not None) is fused
