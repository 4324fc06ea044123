"""MultiLevelOT and ALM from hidden states and the LM head (losses.fused_linear_coupled) equal the logits path.

The logits path: ``F.linear(h, W, b)``, then :func:`ce_kd_loss` (MultiLevelOT "paper", ALM) or
CE + :func:`multilevel_ot_loss` (MultiLevelOT "code", which has no fused pass over logits).
Float64, to 1e-10 in the values and in the gradients of h, W and b, at any block size; and no
tensor of the logits' size exists on the way.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from logitcache.pipeline.student.losses import (
    ALMConfig,
    ALMTargets,
    FusedLoss,
    MLOTConfig,
    ce_kd_loss,
    fused_linear_ce_kd_loss,
    multilevel_ot_loss,
)
from test_losses_fused_linear import _batch

SPECS = {
    "mlot-paper": FusedLoss("mlot", weight=0.7, mlot=MLOTConfig(k=10)),
    "mlot-paper-tau_sl3-batch-rank-token": FusedLoss("mlot", mlot=MLOTConfig(k=10, tau_sl=3.0, rank_over="batch"),
                                                     reduction="token"),
    "mlot-code": FusedLoss("mlot", weight=0.7, mlot=MLOTConfig(k=10, variant="code")),
    "alm-plain": FusedLoss("alm", weight=30.0, alm=ALMConfig(temperature=2.0, mode="plain")),
    "alm-debias-sample": FusedLoss("alm", weight=30.0, alm=ALMConfig(temperature=2.0), reduction="sample"),
    "alm-debias-token-binary-ce": FusedLoss("alm", weight=30.0, alm=ALMConfig(temperature=2.0, divergence="binary_ce"),
                                            reduction="token"),
}


def _extras(b: int, t: int, v: int, t_lp: torch.Tensor, seed: int = 5) -> dict:
    """MultiLevelOT "code"'s std-normalised teacher and ALM's debiased chunks for a [B, T] batch, V student ids."""
    g = torch.Generator().manual_seed(seed)
    end = torch.randint(-1, t, (b, 4), generator=g)
    end[1, 0] = t - 1  # a chunk end at a row with no target and no KD mask (_batch's): it is read all the same
    alm = ALMTargets(chunk_index=torch.randint(-1, 4, (b, t), generator=g),
                     teacher_ll=-torch.rand(b, 4, generator=g, dtype=torch.float64) * 30, end=end,
                     teacher_word_start=-torch.rand(b, 4, generator=g, dtype=torch.float64),
                     word_start_mask=torch.rand(v, generator=g) > 0.6)
    return {"std_logprobs": t_lp * 0.5, "alm": alm}


def _loss(spec: FusedLoss, fused: bool, hidden, weight, bias, labels, t_lp, ids, mask, tempered, extras,
          block_rows=None):  # noqa: ANN001, ANN202
    if fused:
        return fused_linear_ce_kd_loss(hidden, weight, bias, labels, t_lp, ids, mask, spec, tempered=tempered,
                                       block_rows=block_rows, **extras)
    logits = F.linear(hidden, weight, bias)
    if spec.loss == "mlot" and spec.mlot.variant == "code":  # as the trainer: CE, then the loss, in fp32 (or fp64)
        x = logits if logits.dtype == torch.float64 else logits.float()
        ce = F.cross_entropy(x[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        kd = multilevel_ot_loss(x, t_lp, ids, mask, spec.mlot, std_logprobs=extras["std_logprobs"],
                                reduction=spec.reduction)
        return ce + spec.weight * kd, ce, kd
    return ce_kd_loss(logits, labels, t_lp, ids, mask, spec, tempered=tempered, alm=extras["alm"])


def _both_paths(spec: FusedLoss, block_rows: int | None = 5, scale: float = 1.5, tied: bool = False, **batch):
    """(values, grads of h/W/b) of the logits path and of the hidden-state path, loss scaled by ``scale``.

    ``tied``: W is also the input embedding (added to h before the head), with no bias.
    """
    hidden, weight, bias, labels, t_lp, ids, mask, tempered = _batch(**batch)
    extras = _extras(*labels.shape, weight.shape[0], t_lp)
    tokens = torch.randint(0, weight.shape[0], labels.shape, generator=torch.Generator().manual_seed(3))
    out = []
    for fused in (False, True):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        h, b = (leaves[0] + F.embedding(tokens, leaves[1]), None) if tied else (leaves[0], leaves[2])
        values = _loss(spec, fused, h, leaves[1], b, labels, t_lp, ids, mask, tempered, extras, block_rows)
        (values[0] * scale).backward()
        out.append(([v.item() for v in values], [x.grad for x in leaves]))
    return out


@pytest.mark.parametrize("block_rows", [1, 5, None])  # one row; blocks not dividing N = 24; the default (one block)
@pytest.mark.parametrize("name", list(SPECS))
def test_values_and_gradients_equal_the_logits_path_in_float64(name: str, block_rows: int | None) -> None:
    (plain, plain_grads), (fused, fused_grads) = _both_paths(SPECS[name], block_rows=block_rows)
    assert plain[2] > 0  # the KD term is there
    assert fused == pytest.approx(plain, abs=1e-10)
    for a, b in zip(fused_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["mlot-code", "alm-debias-sample"])
def test_tied_embeddings_get_the_gradient_of_both_uses(name: str) -> None:
    (_, (_, plain_w, _)), (_, (_, fused_w, _)) = _both_paths(SPECS[name], block_rows=3, tied=True)
    assert torch.allclose(fused_w, plain_w, atol=1e-10, rtol=0)


def test_nothing_to_learn_gives_zero_and_a_zero_gradient() -> None:
    hidden, weight, bias, labels, t_lp, ids, mask, tempered = _batch()
    h = hidden.clone().requires_grad_()
    nothing = torch.full_like(labels, -100)
    total, ce, kd = fused_linear_ce_kd_loss(h, weight, bias, nothing, t_lp, ids, torch.zeros_like(mask),
                                            SPECS["mlot-paper"], tempered=tempered)
    total.backward()
    assert (total.item(), ce.item(), kd.item()) == (0.0, 0.0, 0.0)
    assert not h.grad.any()


class _Largest(TorchDispatchMode):
    """Records the element count of the largest tensor any torch op returns while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


@pytest.mark.parametrize("name", ["mlot-code", "mlot-paper", "alm-debias-sample"])
def test_no_tensor_of_the_logits_size_exists(name: str) -> None:
    # V = 600 > d, N: the head [V, d] and the per-sequence sums [B, V] are far below [N, V].
    batch = dict(b=2, t=12, d=9, v=600, k=16)
    hidden, weight, bias, labels, t_lp, ids, mask, tempered = _batch(**batch)
    extras = _extras(*labels.shape, weight.shape[0], t_lp)
    n_logits = labels.numel() * weight.shape[0]
    sizes = []
    for fused in (False, True):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        with _Largest() as largest:
            total, *_ = _loss(SPECS[name], fused, *leaves, labels, t_lp, ids, mask, tempered, extras, block_rows=2)
            total.backward()
        sizes.append(largest.numel)
    assert sizes[0] >= n_logits  # the logits path: the hook sees the logits
    assert sizes[1] <= n_logits // 2  # the largest: the head's weight and its gradient [V, d]


@pytest.mark.parametrize("name", ["mlot-paper", "mlot-code", "alm-debias-sample"])
def test_bfloat16_within_two_percent_of_the_plain_bfloat16_path(name: str) -> None:
    """bf16 inputs: the loss within 1e-5 relative (equal, measured), each gradient within 2% of its norm (0.35-0.65%).

    Both paths compute the same bf16 logits (here the ranked ones as k dot products per row, rounded
    once as the head rounds) and the loss from them in fp32; dW adds up block by block in bf16.
    """
    (plain, plain_grads), (fused, fused_grads) = _both_paths(SPECS[name], dtype=torch.bfloat16, v=300, t=40)
    assert fused == pytest.approx(plain, rel=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        assert a.dtype == torch.bfloat16
        assert float((a.float() - b.float()).norm()) <= 0.02 * float(b.float().norm())
