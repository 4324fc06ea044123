"""Universal Logit Distillation (ULD) against a top-K teacher cache.

Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
Loss for LLMs" (TMLR 2025, arXiv 2402.12030). Per aligned position, sort the student's and
the teacher's probabilities in descending order, zero-pad the shorter vector and take the
L1 distance; no vocabulary correspondence is needed, so the tokenizers may differ.

The loss runs over chunks of positions (:mod:`.chunking`), so memory stays bounded.
"""

from __future__ import annotations

import torch

from logitcache.pipeline.student.losses.chunking import (
    DEFAULT_CHUNK_SIZE,
    check_temperature,
    chunked_position_sum,
    logsumexp_last,
    position_weights,
)


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """ULD between a student and a top-K teacher, averaged over the masked-in positions.

    Per position p (teacher probabilities ``t`` sorted descending, K known entries of a
    distribution over the full teacher vocabulary; student probabilities ``s`` sorted
    descending)::

        uld_p = sum_{i<K} |s_i - t_i|  +  |s_tail - t_tail|
        s_tail = 1 - sum_{i<K} s_i        t_tail = max(0, 1 - sum_{i<K} t_i)

    The paper's ULD is ``sum_i |s_i - t_i|`` over the whole (zero-padded) vocabulary. The
    teacher entries beyond K are unknown, so everything past rank K is folded into one
    bucket per side. By the triangle inequality ``sum_{i>=K} |s_i - t_i| >=
    |sum_{i>=K} s_i - sum_{i>=K} t_i| = |s_tail - t_tail|``, so this is a lower bound of the
    full ULD; it is *equal* to it when K covers the teacher vocabulary (then ``t_tail = 0``
    and ``sum_{i>=K} |s_i - 0| = s_tail``). If the student vocabulary is smaller than K its
    sorted vector is zero-padded, as in the paper.

    At ``temperature`` tau != 1 both sides are tempered: ``s = softmax(logits / tau)`` and
    ``teacher_logprobs`` must be the teacher's log-probabilities *at tau* over its full
    vocabulary (from a cache: ``targets.tempered_logprobs``, exact, so the tail at tau is
    exact too). The result is multiplied by tau**2 (Hinton et al.'s scaling, which keeps the
    gradients' size comparable across temperatures); at tau = 1 nothing changes.

    Only the student's top-K is needed (``torch.topk`` on the logits, which softmax keeps in
    order), never a full sort of its vocabulary.

    Args:
        student_logits: [N, Vs] raw student logits (temperature 1; divided by ``temperature`` here).
        teacher_logprobs: [N, K] teacher log-probabilities at ``temperature``, normalised over
            the full teacher vocabulary, K entries per position (sorted descending in the
            cache; sorted again here, which is cheap, so any order works). Cast to the
            student's dtype.
        mask: [N] bool, True where the position counts. Masked-out rows must hold finite
            values (they are computed and discarded, not skipped).
        temperature: tau > 0, see above.
        weights: [N] per-position weights, the loss being ``sum_p weights[p] * uld_p`` over
            masked-in p (``kd_weights(mask_BT, "sample").flatten()`` averages per sequence,
            then over sequences). None: the mean over masked-in positions.
        chunk_size: positions per chunk (default 1024), or None for one pass over all N.
            Chunked, forward and backward hold one chunk's intermediates at a time (backward
            recomputes the chunk), so the memory beyond the logits' gradient is bounded by
            ``chunk_size`` rather than N; values and gradients are the same. Chunks with no
            masked-in position are skipped. Only ``student_logits`` gets a gradient on the
            chunked path (if ``teacher_logprobs`` requires grad, the loss runs unchunked).

    Returns:
        Scalar in the student's dtype: tau**2 times the (weighted) mean of ``uld_p`` over
        masked-in positions; exactly 0 (with a zero gradient) when no position is masked in.
    """
    if student_logits.dim() != 2 or teacher_logprobs.dim() != 2 or mask.dim() != 1:
        raise ValueError(
            "uld_loss expects student_logits [N, Vs], teacher_logprobs [N, K] and mask [N]; got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_logprobs.shape)}, {tuple(mask.shape)}."
        )
    if not (student_logits.shape[0] == teacher_logprobs.shape[0] == mask.shape[0]):
        raise ValueError(
            f"uld_loss: N differs between student_logits ({student_logits.shape[0]}), "
            f"teacher_logprobs ({teacher_logprobs.shape[0]}) and mask ({mask.shape[0]})."
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"uld_loss: mask must be a bool tensor, got {mask.dtype}.")
    check_temperature(temperature)
    w = position_weights(mask, weights, student_logits.dtype)
    total = chunked_position_sum(
        lambda x, m, lp, wp: _uld_sum(x, m, lp, wp, temperature), student_logits, mask, teacher_logprobs, w,
        chunk_size=chunk_size,
    )
    return total * temperature**2 if temperature != 1.0 else total


def _uld_sum(
    student_logits: torch.Tensor, mask: torch.Tensor, teacher_logprobs: torch.Tensor, weights: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The plain formula: ``sum_p weights[p] * uld_p`` over the masked-in rows (shapes as in :func:`uld_loss`)."""
    k = teacher_logprobs.shape[-1]
    vs = student_logits.shape[-1]
    # Top-K on the logits, normalised by the log-partition: no [N, Vs] probability tensor is
    # built in the forward pass, and the backward pass touches the full row only twice.
    # (Dividing by tau keeps the order, so the top-K ids are those at temperature 1.)
    z = student_logits if temperature == 1.0 else student_logits / temperature
    lse = logsumexp_last(z)  # [N, 1]
    top = torch.topk(z, min(k, vs), dim=-1, sorted=True).values  # [N, min(K, Vs)]
    per_position = uld_per_position(top - lse, teacher_logprobs) * weights
    # where() rather than a multiply: a masked row's value never reaches the sum.
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum()


def uld_per_position(student_top_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``uld_p`` of :func:`uld_loss` from the student's sorted top log-probabilities.

    Args:
        student_top_logprobs: [N, K'] the student's K' = min(K, Vs) largest log-probabilities,
            sorted descending (zero-padded to K in probability when Vs < K).
        teacher_logprobs: [N, K] teacher log-probabilities, any order.

    Returns:
        [N] per-position ULD.
    """
    k = teacher_logprobs.shape[-1]
    t = teacher_logprobs.to(student_top_logprobs.dtype).exp().sort(dim=-1, descending=True).values  # [N, K]
    s = student_top_logprobs.exp()
    if s.shape[-1] < k:
        s = torch.nn.functional.pad(s, (0, k - s.shape[-1]))  # the paper's zero-padding of the shorter vector
    # A student tail that rounds slightly below 0 would be an error of the sum, not mass.
    s_tail = (1.0 - s.sum(dim=-1)).clamp_min(0.0)
    t_tail = (1.0 - t.sum(dim=-1)).clamp_min(0.0)
    return (s - t).abs().sum(dim=-1) + (s_tail - t_tail).abs()  # [N]
