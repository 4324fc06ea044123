"""MultiLevelOT: multi-level optimal transport for cross-tokenizer distillation, from a top-K cache.

Cui et al., "Multi-Level Optimal Transport for Universal Cross-Tokenizer Knowledge
Distillation on Language Models" (AAAI 2025, arXiv 2412.14528). Per sequence, the teacher's
and the student's vocabulary dimensions are each ranked by their probability summed over the
sequence and truncated to the top k, so the two vocabularies need no correspondence. Three
terms compare the ranked vectors:

- HAD (holistic absolute difference): sum_i |t_i - s_i| per position, token-averaged;
- SL (sequential logarithmic): -sum_i t_i log s_i per position, token-averaged;
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
  temperature, 1 by default); those probabilities are also what it ranks;
- one ranking for the whole batch (``improved_sort`` sums over batch and positions);
- HAD averaged over the positions of each sequence, then over sequences;
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

Top-K cache approximations (the teacher's full distribution is not stored):

- ranking and the per-position teacher vector use the K cached entries; a ranked id outside a
  position's top-K counts as probability 0 there (its true value is at most the K-th);
- at temperature tau != 1 the teacher is ``softmax(logprobs / tau)`` over its K entries, i.e.
  the tempered full distribution restricted to the top-K and renormalised (the tail's mass is
  dropped). At tau = 1 the cached ``exp(logprobs)`` are used as is, not renormalised;
- ``variant="code"`` divides the teacher's logits by their std over the vocabulary; we only
  know the K top log-probabilities, so we use the std of those K values (a softmax is
  unchanged by the log-partition shift, so only the std is approximate). The top-K spread is
  smaller than the full-vocabulary spread, so the teacher comes out sharper than in the code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from logitcache.pipeline.student.losses.chunking import logsumexp_last

_DEFAULTS = {  # variant -> (alpha, sinkhorn_iters, rank_over)
    "paper": (0.15, 20, "sequence"),
    "code": (1.5, 10, "batch"),
}
_CODE_SD_SCALE = 0.001  # the constant inside the authors' Sinkhorn_seq.forward


@dataclass
class MLOTConfig:
    """Hyper-parameters of :func:`multilevel_ot_loss`. ``None`` means "the variant's default".

    Attributes:
        variant: "paper" (the paper's formulas) or "code" (the authors' public code).
        alpha: weight of the whole KD term (paper 0.15, code 1.5).
        beta: weight of SL. gamma: weight of SD.
        tau_sl: softmax temperature of HAD and SL (paper 1).
        tau_sd: softmax temperature of SD (paper 2; in "code", of the second softmax).
        sinkhorn_lambda: entropic regularisation lambda, kernel exp(-C / lambda).
        sinkhorn_iters: Sinkhorn row+column normalisations (paper 20, code 10).
        k: ranked vocabulary dimensions kept per side; needs a cache with top-K >= k.
        student_rank: "sum" ranks the student's dims by probability summed over the valid
            positions (the authors' code); "assignment" matches each of the teacher's k ranked
            columns to a distinct student column by linear assignment on the L1 distance of
            their time series (the paper's Q*; needs scipy; no gradient through the choice).
        rank_over: rank per "sequence" (paper) or once over the whole "batch" (code).
        std_eps: added to the std in variant "code" (the code's 1e-4).
    """

    variant: Literal["paper", "code"] = "paper"
    alpha: float | None = None
    beta: float = 0.1
    gamma: float = 0.1
    tau_sl: float = 1.0
    tau_sd: float = 2.0
    sinkhorn_lambda: float = 0.1
    sinkhorn_iters: int | None = None
    k: int = 50
    student_rank: Literal["sum", "assignment"] = "sum"
    rank_over: Literal["sequence", "batch"] | None = None
    std_eps: float = 1e-4

    def resolved(self) -> MLOTConfig:
        """A copy with the variant's defaults filled in, validated."""
        if self.variant not in _DEFAULTS:
            raise ValueError(f"MLOTConfig.variant must be 'paper' or 'code', got {self.variant!r}.")
        if self.student_rank not in ("sum", "assignment"):
            raise ValueError(f"MLOTConfig.student_rank must be 'sum' or 'assignment', got {self.student_rank!r}.")
        if self.rank_over not in (None, "sequence", "batch"):
            raise ValueError(f"MLOTConfig.rank_over must be 'sequence' or 'batch', got {self.rank_over!r}.")
        if self.k < 1 or self.tau_sl <= 0 or self.tau_sd <= 0 or self.sinkhorn_lambda <= 0:
            raise ValueError("MLOTConfig: k, tau_sl, tau_sd and sinkhorn_lambda must be positive.")
        alpha, iters, rank_over = _DEFAULTS[self.variant]
        return dataclasses.replace(
            self,
            alpha=alpha if self.alpha is None else self.alpha,
            sinkhorn_iters=iters if self.sinkhorn_iters is None else self.sinkhorn_iters,
            rank_over=rank_over if self.rank_over is None else self.rank_over,
        )


def multilevel_ot_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    mask: torch.Tensor,
    config: MLOTConfig | None = None,
    *,
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

    HAD and SL are token-averaged over the valid positions of the batch. SD, per sequence with
    at least one valid position: ``<P, C> / n`` where P is the plan after N log-domain Sinkhorn
    row/column normalisations of ``exp(-C / lambda)`` to unit row and column sums (so
    ``P / n`` has uniform marginals) and n the number of valid positions; gradients flow
    through P. Then averaged over those sequences. See the module docstring for ``"code"``.

    Args:
        student_logits: [B, T, Vs] raw student logits.
        teacher_logprobs: [B, T, K] teacher log-probabilities over the full teacher vocabulary
            (cast to the student's dtype). K must be >= config.k.
        teacher_ids: [B, T, K] long, the teacher token ids of those entries (ignored where
            ``mask`` is False, so padding such as -100 is fine).
        mask: [B, T] bool, True where the aligned position counts.
        config: hyper-parameters; ``MLOTConfig()`` (the paper's) when None.
        return_parts: return ``{"had", "sl", "sd", "total"}`` (the first three unweighted)
            instead of the scalar total.

    Returns:
        Scalar in the student's dtype (or the dict); exactly 0 with a zero gradient when no
        position is valid.

    Raises:
        ValueError: K < k, Vs < k, bad shapes or a negative teacher id at a valid position.
        ImportError: ``student_rank="assignment"`` without scipy.
    """
    cfg = checked_config(config, student_logits.shape, teacher_logprobs, teacher_ids, mask)
    if cfg.variant == "paper" and cfg.student_rank == "sum" and not return_parts and not teacher_logprobs.requires_grad:
        # Memory-bounded: the fused pass over chunks of positions (losses.fused), with no CE target.
        from logitcache.pipeline.student.losses.fused import FusedLoss, ce_kd_loss

        no_targets = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
        total, _, _ = ce_kd_loss(student_logits, no_targets, teacher_logprobs, teacher_ids, mask, FusedLoss("mlot", mlot=cfg))
        return total.to(student_logits.dtype)
    valid = mask
    teacher = teacher_side(cfg, teacher_logprobs.to(student_logits.dtype), teacher_ids, valid)

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
            t_cols = _gather_ranked(teacher.rank, teacher.ids, teacher.ranked_ids)
            s_ids_ranked = _assign_student_ids(t_cols, p_s, valid, cfg.rank_over == "batch")
        del p_s

    s_log_r = _student_ranked_logprobs(z_s, s_ids_ranked, cfg.tau_sl)  # [B, T, k], has grad
    if cfg.variant == "code":
        s_sd = torch.softmax(s_log_r.exp() / cfg.tau_sd, dim=-1)
    else:
        s_sd = s_log_r.exp() if cfg.tau_sd == cfg.tau_sl else _student_ranked_logprobs(z_s, s_ids_ranked, cfg.tau_sd).exp()
    return mlot_terms(cfg, teacher.r, teacher.sd, s_log_r, s_sd, valid, return_parts=return_parts)


def checked_config(
    config: MLOTConfig | None,
    student_shape: torch.Size,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    mask: torch.Tensor,
) -> MLOTConfig:
    """The resolved config, after checking the shapes of :func:`multilevel_ot_loss`'s inputs against it."""
    cfg = (config or MLOTConfig()).resolved()
    if len(student_shape) != 3 or teacher_logprobs.dim() != 3 or teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            "multilevel_ot_loss expects student_logits [B, T, Vs], teacher_logprobs and teacher_ids "
            f"[B, T, K]; got {tuple(student_shape)}, {tuple(teacher_logprobs.shape)}, "
            f"{tuple(teacher_ids.shape)}."
        )
    b, t, vs = student_shape
    if teacher_logprobs.shape[:2] != (b, t) or mask.shape != (b, t) or mask.dtype != torch.bool:
        raise ValueError(
            f"multilevel_ot_loss: teacher tensors and mask must be [B, T] = [{b}, {t}] in their first "
            f"dims and mask bool; got {tuple(teacher_logprobs.shape)}, mask {mask.dtype} {tuple(mask.shape)}."
        )
    k_cache = teacher_logprobs.shape[-1]
    if k_cache < cfg.k:
        raise ValueError(
            f"The cache keeps the teacher's top-{k_cache} per position, but MultiLevelOT ranks k={cfg.k} "
            f"teacher dims: re-run the teacher with --top-k {cfg.k} or more, or lower MLOTConfig.k "
            f"(--mlot-k) to {k_cache} or less."
        )
    if vs < cfg.k:
        raise ValueError(f"MultiLevelOT: the student vocabulary ({vs}) is smaller than k={cfg.k}; lower MLOTConfig.k.")
    return cfg


def _valid_ids(teacher_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, T, K] teacher ids as long, 0 where ``valid`` is False (padding such as -100 is fine there)."""
    ids = teacher_ids.long()
    if bool((ids[valid] < 0).any()):
        raise ValueError("multilevel_ot_loss: negative teacher id at a position where mask is True.")
    return torch.where(valid[..., None], ids, torch.zeros_like(ids))


class TeacherSide(NamedTuple):
    """The teacher's half of :func:`multilevel_ot_loss` (shapes [B, T, K] / [B, k] / [B, T, k])."""

    ids: torch.Tensor  # cached ids, 0 where the position is not valid
    rank: torch.Tensor  # probabilities the ranking sums, 0 where not valid
    ranked_ids: torch.Tensor  # the k ranked teacher ids per sequence (or batch)
    r: torch.Tensor  # ranked vectors at tau_SL
    sd: torch.Tensor  # ranked vectors the Sinkhorn compares


def teacher_side(cfg: MLOTConfig, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor, valid: torch.Tensor) -> TeacherSide:
    """Ranking and ranked vectors of the teacher, for either variant (no student involved).

    Also used by the trainer's fused CE + KD pass, which supplies the student side itself.
    """
    ids = _valid_ids(teacher_ids, valid)
    vz = valid[..., None]
    zero = torch.zeros((), dtype=teacher_logprobs.dtype, device=teacher_logprobs.device)
    if cfg.variant == "code":
        z_t = teacher_logprobs / (teacher_logprobs.std(dim=-1, keepdim=True) + cfg.std_eps)  # std of the K known values only
        t_sl = torch.softmax(z_t / cfg.tau_sl, dim=-1)
        rank = t_sl  # the code ranks the very probabilities it compares
    else:
        t_sl = _teacher_probs(teacher_logprobs, cfg.tau_sl)
        rank = teacher_logprobs.exp()  # the paper ranks the model's own distributions
    rank = torch.where(vz, rank, zero)
    with torch.no_grad():
        ranked_ids = _teacher_rank_ids(rank, ids, cfg.k, cfg.rank_over == "batch")  # [B, k]
    t_r = _gather_ranked(torch.where(vz, t_sl, zero), ids, ranked_ids)  # [B, T, k]
    if cfg.variant == "code":
        t_sd = torch.softmax(t_r / cfg.tau_sd, dim=-1)
    else:
        t_sd = _gather_ranked(torch.where(vz, _teacher_probs(teacher_logprobs, cfg.tau_sd), zero), ids, ranked_ids)
    return TeacherSide(ids, rank, ranked_ids, t_r, t_sd)


def rank_student_ids(prob_sums: torch.Tensor, cfg: MLOTConfig) -> torch.Tensor:
    """[B, Vs] student probabilities summed over each sequence's valid positions -> [B, k] ranked ids."""
    if cfg.rank_over == "batch":
        prob_sums = prob_sums.sum(dim=0, keepdim=True).expand(prob_sums.shape[0], -1)
    return _top_k_stable(prob_sums, cfg.k)


def mlot_terms(
    cfg: MLOTConfig,
    t_r: torch.Tensor,
    t_sd: torch.Tensor,
    s_log_r: torch.Tensor,
    s_sd: torch.Tensor,
    valid: torch.Tensor,
    *,
    return_parts: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """HAD, SL and SD from the ranked vectors, all [B, T, k]; ``valid`` [B, T] bool.

    ``t_r``/``s_log_r``: teacher probabilities and student log-probabilities at tau_SL;
    ``t_sd``/``s_sd``: the probabilities the Sinkhorn compares. Returns the weighted total (or
    the parts, as :func:`multilevel_ot_loss` documents).
    """
    dtype = s_log_r.dtype
    s_r = s_log_r.exp()
    had_pos = (t_r - s_r).abs().sum(dim=-1)  # [B, T]
    if cfg.variant == "code":
        sl_pos = -(torch.softmax(s_r, dim=-1) * torch.log_softmax(t_r, dim=-1)).sum(dim=-1)
    else:
        sl_pos = -(t_r * s_log_r).sum(dim=-1)

    n_pos = valid.sum(dim=1)  # [B]
    seq_ok = n_pos > 0
    n_ok = seq_ok.sum().clamp_min(1).to(dtype)
    zero = torch.zeros((), dtype=dtype, device=s_log_r.device)
    # Only sequences with a valid position enter the OT (an empty one has no marginal).
    ok_idx = seq_ok.nonzero().squeeze(-1)
    v_ok = valid.index_select(0, ok_idx)
    vz = v_ok[..., None]
    transport = _sinkhorn_transport_cost(
        torch.where(vz, t_sd.index_select(0, ok_idx), zero),
        torch.where(vz, s_sd.index_select(0, ok_idx), zero),
        v_ok,
        cfg.sinkhorn_lambda,
        cfg.sinkhorn_iters,
    )  # [B_ok]
    if cfg.variant == "code":
        sd = (_CODE_SD_SCALE * transport).sum() / n_ok
    else:
        sd = (transport / n_pos.index_select(0, ok_idx).to(dtype)).sum() / n_ok

    had_pos = torch.where(valid, had_pos, zero)
    sl_pos = torch.where(valid, sl_pos, zero)
    n_tok = valid.sum().clamp_min(1).to(dtype)
    if cfg.variant == "code":
        had = (had_pos.sum(dim=1) / n_pos.clamp_min(1).to(dtype)).sum() / n_ok
    else:
        had = had_pos.sum() / n_tok
    sl = sl_pos.sum() / n_tok

    total = cfg.alpha * (had + cfg.beta * sl + cfg.gamma * sd)
    if return_parts:
        return {"had": had, "sl": sl, "sd": sd, "total": total}
    return total


def _teacher_probs(logprobs: torch.Tensor, tau: float) -> torch.Tensor:
    """[..., K] teacher probabilities at temperature tau from top-K log-probabilities.

    tau = 1: the cached values themselves (normalised over the full vocabulary). Otherwise
    the tempered distribution restricted to the top-K and renormalised over it.
    """
    return logprobs.exp() if tau == 1.0 else torch.softmax(logprobs / tau, dim=-1)


def _top_k_stable(sums: torch.Tensor, k: int) -> torch.Tensor:
    """[B, V] -> [B, k] ids of the k largest, ties to the lower id (a stable sort, so reruns agree)."""
    return torch.sort(sums, dim=-1, descending=True, stable=True).indices[:, :k]


def _teacher_rank_ids(probs: torch.Tensor, ids: torch.Tensor, k: int, over_batch: bool) -> torch.Tensor:
    """[B, T, K] sparse teacher probabilities at ``ids`` -> [B, k] ids ranked by summed probability.

    The per-id sums live in a dense [B, max_id + 1] buffer (at least k wide, so ids never seen
    fill the ranking with zero-mass dims, lowest id first).
    """
    b = probs.shape[0]
    size = max(int(ids.max()) + 1 if ids.numel() else 0, k)
    sums = probs.new_zeros(b, size).scatter_add_(1, ids.reshape(b, -1), probs.reshape(b, -1))
    if over_batch:
        sums = sums.sum(dim=0, keepdim=True).expand(b, -1)
    return _top_k_stable(sums, k)


def _gather_ranked(values: torch.Tensor, ids: torch.Tensor, ranked_ids: torch.Tensor) -> torch.Tensor:
    """Sparse [B, T, K] values at ``ids`` -> dense [B, T, k] at ``ranked_ids`` [B, k] (0 where absent).

    A per-sequence lookup table id -> rank slot (slot k = "not ranked", dropped) makes this
    O(B·T·K) instead of comparing every cached id with every ranked id.
    """
    b, t, kc = values.shape
    k = ranked_ids.shape[1]
    size = max(int(ids.max()), int(ranked_ids.max())) + 1
    slot = torch.full((b, size), k, dtype=torch.long, device=ids.device)
    slot.scatter_(1, ranked_ids, torch.arange(k, device=ids.device).expand(b, k))
    where = slot.gather(1, ids.reshape(b, -1)).reshape(b, t, kc)
    return values.new_zeros(b, t, k + 1).scatter_add(2, where, values)[..., :k]


def _student_ranked_logprobs(z: torch.Tensor, ranked_ids: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, T, Vs] logits -> [B, T, k] ``log_softmax(z / tau)`` at ``ranked_ids`` [B, k], in log space."""
    zt = z if tau == 1.0 else z / tau
    lse = logsumexp_last(zt)  # torch's logsumexp, with a backward that holds one [B, T, Vs] buffer
    b, t, _ = z.shape
    return zt.gather(2, ranked_ids[:, None, :].expand(b, t, ranked_ids.shape[1])) - lse


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


def _sinkhorn_transport_cost(t: torch.Tensor, s: torch.Tensor, valid: torch.Tensor, lam: float, iters: int) -> torch.Tensor:
    """Per sequence ``sum_ij P_ij C_ij`` of the Sinkhorn plan between teacher and student positions.

    ``C[i, j] = ||t_i - s_j||_1``. Starting from the kernel ``exp(-C / lam)``, ``iters`` times:
    scale rows to sum 1, then columns to sum 1 (the authors' ``sinkhorn_normalized``). Done on
    log-scalings ``u``, ``v`` with logsumexp so a small lambda cannot underflow the kernel;
    invalid positions get log-marginal -inf, i.e. no mass. No detach: the gradient flows
    through the plan.

    Args:
        t, s: [B, T, k] ranked vectors (zero at invalid positions). valid: [B, T] bool, each
            sequence with at least one True.

    Returns:
        [B] transport cost with unit marginals (total mass = number of valid positions).
    """
    cost = torch.cdist(t, s, p=1)  # [B, T, T]
    log_kernel = -cost / lam
    log_marginal = torch.zeros(valid.shape, dtype=t.dtype, device=t.device).masked_fill(~valid, float("-inf"))
    u = log_marginal
    v = log_marginal  # start: invalid columns already carry no mass
    for _ in range(iters):
        u = log_marginal - torch.logsumexp(log_kernel + v[:, None, :], dim=2)
        v = log_marginal - torch.logsumexp(log_kernel + u[:, :, None], dim=1)
    plan = torch.exp(log_kernel + u[:, :, None] + v[:, None, :])
    return (plan * cost).sum(dim=(1, 2))
