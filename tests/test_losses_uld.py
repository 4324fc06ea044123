"""uld_loss against the paper's ULD computed by a slow, independent reference."""

from __future__ import annotations

import math

import pytest
import torch

from logitcache.losses import uld_loss


def softmax_list(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def reference_uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """The paper's ULD on full distributions: sort both descending, zero-pad the shorter, L1; mean over mask."""
    total, count = 0.0, 0
    for p in range(student_logits.shape[0]):
        if not bool(mask[p]):
            continue
        s = sorted(softmax_list(student_logits[p].tolist()), reverse=True)
        t = sorted(softmax_list(teacher_logits[p].tolist()), reverse=True)
        n = max(len(s), len(t))
        s += [0.0] * (n - len(s))
        t += [0.0] * (n - len(t))
        total += sum(abs(a - b) for a, b in zip(s, t))
        count += 1
    return total / count if count else 0.0


def top_k_cache(teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """What the cache stores: the k largest log-probabilities over the full vocabulary, sorted."""
    return torch.log_softmax(teacher_logits, dim=-1).topk(k, dim=-1).values


@pytest.mark.parametrize("vs,vt", [(7, 7), (5, 9), (11, 6), (3, 8), (12, 2)])
def test_complete_teacher_equals_paper_uld(vs: int, vt: int) -> None:
    g = torch.Generator().manual_seed(vs * 100 + vt)
    n = 6
    student = torch.randn(n, vs, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(n, vt, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(n, dtype=torch.bool)
    got = uld_loss(student, top_k_cache(teacher, vt), mask)  # K = teacher vocabulary: nothing unknown
    assert got.item() == pytest.approx(reference_uld(student, teacher, mask), abs=1e-12)


def test_teacher_k_larger_than_student_vocab_pads_student() -> None:
    # Vs = 3 < K = 8: the student's sorted vector is zero-padded to K, as in the paper.
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 3, generator=g, dtype=torch.float64)
    teacher = torch.randn(4, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(4, dtype=torch.bool)
    got = uld_loss(student, top_k_cache(teacher, 8), mask)
    assert got.item() == pytest.approx(reference_uld(student, teacher, mask), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_truncated_teacher_is_a_lower_bound(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    vs, vt = int(torch.randint(2, 12, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
    k = int(torch.randint(1, vt, (1,), generator=g))  # K < Vt: the teacher's tail is unknown
    student = torch.randn(5, vs, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(5, vt, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(5, dtype=torch.bool)
    got = uld_loss(student, top_k_cache(teacher, k), mask).item()
    assert got <= reference_uld(student, teacher, mask) + 1e-12


def test_ties_in_probabilities() -> None:
    student = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.5, 0.5, 0.5, -1.0], [3.0, 0.0, 3.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(2, dtype=torch.bool)
    got = uld_loss(student, top_k_cache(teacher, 4), mask)
    assert got.item() == pytest.approx(reference_uld(student, teacher, mask), abs=1e-12)


def test_mask_averages_over_masked_in_positions_only() -> None:
    g = torch.Generator().manual_seed(7)
    student = torch.randn(8, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(8, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, False, True, False])
    got = uld_loss(student, top_k_cache(teacher, 6), mask)
    assert got.item() == pytest.approx(reference_uld(student, teacher, mask), abs=1e-12)
    # Changing a masked-out row changes nothing.
    student2 = student.clone()
    student2[1] += 5.0
    assert uld_loss(student2, top_k_cache(teacher, 6), mask).item() == got.item()


def test_fully_masked_batch_is_zero_with_zero_gradient() -> None:
    student = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    teacher = top_k_cache(torch.randn(4, 9, dtype=torch.float64), 3)
    loss = uld_loss(student, teacher, torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_empty_batch_is_zero() -> None:
    student = torch.zeros(0, 6, requires_grad=True)
    assert uld_loss(student, torch.zeros(0, 3), torch.zeros(0, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("vs,k", [(9, 4), (4, 6)])
def test_gradcheck(vs: int, k: int) -> None:
    g = torch.Generator().manual_seed(3)
    student = (torch.randn(5, vs, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = top_k_cache(torch.randn(5, 10, generator=g, dtype=torch.float64) * 2, k)
    mask = torch.tensor([True, True, False, True, True])
    assert torch.autograd.gradcheck(lambda s: uld_loss(s, teacher, mask), (student,))


def test_fp16_teacher_with_fp32_student() -> None:
    student = torch.randn(3, 10)
    teacher = top_k_cache(torch.randn(3, 10), 4).half()  # the cache stores fp16
    loss = uld_loss(student, teacher, torch.ones(3, dtype=torch.bool))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="N differs"):
        uld_loss(torch.randn(3, 5), torch.randn(2, 4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        uld_loss(torch.randn(3, 5), torch.randn(3, 4), torch.ones(3))


def test_public_import_path_reexports_every_loss() -> None:
    import logitcache.losses as short
    import logitcache.pipeline.student.losses as full

    assert set(short.__all__) == set(full.__all__)
    assert all(getattr(short, name) is getattr(full, name) for name in full.__all__)
