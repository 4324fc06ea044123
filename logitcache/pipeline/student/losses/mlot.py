"""MultiLevelOT: multi-level optimal transport for cross-tokenizer distillation, from a top-K cache.

Cui et al., "Multi-Level Optimal Transport for Universal Cross-Tokenizer Knowledge
Distillation on Language Models" (AAAI 2025, arXiv 2412.14528). Per sequence, the teacher's
and the student's vocabulary dimensions are each ranked by their probability summed over the
sequence and truncated to the top k, so the two vocabularies need no correspondence. Three
terms compare the ranked vectors:

- HAD (holistic absolute difference): sum_i |t_i - s_i| per position, averaged (below);
- SL (sequential logarithmic): -sum_i t_i log s_i per position, averaged (below);
- SD (Sinkhorn distance): entropic OT between the sequence's teacher positions and its
  student positions, cost C[i, j] = ||t_i - s_j||_1, uniform marginals.

``loss_KD = alpha * (HAD + beta * SL + gamma * SD)``; the caller adds the student's own
cross-entropy (the paper's total is CE + loss_KD), this function returns only loss_KD.

Two variants (``MLOTConfig.variant``):

``"paper"`` (default) follows the paper: alpha=0.15, beta=gamma=0.1, tau_SL=1, tau_SD=2,
lambda=0.1, N=20 Sinkhorn iterations, k=50, ranking per sequence.

``"code"`` mirrors the authors' public code (github.com/2018cx/Multi-Level-OT,
``models/distillation_model.py``, ``DistillationLoss`` with its default f=1. Its f=2 matches
student columns to teacher columns greedily; ``student_rank="assignment"`` solves that
matching exactly, as the paper's Q* states it):

- logits divided by their standard deviation over the vocabulary (unbiased, + 1e-4, no
  mean subtraction) before the softmax at temperature tau_SL (the code's student/teacher
  temperature, 1 by default and the only one a cache serves); those probabilities are also
  what it ranks;
- one ranking for the whole batch (``improved_sort`` sums over batch and positions);
- HAD averaged over the positions of each sequence, then over sequences (our default
  ``reduction="sample"``; the code's SL averages over all rows of the padded batch);
- SL with the arguments swapped and a second softmax over the k ranked probabilities:
  ``-sum_i softmax(s)_i * log_softmax(t)_i`` (``KL_wo(teacher, student)``);
- SD on a second softmax at temperature 2 of the ranked probabilities
  (``Sinkhorn_seq``: ``softmax(t / 2)``, ``softmax(s / 2)`` over the k dims), 10
  row/column normalisations, cost ``0.001 * sum_ij P_ij C_ij`` with P's rows and columns
  summing to 1 (not divided by the length);
- alpha = 1.5 (``distil_factor``), beta = gamma = 0.1.

Where we differ from that code, on purpose: positions outside ``mask`` are left out of every
term (the code runs SL and SD over zero-padded rows up to the longer answer); SD is averaged
over sequences (the code sums over the batch, so its SD grows with the batch size: multiply
gamma by the batch size to match it); the Sinkhorn runs in the log domain (same iterates).

HAD and SL are averaged per ``reduction``: "sample" (default; the references: the mean over
each sequence's valid positions, then over sequences) or "token" (over all valid positions).

From a top-K cache (the teacher's full distribution is not stored):

- ranking and the per-position teacher vector use the K cached entries; a ranked id outside a
  position's top-K counts as probability 0 there (its true value is at most the K-th);
- the teacher's probabilities are exact wherever they are known, never renormalised over K:
  at tau = 1 the cached ``exp(logprobs)``; at tau != 1 (tau_SD = 2) the exact tempered values
  ``exp((logprob + lse) / tau - lse_tau)`` from a cache written with ``--temperatures``
  (``tempered``); in ``variant="code"`` the exact ``log_softmax(logits / (std + 1e-4))`` with
  the std over the full vocabulary, from a cache written with ``--logit-stats``
  (``std_logprobs``). So with K = V both variants equal their full-logit formulas, and a
  student equal to the teacher gets HAD = 0 (and, on a one-position sequence, SD = 0).
- ``MLOTConfig(approximate_temperature=True)`` keeps the former approximation where the cache
  lacks a temperature: ``softmax(logprobs / tau)`` over the K entries. It is biased (the
  tail's mass is dropped: 2.4-3.7x the exact SD on LLM-like distributions, and at student =
  teacher the gradient pulls the student away from the teacher).
"""


from __future__ import annotations

from typing import Mapping

import torch

from logitcache.pipeline.student.losses.chunking import Reduction, logsumexp_last
from logitcache.pipeline.student.losses.fused import FusedLoss, ce_kd_loss
from logitcache.pipeline.student.losses.mlot_parts import (
    MLOTConfig,
    checked_config,
    gather_ranked,
    mlot_terms,
    rank_student_ids,
    student_ranked,
    teacher_side,
)

__all__ = ["MLOTConfig", "multilevel_ot_loss"]


def multilevel_ot_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    mask: torch.Tensor,
    config: MLOTConfig | None = None,
    *,
    tempered: Mapping[float, torch.Tensor] | None = None,
    std_logprobs: torch.Tensor | None = None,
    reduction: Reduction = "sample",
    return_parts: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """MultiLevelOT KD term ``alpha * (HAD + beta * SL + gamma * SD)`` (without the CE term).

    Row t of the teacher tensors is aligned to row t of the student by the caller; positions
    where ``mask`` is False are ignored on both sides (in the ranking too).

    Ranking (without gradient): the teacher's dims are ranked by ``exp(logprobs)`` summed over
    the valid positions (scatter-added per id), top k; ties go to the lower id. The student's
    "sum" ranking likewise uses ``softmax(logits)`` (both at temperature 1, whatever tau_SL). A position's
    ranked teacher vector is its probability at those k ids (0 where an id is not in its
    top-K). The student's k ids come from ``config.student_rank``; its ranked vector at
    temperature tau is ``softmax(logits / tau)`` at those ids, in ranked order.

    HAD and SL are averaged over the valid positions as ``reduction`` says. SD, per sequence
    with at least one valid position: ``<P, C> / n`` where P is the plan after N log-domain
    Sinkhorn row/column normalisations of ``exp(-C / lambda)`` to unit row and column sums (so
    ``P / n`` has uniform marginals) and n the number of valid positions; gradients flow
    through P. Then averaged over those sequences. See the module docstring for ``"code"``.

    The paper variant with the "sum" ranking runs the memory-bounded fused pass
    (:func:`.fused.ce_kd_loss` with no CE target); ``return_parts`` and the others run
    plain autograd on [B, T, Vs] tensors.

    Args:
        student_logits: [B, T, Vs] raw student logits.
        teacher_logprobs: [B, T, K] teacher log-probabilities (temperature 1) over the full
            teacher vocabulary (cast to the student's dtype). K must be >= config.k.
        teacher_ids: [B, T, K] long, the teacher token ids of those entries (ignored where
            ``mask`` is False, so padding such as -100 is fine).
        mask: [B, T] bool, True where the aligned position counts.
        config: hyper-parameters; ``MLOTConfig()`` (the paper's) when None.
        tempered: {tau: [B, T, K]} the teacher's exact log-probabilities at tau of the same
            entries, for the variant "paper"'s tau_SD (2) and tau_SL when != 1
            (``targets.tempered_logprobs`` from a cache). Missing: ValueError, unless
            ``config.approximate_temperature``.
        std_logprobs: [B, T, K] for variant "code": the exact ``log_softmax(logits / (std +
            1e-4))`` of the same entries (``targets.std_normalised_logprobs``). Required there.
        reduction: "sample" (default, the references') or "token", for HAD and SL.
        return_parts: return ``{"had", "sl", "sd", "total"}`` (the first three unweighted)
            instead of the scalar total.

    Returns:
        Scalar in the student's dtype (or the dict); exactly 0 with a zero gradient when no
        position is valid.

    Raises:
        ValueError: K < k, Vs < k, bad shapes, a negative teacher id at a valid position, or
            a missing ``tempered`` / ``std_logprobs`` that the variant needs.
        ImportError: ``student_rank="assignment"`` without scipy.
    """
    cfg = checked_config(config, student_logits.shape, teacher_logprobs, teacher_ids, mask)
    if cfg.variant == "paper" and cfg.student_rank == "sum" and not return_parts and not teacher_logprobs.requires_grad:
        # Memory-bounded: the fused pass over chunks of positions, with no CE target.
        no_targets = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
        spec = FusedLoss("mlot", mlot=cfg, reduction=reduction)
        total, _, _ = ce_kd_loss(student_logits, no_targets, teacher_logprobs, teacher_ids, mask, spec, tempered=tempered)
        return total.to(student_logits.dtype)
    valid = mask
    teacher = teacher_side(
        cfg, teacher_logprobs.to(student_logits.dtype), teacher_ids, valid, tempered=tempered, std_logprobs=std_logprobs
    )

    # What the student's softmaxes act on. "code" standardises the spread of the logits.
    if cfg.variant == "code":
        z_s = student_logits / (student_logits.std(dim=-1, keepdim=True) + cfg.std_eps)
        rank_tau = cfg.tau_sl  # the code ranks the very probabilities it compares
    else:
        z_s = student_logits
        rank_tau = 1.0  # the paper ranks the model's own distributions

    # --- student ranking: a discrete choice, no gradient -----------------------------------
    with torch.no_grad():
        # Student probabilities for the ranking, one [B, T, Vs] buffer, dropped after it.
        z_rank = z_s.detach() if rank_tau == 1.0 else z_s.detach() / rank_tau
        p_s = torch.softmax(z_rank, dim=-1).masked_fill_(~valid[..., None], 0.0)
        del z_rank
        if cfg.student_rank == "sum":
            s_ids_ranked = rank_student_ids(p_s.sum(dim=1), cfg)
        else:
            t_cols = gather_ranked(teacher.rank, teacher.ids, teacher.ranked_ids)
            s_ids_ranked = _assign_student_ids(t_cols, p_s, valid, cfg.rank_over == "batch")
        del p_s

    b, t, _ = z_s.shape
    ranked = z_s.gather(2, s_ids_ranked[:, None, :].expand(b, t, s_ids_ranked.shape[1]))  # [B, T, k], has grad
    temps = {cfg.tau_sl} if cfg.variant == "code" else {cfg.tau_sl, cfg.tau_sd}
    # torch's logsumexp, with a backward that holds one [B, T, Vs] buffer per temperature
    lse = {tau: logsumexp_last(z_s if tau == 1.0 else z_s / tau)[..., 0] for tau in temps}
    s_log_r, s_sd = student_ranked(cfg, ranked, lse)
    return mlot_terms(cfg, teacher.r, teacher.sd, s_log_r, s_sd, valid, reduction=reduction, return_parts=return_parts)


def _assign_student_ids(
    t_cols: torch.Tensor, p_s: torch.Tensor, valid: torch.Tensor, over_batch: bool
) -> torch.Tensor:
    """Match the teacher's k ranked columns to k distinct student vocabulary columns.

    Column = the time series of a dim's probability over the valid positions. Cost =
    L1 distance between a teacher column and a student column; solved exactly by
    ``scipy.optimize.linear_sum_assignment`` on the [k, Vs] cost matrix.

    Args:
        t_cols: [B, T, k] ranked teacher probabilities. p_s: [B, T, Vs] student probabilities.
        valid: [B, T] bool. over_batch: one matching for the concatenated valid positions.

    Returns:
        [B, k] long: student id matched to teacher rank i.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:
        raise ImportError(
            "MLOTConfig(student_rank='assignment') needs scipy for its linear assignment: "
            "pip install 'logitcache[mlot]' (scipy), or use student_rank='sum', which needs nothing extra."
        ) from e

    b, _, k = t_cols.shape
    out = torch.empty(b, k, dtype=torch.long)

    def match(tc: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        if tc.shape[0] == 0:  # no valid position: any choice, nothing uses it
            return torch.arange(k)
        cost = torch.cdist(tc.T.double()[None], sc.T.double()[None], p=1)[0]  # [k, Vs]
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        chosen = torch.empty(k, dtype=torch.long)
        chosen[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        return chosen

    if over_batch:
        out[:] = match(t_cols[valid], p_s[valid])
    else:
        for i in range(b):
            out[i] = match(t_cols[i][valid[i]], p_s[i][valid[i]])
    return out.to(t_cols.device)
