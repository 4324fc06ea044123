"""Hybrid cross-tokenizer loss: exact divergence on shared tokens, ULD on the rest (TRL's GOLD).

TRL's GOLD trainer (``trl/experimental/gold/gold_trainer.py``, ``ULDLoss`` with
``uld_use_hybrid_loss=True``) splits each aligned position's two distributions by a vocabulary
map (tokens with the same string in both vocabularies, see ``pipeline/student/vocab_map.py``):

* matched tokens: the generalised JSD of GOLD's ``generalized_jsd_loss`` on their
  probabilities, as they are (not renormalised), summed over the matched tokens::

      JSD_beta = beta * KL(t || m) + (1 - beta) * KL(s || m),  m = beta * t + (1 - beta) * s

  GOLD's default beta = 0.5. As GOLD's ``generalized_jsd_loss``, beta = 0 and beta = 1 are
  special cases (the mixture formula would give 0 there): forward KL(t || s) and reverse
  KL(s || t), each summed over the matched tokens.
* unmatched tokens: ULD, the L1 distance between each side's probabilities of its unmatched
  tokens sorted descending, the shorter vector zero-padded.
* total = matched_weight * matched + unmatched_weight * unmatched, averaged over positions.
  GOLD's default weights are adaptive: matched_weight = (teacher ids that map) / (teacher
  vocabulary size), unmatched_weight = 1 - matched_weight (a property of the tokenizer
  pair, not of the position).

From a top-K cache the teacher probabilities of tokens outside its top K are unknown. As in
``uld.py`` they are folded into one tail bucket:

* matched term: over the top-K entries whose token maps (their teacher and student
  probabilities are both known exactly);
* unmatched term: the teacher's remaining vector is its unmatched top-K entries, sorted,
  plus the tail bucket ``t_tail = 1 - sum(top-K)``; the student's is its probabilities of
  every token except the students of the matched top-K entries, sorted: as many as the
  teacher has unmatched entries, then the rest summed into its tail bucket. Matched tokens
  outside the teacher's top K are thus compared on the ULD side, as part of the tails.
  ``sum |s_r - t_r| + |s_tail - t_tail|`` is a lower bound of the full sorted L1, equal to
  it when K covers the teacher vocabulary.

So with K = V (the full teacher distribution) this is exactly GOLD's formula (tested), except
that GOLD clamps probabilities at 1e-8 before taking logs (we use exact log-probabilities) and
skips the unmatched term when one side has no unmatched token at all (ours then compares the
other side's remaining mass with 0).

Other differences from GOLD, outside this function: the vocabulary map compares the bytes
tokens stand for ('Ġ', '▁' and '<0xNN>' normalised, see vocab_map.py) where GOLD compares raw
strings; the adaptive weight divides by the teacher *tokenizer's* size where GOLD takes the
teacher logits' width; positions are the cache's offset-aligned pairs (tokens with the same
character span), where GOLD also merges groups of tokens between common byte boundaries into
one unnormalised distribution (those positions get CE only here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from logitcache.pipeline.student.losses.chunking import (
    DEFAULT_CHUNK_SIZE,
    check_temperature,
    chunked_position_sum,
    logsumexp_last,
    position_weights,
)


@dataclass(frozen=True)
class HybridConfig:
    """GOLD's hybrid hyper-parameters: the JSD's ``beta`` and the two weights (None: adaptive)."""

    beta: float = 0.5  # GOLDConfig.beta
    matched_weight: float | None = None  # GOLDConfig.uld_hybrid_matched_weight
    unmatched_weight: float | None = None  # GOLDConfig.uld_hybrid_unmatched_weight

    def weights(self, matched_fraction: float) -> tuple[float, float]:
        """(matched, unmatched) weights; GOLD's adaptive ones from the share of the teacher vocabulary that maps."""
        if (self.matched_weight is None) != (self.unmatched_weight is None):
            raise ValueError("HybridConfig: give both matched_weight and unmatched_weight, or neither (adaptive).")
        if self.matched_weight is None:
            return matched_fraction, 1.0 - matched_fraction
        return self.matched_weight, self.unmatched_weight

    def check(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"HybridConfig: beta must be in [0, 1], got {self.beta}.")
        for w in (self.matched_weight, self.unmatched_weight):
            if w is not None and (w < 0 or not math.isfinite(w)):
                raise ValueError(f"HybridConfig: weights must be 0 or more, got {w}.")


def hybrid_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    student_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    matched_weight: float = 0.5,
    unmatched_weight: float = 0.5,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> torch.Tensor:
    """GOLD's hybrid loss against a top-K teacher, averaged over the masked-in positions.

    Args:
        student_logits: [N, Vs] raw student logits (temperature 1).
        teacher_logprobs: [N, K] teacher log-probabilities over its full vocabulary.
        student_ids: [N, K] long, the student id of each teacher entry's token (the vocabulary
            map applied to the teacher ids), -1 where it has none. Distinct within a row.
        mask: [N] bool, True where the position counts.
        beta: the matched term's JSD weight (0: forward KL, 1: reverse KL).
        matched_weight, unmatched_weight: the two terms' weights (see :class:`HybridConfig`).
        weights: [N] per-position weights, the loss being ``sum_p weights[p] * loss_p`` over
            masked-in p (``kd_weights``' "sample" reduction); None: the mean over them.
        chunk_size: positions per chunk, or None for one pass (as in ``uld_loss``).
        temperature: tau > 0. The student's probabilities are ``softmax(logits / tau)`` and
            ``teacher_logprobs`` must be the teacher's at tau over its full vocabulary (from a
            cache: ``targets.tempered_logprobs``, so its tail at tau is exact); the loss is
            multiplied by tau**2 (Hinton's scaling, as ``kl_loss`` and ``uld_loss``). GOLD
            itself runs at temperature 1.

    Returns:
        Scalar: mean over masked-in positions of ``matched_weight * JSD + unmatched_weight *
        ULD`` (times tau**2); exactly 0 when no position is masked in.
    """
    if student_logits.dim() != 2 or teacher_logprobs.dim() != 2 or student_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            "hybrid_loss expects student_logits [N, Vs], teacher_logprobs [N, K], student_ids [N, K]; got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_logprobs.shape)}, {tuple(student_ids.shape)}."
        )
    if mask.dim() != 1 or mask.dtype != torch.bool or not (student_logits.shape[0] == teacher_logprobs.shape[0] == mask.shape[0]):
        raise ValueError(f"hybrid_loss: mask must be a bool [N] tensor with N = {student_logits.shape[0]}.")
    ids = torch.where(mask[:, None], student_ids.long(), -1)  # masked-out rows (padding) read no id
    if bool((ids >= student_logits.shape[-1]).any()):
        raise ValueError(f"hybrid_loss: a student id is outside the student vocabulary [0, {student_logits.shape[-1]}).")

    check_temperature(temperature)

    def fn(x: torch.Tensor, m: torch.Tensor, lp: torch.Tensor, i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if temperature != 1.0:
            x = x / temperature
        lse = logsumexp_last(x)
        matched = i >= 0
        s_mapped = x.gather(-1, i.clamp_min(0)) - lse
        # The student's tokens other than the matched teacher entries' (a -inf logit is never on top).
        # (scatter_add, not scatter: the unmatched entries' placeholder id 0 may be a matched id too)
        excluded = torch.zeros_like(x).scatter_add_(-1, i.clamp_min(0), matched.to(x.dtype)) > 0
        rest = torch.topk(x.masked_fill(excluded, float("-inf")), min(lp.shape[-1], x.shape[-1]), dim=-1).values - lse
        per_position = hybrid_per_position(s_mapped, rest, lp, matched, beta, matched_weight, unmatched_weight)
        return torch.where(m, per_position * w, torch.zeros_like(per_position)).sum()

    w = position_weights(mask, weights, student_logits.dtype)
    total = chunked_position_sum(fn, student_logits, mask, teacher_logprobs, ids, w, chunk_size=chunk_size)
    return total * temperature**2 if temperature != 1.0 else total


def hybrid_per_position(
    s_mapped: torch.Tensor,
    s_rest_top: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    matched: torch.Tensor,
    beta: float,
    matched_weight: float,
    unmatched_weight: float,
) -> torch.Tensor:
    """The loss of :func:`hybrid_loss` at each position, from the student's log-probabilities.

    Args:
        s_mapped: [N, K] student log-probs of the teacher entries' student tokens (any finite
            value where ``matched`` is False).
        s_rest_top: [N, K'] the student's largest log-probs outside those tokens, sorted
            descending, K' <= K; -inf where the student has no further token.
        teacher_logprobs: [N, K].
        matched: [N, K] bool, the entry's token maps.

    Returns:
        [N] per-position loss.
    """
    dtype = s_mapped.dtype
    t_lp = teacher_logprobs.to(dtype)
    t = t_lp.exp()
    zero = torch.zeros((), dtype=dtype, device=s_mapped.device)
    s = s_mapped.exp()

    # Matched tokens: GOLD's generalised JSD, in log space (exact where GOLD clamps at 1e-8).
    if beta == 0.0:
        per_token = t * (t_lp - s_mapped)
    elif beta == 1.0:
        per_token = s * (s_mapped - t_lp)
    else:
        m_log = torch.logaddexp(t_lp + math.log(beta), s_mapped + math.log(1.0 - beta))
        per_token = beta * t * (t_lp - m_log) + (1.0 - beta) * s * (s_mapped - m_log)
    jsd = torch.where(matched, per_token, zero).sum(dim=-1)

    # The rest: ULD between the unmatched entries (+ tails). The teacher's unmatched entries
    # sort first once the matched ones are zeroed; the student keeps as many entries as the
    # teacher has unmatched ones (k_u), the rest of its mass goes to its tail.
    k = t.shape[-1]
    t_rest = torch.where(matched, zero, t).sort(dim=-1, descending=True).values  # [N, K]
    k_u = k - matched.sum(dim=-1, keepdim=True)  # [N, 1]
    s_rest = s_rest_top.exp()
    if s_rest.shape[-1] < k:
        s_rest = torch.nn.functional.pad(s_rest, (0, k - s_rest.shape[-1]))  # ULD's zero-padding
    ranks = torch.arange(k, device=s_rest.device)
    s_rest = torch.where(ranks < k_u, s_rest, zero)
    t_tail = (1.0 - t.sum(dim=-1)).clamp_min(0.0)
    s_tail = (1.0 - torch.where(matched, s, zero).sum(dim=-1) - s_rest.sum(dim=-1)).clamp_min(0.0)
    uld = (s_rest - t_rest).abs().sum(dim=-1) + (s_tail - t_tail).abs()
    return matched_weight * jsd + unmatched_weight * uld
