"""kl_loss (forward / reverse / JSD over top-K + tail buckets) against a plain-Python reference."""

from __future__ import annotations

import math

import pytest
import torch

from logitcache.losses import REVERSE_KL_TEACHER_FLOOR, kl_loss

KINDS = ["forward", "reverse", "jsd"]


def softmax_list(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def divergence(t: list[float], s: list[float], kind: str, beta: float) -> float:
    """The three divergences over matching buckets, with plain math.log."""
    def kl(p: list[float], q: list[float]) -> float:
        return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)

    if kind == "forward":
        return kl(t, s)
    if kind == "reverse":
        return kl(s, [max(a, REVERSE_KL_TEACHER_FLOOR) for a in t])
    m = [beta * a + (1 - beta) * b for a, b in zip(t, s)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def reference_kl(student_logits, teacher_logprobs, teacher_ids, mask, kind: str, beta: float = 0.5) -> float:
    """Per position: K teacher buckets + one tail bucket; the student's tail summed over the other ids."""
    total, count = 0.0, 0
    for p in range(student_logits.shape[0]):
        if not bool(mask[p]):
            continue
        probs = softmax_list(student_logits[p].tolist())
        ids = teacher_ids[p].tolist()
        t = [math.exp(x) for x in teacher_logprobs[p].tolist()]
        t.append(max(0.0, 1.0 - sum(t)))
        s = [probs[i] for i in ids]
        s.append(sum(probs[i] for i in range(len(probs)) if i not in set(ids)))
        total += divergence(t, s, kind, beta)
        count += 1
    return total / count if count else 0.0


def make_case(seed: int, n: int = 6, v: int = 10, k: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=dtype) * 2
    teacher_full = torch.log_softmax(torch.randn(n, v, generator=g, dtype=dtype) * 2, dim=-1)
    lp, ids = teacher_full.topk(k, dim=-1)
    return student, lp, ids, teacher_full


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_with_tail(kind: str, seed: int) -> None:
    student, lp, ids, _ = make_case(seed)
    mask = torch.tensor([True, True, False, True, True, True])
    got = kl_loss(student, lp, ids, mask, kind=kind)
    assert got.item() == pytest.approx(reference_kl(student, lp, ids, mask, kind), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_convention(beta: float) -> None:
    student, lp, ids, _ = make_case(11)
    mask = torch.ones(6, dtype=torch.bool)
    got = kl_loss(student, lp, ids, mask, kind="jsd", beta=beta)
    assert got.item() == pytest.approx(reference_kl(student, lp, ids, mask, "jsd", beta), rel=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_k_equal_v_is_the_exact_full_vocabulary_divergence(kind: str) -> None:
    student, lp, ids, teacher_full = make_case(5, k=10)  # K = V: the tail bucket is empty
    mask = torch.ones(6, dtype=torch.bool)
    got = kl_loss(student, lp, ids, mask, kind=kind)
    expected = sum(
        divergence(
            [math.exp(x) for x in teacher_full[p].tolist()], softmax_list(student[p].tolist()), kind, 0.5
        )
        for p in range(6)
    ) / 6
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_shuffled_bucket_order_does_not_matter() -> None:
    student, lp, ids, _ = make_case(2)
    mask = torch.ones(6, dtype=torch.bool)
    perm = torch.randperm(4)
    for kind in KINDS:
        a = kl_loss(student, lp, ids, mask, kind=kind)
        b = kl_loss(student, lp[:, perm], ids[:, perm], mask, kind=kind)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_teacher_tail_and_confident_student_stay_finite(kind: str, dtype) -> None:
    # The teacher's top-K sums to a hair over 1, so its tail clamps to exactly 0; the student
    # puts all but ~e^-60 of its mass on those ids, so 1 - sum(s_top) would cancel to 0 (or
    # below) and its log would be -inf or NaN.
    g = torch.Generator().manual_seed(0)
    n, v, k = 4, 12, 3
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k, generator=g, dtype=dtype), dim=-1) + 1e-5
    assert (lp.exp().sum(-1) > 1).all()
    student = torch.full((n, v), -60.0, dtype=dtype)
    student.scatter_(1, ids, torch.randn(n, k, generator=g, dtype=dtype))
    student.requires_grad_()
    mask = torch.ones(n, dtype=torch.bool)
    loss = kl_loss(student, lp, ids, mask, kind=kind)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # Both tails are ~0: the loss is the divergence of the top-K buckets alone.
    top_s = torch.log_softmax(student.detach().gather(1, ids).double(), dim=-1).exp()
    expected = sum(divergence(lp[p].double().exp().tolist(), top_s[p].tolist(), kind, 0.5) for p in range(n)) / n
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_teacher_id_outside_student_vocab_raises() -> None:
    student, lp, ids, _ = make_case(0)
    ids = ids.clone()
    ids[2, 1] = 10  # V = 10
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        kl_loss(student, lp, ids, torch.ones(6, dtype=torch.bool))
    # The same id on a masked-out row (padding) is ignored.
    mask = torch.ones(6, dtype=torch.bool)
    mask[2] = False
    ids[2] = -100
    assert torch.isfinite(kl_loss(student, lp, ids, mask))


def test_bad_kind_and_beta_raise() -> None:
    student, lp, ids, _ = make_case(0)
    mask = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="kind"):
        kl_loss(student, lp, ids, mask, kind="tvd")
    with pytest.raises(ValueError, match="beta"):
        kl_loss(student, lp, ids, mask, kind="jsd", beta=1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_is_zero_with_zero_gradient(kind: str) -> None:
    student, lp, ids, _ = make_case(4)
    student.requires_grad_()
    loss = kl_loss(student, lp, ids, torch.zeros(6, dtype=torch.bool), kind=kind)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [4, 10])
def test_gradcheck(kind: str, k: int) -> None:
    student, lp, ids, _ = make_case(8, k=k)
    mask = torch.tensor([True, False, True, True, True, True])
    assert torch.autograd.gradcheck(lambda s: kl_loss(s, lp, ids, mask, kind=kind), (student.requires_grad_(),))


def test_identical_distributions_give_zero() -> None:
    _, lp, ids, teacher_full = make_case(9)
    mask = torch.ones(6, dtype=torch.bool)
    for kind in KINDS:
        assert kl_loss(teacher_full, lp, ids, mask, kind=kind).item() == pytest.approx(0.0, abs=1e-12)
