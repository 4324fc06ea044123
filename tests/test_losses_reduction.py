"""--kd-reduction (issue 12 §1d): per-sequence mean then mean over sequences, or one mean over tokens.

llm-recipes, Multi-Level-OT and TRL's GOLD average the per-token KD loss within each sample,
then over samples; "token" averages over all aligned positions of the batch.
"""

from __future__ import annotations

import pytest
import torch

from logitcache.losses import FusedLoss, MLOTConfig, ce_kd_loss, kd_weights, kl_loss, multilevel_ot_loss, uld_loss

LENGTHS = (28, 4, 12)


def lengths_mask(lengths=LENGTHS, t: int = 30) -> torch.Tensor:
    mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, 1 : 1 + n] = True
    return mask


def test_weights_by_hand() -> None:
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    token = kd_weights(mask, "token")
    sample = kd_weights(mask, "sample")
    assert torch.allclose(token, mask.double() / 4)
    # Two sequences with a position (the empty third is left out): 1/2 each, split over their positions.
    expected = torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    assert torch.allclose(sample, expected)
    assert kd_weights(torch.zeros(2, 3, dtype=torch.bool), "sample").sum().item() == 0.0
    with pytest.raises(ValueError, match="sample.*token"):
        kd_weights(mask, "batch")


def test_aligned_lengths_28_4_12_by_hand() -> None:
    # A per-position loss equal to the sequence's index + 1 (1, 2, 3): the sample mean is
    # (1 + 2 + 3) / 3 = 2, the token mean (28*1 + 4*2 + 12*3) / 44 = 72 / 44.
    mask = lengths_mask()
    per_position = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[:, None].expand(3, 30)
    assert (kd_weights(mask, "sample") * per_position).sum().item() == pytest.approx(2.0, rel=1e-15)
    assert (kd_weights(mask, "token") * per_position).sum().item() == pytest.approx(72 / 44, rel=1e-15)


def _case(v: int = 40, k: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = lengths_mask()
    logits = torch.randn(3, 30, v, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(3, 30, v, generator=g, dtype=torch.float64) * 2
    # Sequences of different difficulty, so that the two means differ: on the long first one
    # the student already nearly is the teacher.
    teacher[0] = logits[0] + 0.1 * teacher[0]
    lp, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    return logits, lp, ids, mask


def _per_position(loss: str, logits, lp, ids) -> torch.Tensor:
    """[B, T] the loss at each position (the standalone loss on one row at a time)."""
    b, t, v = logits.shape
    one = torch.ones(1, dtype=torch.bool)
    out = torch.empty(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if loss == "uld":
                out[i, j] = uld_loss(logits[i, j][None], lp[i, j][None], one)
            else:
                out[i, j] = kl_loss(logits[i, j][None], lp[i, j][None], ids[i, j][None], one)
    return out


@pytest.mark.parametrize("loss", ["uld", "kl"])
def test_standalone_and_fused_give_the_sample_and_the_token_mean(loss: str) -> None:
    logits, lp, ids, mask = _case()
    per = _per_position(loss, logits, lp, ids)
    sample = sum(per[b][mask[b]].mean() for b in range(3)).item() / 3
    token = per[mask].mean().item()
    assert abs(sample / token - 1) > 0.05  # the two reductions really differ here
    flat = logits.reshape(90, -1)
    for reduction, expected in (("sample", sample), ("token", token)):
        w = kd_weights(mask, reduction).reshape(-1)
        if loss == "uld":
            standalone = uld_loss(flat, lp.reshape(90, -1), mask.reshape(-1), weights=w, chunk_size=7)
        else:
            standalone = kl_loss(flat, lp.reshape(90, -1), ids.reshape(90, -1), mask.reshape(-1), weights=w, chunk_size=7)
        no_ce = torch.full((3, 30), -100)
        _, _, fused = ce_kd_loss(logits, no_ce, lp, ids, mask, FusedLoss(loss, reduction=reduction))
        assert standalone.item() == pytest.approx(expected, rel=1e-12)
        assert fused.item() == pytest.approx(expected, rel=1e-12)


def test_token_mean_is_the_default_of_the_flat_losses() -> None:
    logits, lp, ids, mask = _case()
    flat, m = logits.reshape(90, -1), mask.reshape(-1)
    w = kd_weights(mask, "token").reshape(-1)
    assert uld_loss(flat, lp.reshape(90, -1), m).item() == pytest.approx(
        uld_loss(flat, lp.reshape(90, -1), m, weights=w).item(), rel=1e-12)


def test_mlot_had_and_sl_follow_the_reduction() -> None:
    logits, lp, ids, mask = _case(k=8)
    cfg = MLOTConfig(k=6, approximate_temperature=True)
    sample = multilevel_ot_loss(logits, lp, ids, mask, cfg, reduction="sample", return_parts=True)
    token = multilevel_ot_loss(logits, lp, ids, mask, cfg, reduction="token", return_parts=True)
    # Reweighting the same per-position HAD: its per-sequence means, then their mean.
    per_seq = [multilevel_ot_loss(logits[b : b + 1], lp[b : b + 1], ids[b : b + 1], mask[b : b + 1], cfg,
                                  return_parts=True) for b in range(3)]
    n = mask.sum(dim=1).double()
    for part in ("had", "sl"):
        assert sample[part].item() == pytest.approx(sum(p[part].item() for p in per_seq) / 3, rel=1e-12)
        assert token[part].item() == pytest.approx(sum(p[part].item() * n[b].item() for b, p in enumerate(per_seq)) / n.sum().item(), rel=1e-12)
    assert sample["sd"].item() == pytest.approx(token["sd"].item(), rel=1e-15)  # SD is per sequence either way
