"""The parts of MultiLevelOT that the standalone loss (:mod:`.mlot`) and the fused pass (:mod:`.fused`) share.

The configuration, the teacher's side (ranking and ranked vectors, from the cache alone) and
the three terms computed from ranked vectors. The formulas are documented in :mod:`.mlot`;
this module sits below both users, so neither imports the other's internals in a circle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Mapping, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from logitcache.pipeline.student.losses.chunking import REDUCTIONS, Reduction

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
        std_eps: added to the std in variant "code" (the code's 1e-4). It must be the one the
            cache's ``lse_std`` was computed with (1e-4).
        approximate_temperature: without the teacher's exact log-probabilities at tau_SD (and
            tau_SL when != 1), use ``softmax(logprobs / tau)`` over the K cached entries instead
            of refusing. Biased: the tail's mass is dropped and the top-K renormalised, which
            on LLM-like distributions makes the tempered teacher much sharper than it is (SD
            2.4-3.7x the exact value at tau 2, with a gradient at student = teacher that points
            away from the teacher). Off by default.
        hinton_scale: multiply the KD term by tau_SL**2 (Hinton et al.'s scaling, as the other
            losses at ``--kd-temperature``; the trainer sets it). No effect at tau_SL = 1.
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
    approximate_temperature: bool = False
    hinton_scale: bool = False

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
        if self.variant == "code" and self.tau_sl != 1.0:
            raise ValueError(
                "MLOTConfig(variant='code') needs tau_sl = 1: the cache stores the std-normalised "
                "logits' log-partition at temperature 1 only."
            )
        alpha, iters, rank_over = _DEFAULTS[self.variant]
        return dataclasses.replace(
            self,
            alpha=alpha if self.alpha is None else self.alpha,
            sinkhorn_iters=iters if self.sinkhorn_iters is None else self.sinkhorn_iters,
            rank_over=rank_over if self.rank_over is None else self.rank_over,
        )


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
            f"teacher dims: re-run the teacher with `logitcache teacher --top-k {cfg.k}` or more, or lower MLOTConfig.k "
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


def teacher_side(
    cfg: MLOTConfig,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    valid: torch.Tensor,
    *,
    tempered: Mapping[float, torch.Tensor] | None = None,
    std_logprobs: torch.Tensor | None = None,
) -> TeacherSide:
    """Ranking and ranked vectors of the teacher, for either variant (no student involved).

    Args:
        cfg: a resolved config.
        teacher_logprobs: [B, T, K] log-probabilities at temperature 1 (the ranking of "paper").
        teacher_ids: [B, T, K]. valid: [B, T] bool.
        tempered: {tau: [B, T, K]} the teacher's exact log-probabilities at tau of the same
            entries ("paper" at tau_SD, and tau_SL when it is not 1).
        std_logprobs: [B, T, K] exact ``log_softmax(logits / (std + std_eps))`` of the same
            entries, std over the full vocabulary ("code").

    Raises:
        ValueError: what the variant needs is missing (and, for a temperature, not
            ``cfg.approximate_temperature``).

    Also used by the trainer's fused CE + KD pass, which supplies the student side itself.
    """
    ids = _valid_ids(teacher_ids, valid)
    vz = valid[..., None]
    dtype = teacher_logprobs.dtype
    zero = torch.zeros((), dtype=dtype, device=teacher_logprobs.device)
    if cfg.variant == "code":
        if std_logprobs is None:
            raise ValueError(
                "MultiLevelOT variant 'code' needs the teacher's std-normalised log-probabilities "
                "(std_logprobs; from a cache written with `logitcache teacher --logit-stats`)."
            )
        if std_logprobs.shape != teacher_logprobs.shape:
            raise ValueError(f"std_logprobs must be [B, T, K] like teacher_logprobs, got {tuple(std_logprobs.shape)}.")
        # Exact at the K entries and not renormalised over them: the mass outside the top-K
        # (large after std-normalisation) stays outside, as on full logits.
        t_sl = std_logprobs.to(dtype).exp()
        rank = t_sl  # the code ranks the very probabilities it compares
    else:
        t_sl = _teacher_probs(cfg, teacher_logprobs, tempered, cfg.tau_sl)
        rank = teacher_logprobs.exp()  # the paper ranks the model's own distributions
    rank = torch.where(vz, rank, zero)
    with torch.no_grad():
        ranked_ids = _teacher_rank_ids(rank, ids, cfg.k, cfg.rank_over == "batch")  # [B, k]
    t_r = gather_ranked(torch.where(vz, t_sl, zero), ids, ranked_ids)  # [B, T, k]
    if cfg.variant == "code":
        t_sd = torch.softmax(t_r / cfg.tau_sd, dim=-1)
    else:
        t_sd_all = _teacher_probs(cfg, teacher_logprobs, tempered, cfg.tau_sd)
        t_sd = gather_ranked(torch.where(vz, t_sd_all, zero), ids, ranked_ids)
    return TeacherSide(ids, rank, ranked_ids, t_r, t_sd)


def needed_temperatures(cfg: MLOTConfig) -> list[float]:
    """The teacher temperatures other than 1 whose exact log-probabilities ``cfg`` reads (sorted)."""
    cfg = cfg.resolved()
    if cfg.variant == "code":
        return []
    return sorted({cfg.tau_sl, cfg.tau_sd} - {1.0})


def rank_student_ids(prob_sums: torch.Tensor, cfg: MLOTConfig) -> torch.Tensor:
    """[B, Vs] student probabilities summed over each sequence's valid positions -> [B, k] ranked ids."""
    if cfg.rank_over == "batch":
        prob_sums = prob_sums.sum(dim=0, keepdim=True).expand(prob_sums.shape[0], -1)
    return _top_k_stable(prob_sums, cfg.k)


def student_ranked(
    cfg: MLOTConfig, ranked: torch.Tensor, lse: Mapping[float, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's ranked vectors from its logits at the ranked ids and its log-partitions.

    Args:
        cfg: a resolved config.
        ranked: [B, T, k] the logits the softmaxes act on (in "code", already divided by their
            std + std_eps), at the ranked ids.
        lse: {tau: [B, T]} ``logsumexp(z / tau)`` of the same logits over the vocabulary, at
            tau_SL (and tau_SD in "paper" when it differs).

    Returns:
        (s_log_r, s_sd) as :func:`mlot_terms` takes them: log-probabilities at tau_SL and the
        vectors the Sinkhorn compares (in "code", a second softmax at tau_SD over the k dims).
    """
    s_log_r = ranked / cfg.tau_sl - lse[cfg.tau_sl][..., None]
    if cfg.variant == "code":
        s_sd = torch.softmax(s_log_r.exp() / cfg.tau_sd, dim=-1)
    elif cfg.tau_sd == cfg.tau_sl:
        s_sd = s_log_r.exp()
    else:
        s_sd = (ranked / cfg.tau_sd - lse[cfg.tau_sd][..., None]).exp()
    return s_log_r, s_sd


def mlot_terms(
    cfg: MLOTConfig,
    t_r: torch.Tensor,
    t_sd: torch.Tensor,
    s_log_r: torch.Tensor,
    s_sd: torch.Tensor,
    valid: torch.Tensor,
    *,
    reduction: Reduction = "sample",
    return_parts: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """HAD, SL and SD from the ranked vectors, all [B, T, k]; ``valid`` [B, T] bool.

    ``t_r``/``s_log_r``: teacher probabilities and student log-probabilities at tau_SL;
    ``t_sd``/``s_sd``: the probabilities the Sinkhorn compares. HAD and SL are averaged per
    ``reduction`` ("sample": over each sequence's valid positions, then over the sequences
    with one; "token": over all valid positions); SD is per sequence, averaged over sequences.
    Returns the weighted total (or the parts, as :func:`multilevel_ot_loss` documents).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'sample' or 'token', got {reduction!r}.")
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
    if reduction == "sample":
        per_seq = n_pos.clamp_min(1).to(dtype)
        had = (had_pos.sum(dim=1) / per_seq).sum() / n_ok
        sl = (sl_pos.sum(dim=1) / per_seq).sum() / n_ok
    else:
        n_tok = valid.sum().clamp_min(1).to(dtype)
        had = had_pos.sum() / n_tok
        sl = sl_pos.sum() / n_tok

    total = cfg.alpha * (had + cfg.beta * sl + cfg.gamma * sd)
    if cfg.hinton_scale and cfg.tau_sl != 1.0:
        total = total * cfg.tau_sl**2
    if return_parts:
        return {"had": had, "sl": sl, "sd": sd, "total": total}
    return total


def _teacher_probs(
    cfg: MLOTConfig, logprobs: torch.Tensor, tempered: Mapping[float, torch.Tensor] | None, tau: float
) -> torch.Tensor:
    """[..., K] teacher probabilities at temperature tau of the K cached entries.

    tau = 1: the cached values themselves. Otherwise the exact tempered values from
    ``tempered`` (normalised over the full vocabulary, so not summing to 1 over K); without
    them, if ``cfg.approximate_temperature``, the tempered distribution restricted to the
    top-K and renormalised over it (biased, see :class:`MLOTConfig`).
    """
    if tau == 1.0:
        return logprobs.exp()
    if tempered is not None and tau in tempered:
        exact = tempered[tau]
        if exact.shape != logprobs.shape:
            raise ValueError(f"tempered[{tau}] must be [B, T, K] like teacher_logprobs, got {tuple(exact.shape)}.")
        return exact.to(logprobs.dtype).exp()
    if cfg.approximate_temperature:
        return torch.softmax(logprobs / tau, dim=-1)
    raise ValueError(
        f"MultiLevelOT at temperature {tau:g} needs the teacher's exact log-probabilities at {tau:g} "
        f"(tempered[{tau:g}]; from a cache written with `logitcache teacher --temperatures {tau:g}`), "
        "or MLOTConfig(approximate_temperature=True) for the biased top-K renormalisation."
    )


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


def gather_ranked(values: torch.Tensor, ids: torch.Tensor, ranked_ids: torch.Tensor) -> torch.Tensor:
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
    # Autograd would keep two [B, T, T] arrays per iteration (20 of them: 0.9x the student's logits
    # at T = 1024, V = 32000); each iteration is recomputed in backward instead, from its [B, T] input.
    recompute = torch.is_grad_enabled() and log_kernel.requires_grad
    for _ in range(iters):
        if recompute:
            u, v = checkpoint(_sinkhorn_step, log_kernel, v, log_marginal, use_reentrant=False)
        else:
            u, v = _sinkhorn_step(log_kernel, v, log_marginal)
    plan = torch.exp(log_kernel + u[:, :, None] + v[:, None, :])
    return (plan * cost).sum(dim=(1, 2))


def _sinkhorn_step(log_kernel: torch.Tensor, v: torch.Tensor, log_marginal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row then column normalisation of the log-domain plan: (u, v), each [B, T]."""
    u = log_marginal - torch.logsumexp(log_kernel + v[:, None, :], dim=2)
    v = log_marginal - torch.logsumexp(log_kernel + u[:, :, None], dim=1)
    return u, v
