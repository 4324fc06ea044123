"""KL / reverse KL / JSD for a student that shares the teacher's vocabulary, from a top-K cache.

Both distributions are coarsened to K+1 buckets: the K token ids the teacher cached at that
position, plus one "tail" bucket holding everything else. The teacher's tail is the mass its
top-K leaves (``1 - sum exp(logprobs)``); the student's tail is the mass of its own
probabilities outside those K ids. With K = V there is no tail bucket and this is the exact
full-vocabulary divergence; with K < V it is the divergence of the coarsened distributions,
which by the data-processing inequality never exceeds the full one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from logitcache.pipeline.student.losses.chunking import (
    DEFAULT_CHUNK_SIZE,
    check_temperature,
    chunked_position_sum,
    logsumexp_last,
    position_weights,
)

# Reverse KL, KL(s || t), is infinite where the teacher puts zero mass and the student does
# not: a teacher tail that rounds to 0 (its top-K sums to 1 in fp16) would make the loss inf.
# The teacher's bucket probabilities are floored at this value inside log(t) for kind="reverse"
# only (forward KL weights log(s) by t, and the JSD mixture is never 0 where s > 0).
REVERSE_KL_TEACHER_FLOOR = 1e-12

KLKind = Literal["forward", "reverse", "jsd"]


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    mask: torch.Tensor,
    kind: KLKind = "forward",
    beta: float = 0.5,
    *,
    temperature: float = 1.0,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Divergence between the teacher's top-K + tail and the student's, mean over masked-in positions.

    Buckets b = 0..K: the K teacher ids, then the tail. ``t_b = exp(teacher_logprobs)``,
    ``t_tail = max(0, 1 - sum_b t_b)``; ``log s_b = log_softmax(student_logits)[teacher_ids]``,
    ``log s_tail = logsumexp(student logits outside teacher_ids) - logsumexp(all)``, computed
    directly over the complement rather than as ``log(1 - sum s_b)``: that difference
    cancels catastrophically when the student puts almost all its mass on the top-K.

    - ``"forward"``: KL(t || s) = sum_b t_b (log t_b - log s_b)  (buckets with t_b = 0 add 0).
    - ``"reverse"``: KL(s || t) = sum_b s_b (log s_b - log t_b), with t_b floored at
      ``REVERSE_KL_TEACHER_FLOOR`` inside the log so a rounded-to-zero teacher tail gives a
      large finite penalty rather than inf.
    - ``"jsd"``: beta * KL(t || m) + (1 - beta) * KL(s || m), m = beta * t + (1 - beta) * s.
      beta = 0.5 is the symmetric Jensen-Shannon divergence; beta must be in (0, 1) (at 0 or
      1 the mixture equals one side and the loss is identically 0).

    At ``temperature`` tau != 1 the student's buckets come from ``softmax(logits / tau)`` and
    ``teacher_logprobs`` must be the teacher's log-probabilities at tau over its full
    vocabulary (from a cache: ``targets.tempered_logprobs``; the teacher's tail at tau is then
    exact). The divergence is multiplied by tau**2 (Hinton et al.'s scaling).

    Args:
        student_logits: [N, V] raw student logits (temperature 1) over the shared vocabulary.
        teacher_logprobs: [N, K] teacher log-probabilities at ``temperature``, normalised over
            the full vocabulary (cast to the student's dtype).
        teacher_ids: [N, K] long, the token ids of those entries, distinct within a row. On
            masked-out rows they are ignored (padding such as -100 is fine).
        mask: [N] bool, True where the position counts. Masked-out rows must hold finite logits.
        kind: "forward", "reverse" or "jsd".
        beta: the JSD mixing weight (only for kind="jsd").
        temperature: tau > 0, see above.
        weights: [N] per-position weights, the loss being ``sum_p weights[p] * divergence_p``
            over masked-in p (see ``kd_weights``). None: the mean over masked-in positions.
        chunk_size: positions per chunk (default 1024), or None for one pass over all N.
            Chunked, forward and backward hold one chunk's intermediates at a time (backward
            recomputes the chunk), so the memory beyond the logits' gradient is bounded by
            ``chunk_size`` rather than N; values and gradients are the same. Chunks with no
            masked-in position are skipped. Only ``student_logits`` gets a gradient on the
            chunked path (if ``teacher_logprobs`` requires grad, the loss runs unchunked).

    Returns:
        Scalar in the student's dtype (tau**2 times the weighted mean); exactly 0 (zero
        gradient) when no position is masked in.

    Raises:
        ValueError: a masked-in teacher id is outside [0, V) (the student does not share the
            teacher's vocabulary), a shape mismatch, or a bad ``kind``/``beta``.
    """
    check_kind(kind, beta)
    if student_logits.dim() != 2 or teacher_logprobs.dim() != 2 or teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            "kl_loss expects student_logits [N, V], teacher_logprobs [N, K], teacher_ids [N, K]; got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_logprobs.shape)}, {tuple(teacher_ids.shape)}."
        )
    if mask.dim() != 1 or mask.dtype != torch.bool or not (student_logits.shape[0] == teacher_logprobs.shape[0] == mask.shape[0]):
        raise ValueError(
            f"kl_loss: mask must be a bool [N] tensor with N = {student_logits.shape[0]}, "
            f"got {mask.dtype} {tuple(mask.shape)}."
        )
    check_temperature(temperature)
    ids = ids_in_vocab(teacher_ids, mask, student_logits.shape[-1])
    w = position_weights(mask, weights, student_logits.dtype)
    total = chunked_position_sum(
        lambda x, m, lp, i, wp: _kl_sum(x, m, lp, i, wp, kind, beta, temperature),
        student_logits, mask, teacher_logprobs, ids, w, chunk_size=chunk_size,
    )
    return total * temperature**2 if temperature != 1.0 else total


def check_kind(kind: str, beta: float) -> None:
    """Raise ValueError unless ``kind``/``beta`` name a divergence :func:`kl_loss` computes."""
    if kind not in ("forward", "reverse", "jsd"):
        raise ValueError(f"kl_loss: kind must be 'forward', 'reverse' or 'jsd', got {kind!r}.")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"kl_loss: beta must be in (0, 1) for kind='jsd', got {beta}; at 0 or 1 the JSD is "
            "identically 0 (use kind='forward' or 'reverse' for a one-sided divergence)."
        )


def ids_in_vocab(teacher_ids: torch.Tensor, mask: torch.Tensor, v: int) -> torch.Tensor:
    """[..., K] teacher ids as long, checked to lie in [0, v) where ``mask`` [...] is True, 0 elsewhere.

    Raises:
        ValueError: a masked-in id is outside the student vocabulary.
    """
    ids = teacher_ids.long()
    live_ids = ids[mask]
    out_of_range = live_ids[(live_ids < 0) | (live_ids >= v)]
    if out_of_range.numel():
        bad = int(out_of_range[0])
        raise ValueError(
            f"kl_loss: teacher id {bad} is outside the student vocabulary [0, {v}). KL/JSD need a "
            "student that shares the teacher's tokenizer; across tokenizers use uld_loss or "
            "multilevel_ot_loss."
        )
    return torch.where(mask[..., None], ids, torch.zeros_like(ids))  # padding ids must not index out of range


def _kl_sum(
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    kind: KLKind,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """The plain formula: the weighted divergence summed over the masked-in rows (``ids`` already in range)."""
    if temperature != 1.0:
        student_logits = student_logits / temperature
    dtype = student_logits.dtype
    s_top_logits = student_logits.gather(-1, ids)  # [N, K]
    if ids.shape[-1] >= student_logits.shape[-1]:
        # The ids cover the whole vocabulary: there is no tail bucket. (The teacher's
        # 1 - sum(t) is rounding noise here, and against a structurally empty student tail
        # it would blow up the forward KL.)
        s_log = s_top_logits - logsumexp_last(student_logits)
    else:
        # Student log-probs of the K+1 buckets from two log-sums: over the teacher ids and
        # over the complement (the ids filled with the dtype's lowest finite value rather than
        # -inf, so a row whose ids repeat stays finite in value and gradient). Their logaddexp
        # is the full log-partition: no third pass over the vocabulary.
        rest = student_logits.scatter(-1, ids, torch.finfo(dtype).min)
        lse_rest = logsumexp_last(rest)  # [N, 1]
        lse = torch.logaddexp(torch.logsumexp(s_top_logits, dim=-1, keepdim=True), lse_rest)
        s_log = torch.cat([s_top_logits - lse, lse_rest - lse], dim=-1)  # [N, K+1]
    per_position = kl_per_position(s_log, teacher_logprobs, kind, beta) * weights
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum()


def kl_per_position(student_bucket_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, kind: KLKind, beta: float) -> torch.Tensor:
    """The divergence of :func:`kl_loss` at each position, from the student's bucket log-probs.

    Args:
        student_bucket_logprobs: [N, K+1] log s_b of the K teacher ids then the tail, or [N, K]
            when the ids cover the whole vocabulary (no tail bucket).
        teacher_logprobs: [N, K].

    Returns:
        [N] per-position divergence.
    """
    s_log = student_bucket_logprobs
    dtype = s_log.dtype
    t_lp = teacher_logprobs.to(dtype)
    t = t_lp.exp()
    if s_log.shape[-1] == t_lp.shape[-1]:
        t_all, t_log = t, t_lp
    else:
        t_tail = (1.0 - t.sum(dim=-1, keepdim=True)).clamp_min(0.0)
        t_all = torch.cat([t, t_tail], dim=-1)  # [N, K+1]
        t_log = torch.cat([t_lp, t_tail.log()], dim=-1)  # -inf where a bucket is empty
    s_all = s_log.exp()

    zero = torch.zeros((), dtype=dtype, device=s_log.device)
    if kind == "forward":
        per_bucket = torch.where(t_all > 0, t_all * (t_log - s_log), zero)
    elif kind == "reverse":
        per_bucket = s_all * (s_log - t_log.clamp_min(math.log(REVERSE_KL_TEACHER_FLOOR)))
    else:
        # log m = logaddexp(log beta + log t, log(1-beta) + log s): finite wherever s > 0.
        m_log = torch.logaddexp(t_log + math.log(beta), s_log + math.log(1.0 - beta))
        kl_t_m = torch.where(t_all > 0, t_all * (t_log - m_log), zero)
        kl_s_m = s_all * (s_log - m_log)
        per_bucket = beta * kl_t_m + (1.0 - beta) * kl_s_m
    return per_bucket.sum(dim=-1)  # [N]
