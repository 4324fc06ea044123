"""Hybrid loss (TRL GOLD): exact JSD on tokens both vocabularies share, ULD on the rest."""

import math

import pytest
import torch

from logitcache.losses import hybrid_loss, kd_weights, kl_loss, uld_loss
from logitcache.pipeline.student.losses import FusedLoss, HybridConfig, ce_kd_loss

D = torch.float64


def gold_hybrid(s_probs, t_probs, t2s, beta, w_m, w_u):
    """TRL GOLD's ULDLoss._compute_hybrid_uld_loss on full distributions [n, Vs], [n, Vt], as written there."""
    vt, vs = t_probs.shape[-1], s_probs.shape[-1]
    t_matched = [i for i in range(vt) if t2s[i] >= 0]
    s_matched = [t2s[i] for i in t_matched]
    s_lp = torch.log(s_probs[:, s_matched].clamp_min(1e-8))
    t_lp = torch.log(t_probs[:, t_matched].clamp_min(1e-8))
    if beta == 0:
        jsd = t_lp.exp() * (t_lp - s_lp)
    elif beta == 1:
        jsd = s_lp.exp() * (s_lp - t_lp)
    else:
        mix = torch.logsumexp(torch.stack([s_lp + math.log(1 - beta), t_lp + math.log(beta)]), dim=0)
        jsd = beta * t_lp.exp() * (t_lp - mix) + (1 - beta) * s_lp.exp() * (s_lp - mix)
    matched = jsd.sum() / s_probs.shape[0]
    t_un = t_probs[:, [i for i in range(vt) if i not in t_matched]].sort(dim=-1, descending=True).values
    s_un = s_probs[:, [j for j in range(vs) if j not in s_matched]].sort(dim=-1, descending=True).values
    width = max(t_un.shape[-1], s_un.shape[-1])
    t_un = torch.nn.functional.pad(t_un, (0, width - t_un.shape[-1]))
    s_un = torch.nn.functional.pad(s_un, (0, width - s_un.shape[-1]))
    unmatched = (s_un - t_un).abs().sum() / s_probs.shape[0]
    return w_m * matched + w_u * unmatched


def slow_topk_hybrid(logits, t_lp, sids, mask, beta, w_m, w_u):
    """The documented top-K formula, one position and one entry at a time."""
    total, count = 0.0, 0
    for n in range(logits.shape[0]):
        if not mask[n]:
            continue
        count += 1
        s = torch.softmax(logits[n], dim=-1)
        t = t_lp[n].exp()
        jsd = 0.0
        used = set()
        t_unmatched = []
        for i in range(t.shape[0]):
            j = int(sids[n, i])
            if j < 0:
                t_unmatched.append(t[i])
                continue
            used.add(j)
            ti, si = t[i], s[j]
            if beta == 0:  # GOLD's special cases: forward and reverse KL
                jsd = jsd + ti * torch.log(ti / si)
            elif beta == 1:
                jsd = jsd + si * torch.log(si / ti)
            else:
                mi = beta * ti + (1 - beta) * si
                jsd = jsd + beta * ti * torch.log(ti / mi) + (1 - beta) * si * torch.log(si / mi)
        t_unmatched = sorted(t_unmatched, reverse=True)
        s_rest = sorted([s[j] for j in range(s.shape[0]) if j not in used], reverse=True)
        kept = s_rest[: len(t_unmatched)]
        kept += [torch.zeros((), dtype=D)] * (len(t_unmatched) - len(kept))
        uld = sum((a - b).abs() for a, b in zip(kept, t_unmatched))
        t_tail = max(1 - t.sum(), torch.zeros((), dtype=D))
        s_tail = sum(s_rest[len(t_unmatched):], torch.zeros((), dtype=D))
        uld = uld + (s_tail - t_tail).abs()
        total = total + w_m * jsd + w_u * uld
    return total / max(count, 1)


def _case(n=6, vs=11, vt=9, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vs, generator=g, dtype=D) * 2).requires_grad_()
    t_full = torch.log_softmax(torch.randn(n, vt, generator=g, dtype=D) * 2, dim=-1)
    t_lp, t_ids = t_full.topk(k, dim=-1)
    t2s = torch.full((vt,), -1, dtype=torch.long)
    t2s[torch.tensor([0, 2, 3, 5, 8])] = torch.tensor([4, 0, 9, 1, 6])  # a one-to-one partial map
    mask = torch.tensor([True, False, True, True, True, True])[:n]
    return logits, t_full, t_lp, t2s[t_ids], mask, t2s


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_full_teacher_distribution_equals_gold_formula(beta):
    logits, t_full, _, _, mask, t2s = _case()
    vt = t_full.shape[-1]
    all_ids = torch.arange(vt).expand(logits.shape[0], vt)
    got = hybrid_loss(logits, t_full, t2s[all_ids], mask, beta=beta, matched_weight=0.7, unmatched_weight=0.3)
    want = gold_hybrid(torch.softmax(logits[mask], -1), t_full[mask].exp(), t2s.tolist(), beta, 0.7, 0.3)
    assert abs(got.item() - want.item()) < 1e-12


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_equals_slow_reference_values_and_gradients(beta, chunk_size):
    logits, _, t_lp, sids, mask, _ = _case()
    got = hybrid_loss(logits, t_lp, sids, mask, beta=beta, matched_weight=0.6, unmatched_weight=0.4, chunk_size=chunk_size)
    want = slow_topk_hybrid(logits, t_lp, sids, mask, beta, 0.6, 0.4)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    assert abs(got.item() - want.item()) < 1e-12
    assert torch.allclose(g_got, g_want, atol=1e-12)


def test_student_vocabulary_smaller_than_k_is_zero_padded():
    logits, _, t_lp, sids, mask, _ = _case(vs=4, vt=9, k=7)
    sids = torch.where(sids < 4, sids, -1)
    got = hybrid_loss(logits, t_lp, sids, mask, beta=0.5, matched_weight=0.5, unmatched_weight=0.5)
    want = slow_topk_hybrid(logits, t_lp, sids, mask, 0.5, 0.5, 0.5)
    assert abs(got.item() - want.item()) < 1e-12


def test_gradcheck():
    logits, _, t_lp, sids, mask, _ = _case(n=3, vs=11, vt=9, k=4)
    fn = lambda x: hybrid_loss(x, t_lp, sids, mask[:3], beta=0.5, matched_weight=0.6, unmatched_weight=0.4, chunk_size=2)
    assert torch.autograd.gradcheck(fn, (logits.detach().requires_grad_(),))


def test_same_tokenizer_and_student_equal_to_teacher_gives_zero():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 20, generator=g, dtype=D)
    t_lp, t_ids = torch.log_softmax(logits, -1).topk(6, dim=-1)  # a top-6 cache of the student itself
    mask = torch.ones(5, dtype=torch.bool)
    for w_m, w_u in [(1.0, 0.0), (0.5, 0.5)]:
        got = hybrid_loss(logits, t_lp, t_ids, mask, matched_weight=w_m, unmatched_weight=w_u)
        assert abs(got.item()) < 1e-15


def test_nothing_maps_is_uld():
    logits, _, t_lp, sids, mask, _ = _case()
    none = torch.full_like(sids, -1)
    got = hybrid_loss(logits, t_lp, none, mask, matched_weight=0.2, unmatched_weight=1.0)
    assert abs(got.item() - uld_loss(logits, t_lp, mask).item()) < 1e-14


def test_everything_maps_with_beta_zero_is_forward_kl_on_the_full_vocabulary():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 8, generator=g, dtype=D)
    t_lp = torch.log_softmax(torch.randn(4, 8, generator=g, dtype=D), -1)
    ids = torch.arange(8).expand(4, 8)
    mask = torch.ones(4, dtype=torch.bool)
    got = hybrid_loss(logits, t_lp, ids, mask, beta=0.0, matched_weight=1.0, unmatched_weight=0.0)
    assert abs(got.item() - kl_loss(logits, t_lp, ids, mask).item()) < 1e-14


def test_all_masked_is_exactly_zero_with_zero_gradient():
    logits, _, t_lp, sids, _, _ = _case()
    loss = hybrid_loss(logits, t_lp, sids, torch.zeros(6, dtype=torch.bool))
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and not grad.any()


def test_adaptive_weights_are_the_mapped_share_of_the_teacher_vocabulary():
    assert HybridConfig().weights(0.75) == (0.75, 0.25)
    assert HybridConfig(matched_weight=1.0, unmatched_weight=2.0).weights(0.75) == (1.0, 2.0)
    with pytest.raises(ValueError, match="both"):
        HybridConfig(matched_weight=1.0).weights(0.5)


@pytest.mark.parametrize("dtype, reduction", [(torch.float64, "token"), (torch.float32, "token"), (torch.float64, "sample")])
def test_fused_pass_equals_ce_plus_standalone_loss(dtype, reduction):
    g = torch.Generator().manual_seed(3)
    b, t, vs, k = 2, 5, 13, 4
    logits = (torch.randn(b, t, vs, generator=g, dtype=D) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, vs, (b, t), generator=g)
    labels[:, :2] = -100
    labels[1, 2] = -100  # sequences of 3 and 2 targets: the two reductions differ
    t_lp = torch.log_softmax(torch.randn(b, t, 10, generator=g, dtype=D) * 2, -1).topk(k, dim=-1).values
    sids = torch.argsort(torch.rand(b, t, vs, generator=g), dim=-1)[..., :k]  # distinct student ids per row
    sids = torch.where(torch.rand(b, t, k, generator=g) < 0.3, -1, sids)
    kd_mask = labels != -100
    spec = FusedLoss("hybrid", weight=0.7, hybrid=HybridConfig(beta=0.5, matched_weight=0.6, unmatched_weight=0.4), reduction=reduction)
    total, ce, kd = ce_kd_loss(logits, labels, t_lp.to(dtype), sids, kd_mask, spec)
    (g_fused,) = torch.autograd.grad(total, logits)
    x = logits.detach().to(D).requires_grad_()
    shifted = torch.cat([labels[:, 1:], torch.full((b, 1), -100)], dim=1)
    want_ce = torch.nn.functional.cross_entropy(x.reshape(-1, vs), shifted.reshape(-1), ignore_index=-100)
    want_kd = hybrid_loss(x.reshape(-1, vs), t_lp.reshape(-1, k), sids.reshape(-1, k), kd_mask.reshape(-1),
                          beta=0.5, matched_weight=0.6, unmatched_weight=0.4,
                          weights=kd_weights(kd_mask, reduction, D).reshape(-1))
    (g_want,) = torch.autograd.grad(want_ce + 0.7 * want_kd, x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(kd.item() - want_kd.item()) < tol and abs(ce.item() - want_ce.item()) < tol
    assert torch.allclose(g_fused.to(D), g_want, atol=tol)


def test_masked_out_rows_may_hold_any_id():
    logits, _, t_lp, sids, mask, _ = _case()
    padded = sids.clone()
    padded[~mask] = 10_000  # padding: never read
    assert hybrid_loss(logits, t_lp, padded, mask).item() == hybrid_loss(logits, t_lp, sids, mask).item()
    b_mask = mask.view(2, 3)
    total, _, _ = ce_kd_loss(logits.view(2, 3, -1), torch.zeros(2, 3, dtype=torch.long), t_lp.view(2, 3, -1),
                             padded.view(2, 3, -1), b_mask, FusedLoss("hybrid"))
    assert torch.isfinite(total)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [0.5, 2.0, 3.0])
def test_at_a_temperature_it_is_the_formula_on_tempered_distributions_times_tau_squared(beta, tau):
    """Student softmax(x / tau), teacher exact at tau over its full vocabulary, then times tau**2."""
    logits, t_full, _, _, mask, t2s = _case()
    t_tau = torch.log_softmax(torch.log_softmax(t_full, -1) / tau, -1)  # the teacher's full distribution at tau
    t_lp, t_ids = t_tau.topk(5, dim=-1)

    got = hybrid_loss(logits, t_lp, t2s[t_ids], mask, beta=beta, matched_weight=0.6, unmatched_weight=0.4,
                      temperature=tau, chunk_size=2)
    want = tau**2 * slow_topk_hybrid(logits / tau, t_lp, t2s[t_ids], mask, beta, 0.6, 0.4)

    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    assert abs(got.item() - want.item()) < 1e-12
    assert torch.allclose(g_got, g_want, atol=1e-12)
