"""CE + KD from hidden states and the LM head (losses.fused_linear) equals the plain path.

The plain path: logits = F.linear(h, W, b), then the fused loss over them (ce_kd_loss, itself
tested against CE + the standalone losses); the slow test compares with an independent loop
over positions. Float64 to 1e-10 in values and in the gradients of h, W and b; bf16 within the
tolerance the docstring of ``test_bfloat16_*`` states.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from logitcache.pipeline.student.losses import (
    FusedLoss,
    HybridConfig,
    MLOTConfig,
    ce_kd_loss,
    fused_linear_ce_kd_loss,
    fused_linear_supports,
    kd_weights,
)

TEMPERATURES = (2.0, 3.0)


def _batch(b=2, t=12, d=9, v=70, k=16, seed=0, dtype=torch.float64):
    """Hidden states [B, T, d], head [V, d] and bias [V], labels, a top-K teacher (+ exact tempered), a KD mask."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, dtype=dtype)
    weight = torch.randn(v, d, generator=g, dtype=dtype) * 0.8
    bias = torch.randn(v, generator=g, dtype=dtype) * 0.3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100  # a prompt: no CE target there
    full = torch.randn(b, t, v, generator=g, dtype=dtype) * 2.5
    ids = torch.log_softmax(full, dim=-1).topk(k, dim=-1).indices
    t_lp = torch.log_softmax(full, dim=-1).gather(-1, ids)
    tempered = {tau: torch.log_softmax(full / tau, dim=-1).gather(-1, ids) for tau in TEMPERATURES}
    kd_mask = torch.rand(b, t, generator=g) > 0.25
    kd_mask[1, -2:] = False
    labels[1, -1] = -100  # with the last position: rows with no target at all
    return hidden, weight, bias, labels, t_lp, ids, kd_mask, tempered


def _hybrid_ids(ids: torch.Tensor) -> torch.Tensor:
    """The hybrid reads the student ids of the teacher entries, -1 where a token has none."""
    return torch.where(ids % 3 == 0, -1, ids)


SPECS = {
    "sft": FusedLoss("sft"),
    "kl-forward": FusedLoss("kl", weight=0.7),
    "kl-reverse": FusedLoss("kl", kl_kind="reverse"),
    "kl-jsd": FusedLoss("kl", kl_kind="jsd", kl_beta=0.3),
    "kl-forward-tau2-token": FusedLoss("kl", temperature=2.0, reduction="token"),
    "kl-jsd-tau3": FusedLoss("kl", kl_kind="jsd", kl_beta=0.3, temperature=3.0),
    "uld": FusedLoss("uld", weight=2.0),
    "uld-tau2": FusedLoss("uld", temperature=2.0),
    "hybrid": FusedLoss("hybrid", hybrid=HybridConfig(beta=0.4, matched_weight=0.6, unmatched_weight=0.4)),
}


def _both_paths(spec: FusedLoss, dtype=torch.float64, block_rows=5, scale=1.5, **batch):
    """(values, grads of h/W/b) of the plain path and of the fused-linear path, loss scaled by ``scale``."""
    hidden, weight, bias, labels, t_lp, ids, mask, tempered = _batch(dtype=dtype, **batch)
    if spec.loss == "hybrid":
        ids = _hybrid_ids(ids)
    out = []
    for fused in (False, True):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        if fused:
            values = fused_linear_ce_kd_loss(*leaves, labels, t_lp, ids, mask, spec, tempered=tempered,
                                             block_rows=block_rows)
        else:
            values = ce_kd_loss(F.linear(*leaves), labels, t_lp, ids, mask, spec, tempered=tempered)
        (values[0] * scale).backward()
        out.append(([float(v.detach()) for v in values], [x.grad for x in leaves]))
    return out


@pytest.mark.parametrize("name", list(SPECS))
def test_values_and_gradients_equal_the_plain_path_in_float64(name: str) -> None:
    (plain, plain_grads), (fused, fused_grads) = _both_paths(SPECS[name])
    assert fused == pytest.approx(plain, abs=1e-10)
    for a, b in zip(fused_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
def test_the_block_size_changes_nothing(block_rows: int) -> None:
    (plain, plain_grads), (fused, fused_grads) = _both_paths(SPECS["kl-forward"], block_rows=block_rows)
    assert fused == pytest.approx(plain, abs=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(fused_grads, plain_grads))


def test_bfloat16_within_two_percent_of_the_plain_bfloat16_path() -> None:
    """bf16 inputs: the loss within 1e-5 relative, each gradient within 2% of its norm (0.4-0.6% measured).

    Both compute the same bf16 logits and the loss from them in fp32. The gradients round
    differently: the plain path sums dW in one bf16 matmul, the fused one adds each block's
    dW into a bf16 accumulator (as Liger-Kernel does: an fp32 one would be [V, d] more memory).
    """
    (plain, plain_grads), (fused, fused_grads) = _both_paths(SPECS["kl-forward"], dtype=torch.bfloat16, v=300, t=40)
    assert fused == pytest.approx(plain, rel=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        assert a.dtype == torch.bfloat16
        assert float((a.float() - b.float()).norm()) <= 0.02 * float(b.float().norm())


def test_tied_embeddings_get_the_gradient_of_both_uses() -> None:
    hidden, weight, _, labels, t_lp, ids, mask, tempered = _batch()
    tokens = torch.randint(0, weight.shape[0], hidden.shape[:2], generator=torch.Generator().manual_seed(3))
    grads = []
    for fused in (False, True):
        emb = weight.clone().requires_grad_()
        h = hidden + F.embedding(tokens, emb)  # the embedding's own use, before the head
        if fused:
            total, *_ = fused_linear_ce_kd_loss(h, emb, None, labels, t_lp, ids, mask, FusedLoss("kl"))
        else:
            total, *_ = ce_kd_loss(F.linear(h, emb), labels, t_lp, ids, mask, FusedLoss("kl"))
        total.backward()
        grads.append(emb.grad)
    assert torch.allclose(grads[1], grads[0], atol=1e-10, rtol=0)


def test_rows_without_any_target_get_no_gradient() -> None:
    hidden, weight, bias, labels, t_lp, ids, mask, _ = _batch()
    h = hidden.clone().requires_grad_()
    total, *_ = fused_linear_ce_kd_loss(h, weight, bias, labels, t_lp, ids, mask, FusedLoss("kl"))
    total.backward()
    assert not h.grad[1, -1].any()  # no label after it, no KD target
    assert h.grad[1, -3].any()


def test_backward_twice_is_refused() -> None:
    hidden, weight, bias, labels, t_lp, ids, mask, _ = _batch()
    total, *_ = fused_linear_ce_kd_loss(hidden.requires_grad_(), weight, bias, labels, t_lp, ids, mask, FusedLoss("kl"))
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        total.backward()


def test_multilevel_ot_with_the_assignment_ranking_is_refused_naming_the_plain_path() -> None:
    # It matches columns of every student probability of a sequence (MultiLevelOT and ALM otherwise: see
    # test_losses_fused_linear_coupled.py).
    spec = FusedLoss("mlot", mlot=MLOTConfig(k=10, student_rank="assignment"))
    assert not fused_linear_supports(spec)
    assert fused_linear_supports(FusedLoss("mlot", mlot=MLOTConfig(k=10))) and fused_linear_supports(FusedLoss("alm"))
    hidden, weight, bias, labels, t_lp, ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="use ce_kd_loss or the standalone loss"):
        fused_linear_ce_kd_loss(hidden, weight, bias, labels, t_lp, ids, mask, spec)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_against_a_loop_over_positions(kind: str) -> None:
    # Independent of losses.fused: each position's CE and KL from its own log-softmax, by autograd.
    hidden, weight, bias, labels, t_lp, ids, mask, _ = _batch(b=3, t=40, d=32, v=3000, k=32, seed=4)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    w_kd = kd_weights(mask, "sample")
    ce_terms, kd = [], 0.0
    for i in range(hidden.shape[0]):
        for q in range(hidden.shape[1]):
            s = torch.log_softmax(leaves[0][i, q] @ leaves[1].T + leaves[2], dim=-1)
            if q + 1 < hidden.shape[1] and labels[i, q + 1] != -100:
                ce_terms.append(-s[labels[i, q + 1]])
            if mask[i, q]:
                p_ids, s_ids = t_lp[i, q], s[ids[i, q]]
                p_tail = torch.log1p(-p_ids.exp().sum())
                s_tail = torch.log1p(-s_ids.exp().sum())
                p, sl = torch.cat([p_ids, p_tail[None]]), torch.cat([s_ids, s_tail[None]])
                kl = (p.exp() * (p - sl)).sum() if kind == "forward" else (sl.exp() * (sl - p)).sum()
                kd = kd + w_kd[i, q] * kl
    ref = torch.stack(ce_terms).mean() + kd
    ref.backward()
    ref_grads = [x.grad for x in leaves]
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    total, *_ = fused_linear_ce_kd_loss(*leaves, labels, t_lp, ids, mask, FusedLoss("kl", kl_kind=kind), block_rows=16)
    total.backward()
    assert total.item() == pytest.approx(ref.item(), abs=1e-10)
    for a, b in zip(leaves, ref_grads):
        assert torch.allclose(a.grad, b, atol=1e-10, rtol=0)
