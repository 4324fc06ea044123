"""The chunked path of uld_loss and kl_loss: the same values and gradients as one pass over N."""

from __future__ import annotations

import pytest
import torch

from logitcache.losses import kl_loss, uld_loss
from logitcache.pipeline.student.losses.chunking import chunked_position_sum

N = 10
# Rows 3..8 masked out: with chunk_size 3 the chunk [3, 6) has no masked-in row and is skipped.
MASK = torch.tensor([True, False, True, False, False, False, False, False, False, True])
CHUNK_SIZES = [1, 3, N, N + 7]


def make_case(seed: int, v: int = 12, k: int = 5, vt: int = 12):
    """Student logits [N, v]; a top-k cache (log-probs and ids) of a random teacher over vt ids."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, v, generator=g, dtype=torch.float64) * 2
    lp, ids = torch.log_softmax(torch.randn(N, vt, generator=g, dtype=torch.float64) * 2, dim=-1).topk(k, dim=-1)
    return student, lp, ids


def value_and_grad(loss_fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = student.detach().clone().requires_grad_()
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), x.grad


def assert_same(loss_fn_chunked, loss_fn_plain, student: torch.Tensor) -> None:
    got, got_grad = value_and_grad(loss_fn_chunked, student)
    want, want_grad = value_and_grad(loss_fn_plain, student)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    assert torch.allclose(got_grad, want_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("mask", [MASK, torch.ones(N, dtype=torch.bool)], ids=["masked", "all"])
@pytest.mark.parametrize("v,k", [(12, 5), (4, 6)])  # K < Vs, and Vs < K (zero-padded student)
def test_uld_chunked_equals_unchunked(chunk_size: int, mask: torch.Tensor, v: int, k: int) -> None:
    student, lp, _ = make_case(chunk_size, v=v, k=k)
    assert_same(
        lambda x: uld_loss(x, lp, mask, chunk_size=chunk_size),
        lambda x: uld_loss(x, lp, mask, chunk_size=None),
        student,
    )


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("k", [5, 12])  # with a tail bucket, and K = V (none)
def test_kl_chunked_equals_unchunked(chunk_size: int, kind: str, k: int) -> None:
    student, lp, ids = make_case(chunk_size + k, k=k)
    ids = torch.where(MASK[:, None], ids, torch.full_like(ids, -100))  # padding on masked-out rows
    assert_same(
        lambda x: kl_loss(x, lp, ids, MASK, kind=kind, chunk_size=chunk_size),
        lambda x: kl_loss(x, lp, ids, MASK, kind=kind, chunk_size=None),
        student,
    )


def test_default_is_chunked_and_equal() -> None:
    student, lp, ids = make_case(0)
    student = student.repeat(150, 1)[:1500]  # N = 1500 > the default 1024: two chunks
    big_lp, big_ids = lp.repeat(150, 1)[:1500], ids.repeat(150, 1)[:1500]
    mask = torch.ones(1500, dtype=torch.bool)
    assert_same(lambda x: uld_loss(x, big_lp, mask), lambda x: uld_loss(x, big_lp, mask, chunk_size=None), student)
    assert_same(
        lambda x: kl_loss(x, big_lp, big_ids, mask),
        lambda x: kl_loss(x, big_lp, big_ids, mask, chunk_size=None),
        student,
    )


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_uld_chunked_gradcheck(chunk_size: int) -> None:
    student, lp, _ = make_case(3)
    assert torch.autograd.gradcheck(
        lambda s: uld_loss(s, lp, MASK, chunk_size=chunk_size), (student.requires_grad_(),)
    )


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_kl_chunked_gradcheck(kind: str) -> None:
    student, lp, ids = make_case(4)
    mask = MASK.clone()
    mask[4] = True
    assert torch.autograd.gradcheck(
        lambda s: kl_loss(s, lp, ids, mask, kind=kind, chunk_size=3), (student.requires_grad_(),)
    )


def test_fully_masked_chunked_is_zero_with_zero_gradient() -> None:
    student, lp, ids = make_case(5)
    student.requires_grad_()
    mask = torch.zeros(N, dtype=torch.bool)
    loss = uld_loss(student, lp, mask, chunk_size=3) + kl_loss(student, lp, ids, mask, chunk_size=3)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_formula_only_ever_sees_one_chunk() -> None:
    # The bound on memory: forward and backward call the plain formula on at most chunk_size rows.
    seen: list[int] = []

    def fn(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return torch.where(m, x.logsumexp(dim=-1), torch.zeros(())).sum()

    x = torch.randn(N, 7, dtype=torch.float64, requires_grad=True)
    total = chunked_position_sum(fn, x, MASK, chunk_size=3)
    total.backward()
    assert max(seen) == 3
    assert seen == [3, 1, 3, 1]  # chunks [0,3) and [9,10), forward then backward; [3,9) all masked
    assert torch.allclose(total, fn(x.detach(), MASK), rtol=0, atol=1e-12)


def test_teacher_requiring_grad_gets_it() -> None:
    # The chunked backward differentiates the logits only; a teacher that needs a gradient
    # runs the plain path, so it gets one.
    student, lp, _ = make_case(6)
    lp.requires_grad_()
    uld_loss(student, lp, MASK, chunk_size=3).backward()
    assert lp.grad is not None and bool(lp.grad[0].abs().sum() > 0)


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_chunk_size_raises(bad: int) -> None:
    student, lp, ids = make_case(0)
    with pytest.raises(ValueError, match="chunk_size"):
        uld_loss(student, lp, MASK, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        kl_loss(student, lp, ids, MASK, chunk_size=bad)


def test_lean_logsumexp_matches_torch() -> None:
    from logitcache.pipeline.student.losses.chunking import logsumexp_last

    x = (torch.randn(5, 9, dtype=torch.float64) * 4).requires_grad_()
    w = torch.randn(5, 1, dtype=torch.float64)
    got = logsumexp_last(x)
    (got_grad,) = torch.autograd.grad((got * w).sum(), x)
    want = torch.logsumexp(x, dim=-1, keepdim=True)
    (want_grad,) = torch.autograd.grad((want * w).sum(), x)
    assert torch.equal(got, want)
    assert torch.allclose(got_grad, want_grad, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(logsumexp_last, (x,))
