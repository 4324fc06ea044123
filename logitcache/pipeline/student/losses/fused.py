"""The trainer's loss, CE + weight * KD, in two passes over the student logits.

Every loss here sees a row of student logits x [V] only through

- log-partitions ``lse_tau = logsumexp(x / tau)`` at one or two temperatures, and
- the logits at a few ids per row: the label, the teacher's top-K ids (KL), the student's own
  top-K (ULD), MultiLevelOT's ranked ids.

So the gradient is dense only through softmaxes::

    dL/dx_j = sum_tau (dL/dlse_tau) * softmax(x / tau)_j / tau  +  sum_{i: id_i = j} dL/dx_{id_i}

The forward pass makes one chunked, no-grad pass over the logits for the log-partitions and
for what chooses the ids (the student's top-K, MultiLevelOT's ranking sums, KL's exact tail
mass). The loss itself is then an ordinary autograd computation on [N, m] tensors, whose
gradients w.r.t. the gathered logits and the log-partitions are kept. Backward writes the
[N, V] gradient in one more chunked pass. CE shares its log-partition with the KD term, no
[N, V] intermediate exists besides the gradient itself (the chunked losses' bound), and the
loss formulas are the very functions the standalone losses use (``uld_per_position``,
``kl_per_position``, ``mlot_terms``), so the two paths agree to rounding (tested).

What does not fit this shape runs the standalone losses instead (:func:`supports`):
MultiLevelOT's "code" variant (it divides logits by their std over the vocabulary) and its
"assignment" student ranking.

At ``FusedLoss.temperature`` tau != 1 (ULD, KL) the KD term reads ``logsumexp(x / tau)`` and
the gathered logits divided by tau, against the teacher's exact log-probabilities at tau
(``tempered[tau]``), and is multiplied by tau**2; CE stays at temperature 1. The per-position
KD losses are averaged as ``FusedLoss.reduction`` says (:func:`.chunking.kd_weights`); CE is
always the mean over the batch's targets (as llm-recipes' and TRL's CE: the model's own loss).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch

from logitcache.pipeline.student.losses.chunking import Reduction, check_temperature, kd_weights
from logitcache.pipeline.student.losses.kl import KLKind, check_kind, ids_in_vocab, kl_per_position
from logitcache.pipeline.student.losses.mlot_parts import (
    MLOTConfig,
    checked_config,
    mlot_terms,
    rank_student_ids,
    student_ranked,
    teacher_side,
)
from logitcache.pipeline.student.losses.uld import uld_per_position

# the hybrid (GOLD) reads the logits at the mapped student ids and at the student's top ids
# outside them (found in the dense pass); ALM only the "label" block and the log-partition.
from logitcache.pipeline.student.losses.alm import ALMConfig, ALMTargets, alm_of_label_logprobs
from logitcache.pipeline.student.losses.hybrid import HybridConfig, hybrid_per_position

# Rows per chunk of the dense passes: about 4M logits (16 MiB in fp32) whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class FusedLoss:
    """What :func:`ce_kd_loss` computes: CE + ``weight`` * the KD term ``loss`` ("sft": CE only).

    ``temperature``: ULD's and KL's tau (KD term times tau**2); MultiLevelOT takes its
    temperatures from ``mlot`` (tau_sl, tau_sd). ``reduction``: how the KD term averages its
    per-position losses, "sample" (per sequence, then over sequences; the references') or
    "token" (over all positions of the batch).
    """

    loss: Literal["sft", "kl", "uld", "mlot", "hybrid", "alm"]
    weight: float = 1.0
    kl_kind: KLKind = "forward"
    kl_beta: float = 0.5
    mlot: MLOTConfig = field(default_factory=MLOTConfig)
    temperature: float = 1.0
    reduction: Reduction = "sample"
    # "hybrid" reads teacher_ids as the *student* ids of the teacher entries (-1: none) and
    # needs both weights resolved; "alm" reads ce_kd_loss's ``alm`` inputs.
    hybrid: HybridConfig = field(default_factory=lambda: HybridConfig(matched_weight=0.5, unmatched_weight=0.5))
    alm: ALMConfig = field(default_factory=ALMConfig)


def supports(spec: FusedLoss) -> bool:
    """Whether :func:`ce_kd_loss` computes ``spec`` (else use ``causal_ce`` + the standalone loss)."""
    if spec.loss == "hybrid":  # at a temperature the hybrid runs as CE, then the standalone hybrid_loss
        return spec.temperature == 1.0
    if spec.loss != "mlot":
        return True
    cfg = spec.mlot.resolved()
    return cfg.variant == "paper" and cfg.student_rank == "sum"


def ce_kd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    kd_mask: torch.Tensor,
    spec: FusedLoss,
    *,
    tempered: Mapping[float, torch.Tensor] | None = None,
    alm: ALMTargets | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token CE + ``spec.weight`` * KD over a batch, with its gradient, in two passes over the logits.

    Args:
        logits: [B, T, V] student logits (any float dtype; the loss is computed in fp32).
        labels: [B, T] long, the input ids with -100 where no target; logits at q score labels[q + 1].
        teacher_logprobs: [B, T, K] aligned teacher top-K log-probabilities at temperature 1
            (any order for ULD).
        teacher_ids: [B, T, K] long, their teacher token ids (KL and MultiLevelOT).
        kd_mask: [B, T] bool, True where a position has an aligned teacher target.
        spec: which KD term, its weight, temperature and reduction.
        tempered: {tau: [B, T, K]} the teacher's exact log-probabilities at tau of the same
            entries (``targets.tempered_logprobs``), for ``spec.temperature`` != 1 and
            MultiLevelOT's tau_SD / tau_SL.
        alm: for "alm", an :class:`ALMTargets` (or the pair (chunk index [B, T], teacher chunk
            log-likelihoods [B, C]): no debiasing), see ``chunks.alm_chunks``. With debiasing,
            the student's word-start log-partition ``logsumexp(x[W])`` is one more dense term.

    Returns:
        (total, ce, kd): the scalar to backpropagate (fp32; gradient to ``logits`` only), and its
        two parts, detached. ``ce`` is the mean over targets (0 when there is none), ``kd`` the
        KD loss's own mean (0 when no position is masked in, and for "sft").

    Raises:
        ValueError: what the standalone loss would raise (e.g. a teacher id outside the student
            vocabulary for KL, a cache top-K below MultiLevelOT's k, a missing tempered
            teacher), or a spec that :func:`supports` rejects.
    """
    alm = check_inputs(spec, tempered, alm)
    b, t, v = logits.shape
    targets = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1)  # [B, T]: row q's label
    teacher = (teacher_logprobs, dict(tempered or {}), alm)
    total, ce, kd = _CEKD.apply(logits.reshape(b * t, v), spec, (b, t), targets, teacher, teacher_ids, kd_mask)
    return total, ce, kd


def check_inputs(spec: FusedLoss, tempered: Mapping[float, torch.Tensor] | None, alm) -> ALMTargets | None:  # noqa: ANN001
    """Refuse what :func:`ce_kd_loss` cannot compute for ``spec`` (ValueError); ``alm`` as ALMTargets."""
    if not supports(spec):
        raise ValueError(f"ce_kd_loss cannot fuse {spec}; use causal_ce + the standalone loss.")
    if spec.loss == "kl":
        check_kind(spec.kl_kind, spec.kl_beta)
    check_temperature(spec.temperature)
    if spec.temperature != 1.0 and spec.loss in ("uld", "kl") and (tempered is None or spec.temperature not in tempered):
        raise ValueError(
            f"ce_kd_loss at temperature {spec.temperature:g} needs the teacher's exact log-probabilities at "
            f"{spec.temperature:g} (tempered[{spec.temperature:g}]; `logitcache teacher --temperatures {spec.temperature:g}`)."
        )
    if spec.loss == "hybrid":
        spec.hybrid.check()
        if spec.hybrid.matched_weight is None:
            raise ValueError("ce_kd_loss: resolve the hybrid weights first (HybridConfig.weights(vocab_map.matched_fraction)).")
    if spec.loss == "alm":
        spec.alm.check()
        if alm is None:
            raise ValueError("ce_kd_loss: loss 'alm' needs alm=ALMTargets(chunk index [B, T], teacher chunk log-likelihoods [B, C]).")
        if isinstance(alm, tuple):
            alm = ALMTargets(*alm)
        if spec.alm.mode == "debias" and alm.debiased and alm.word_start_mask is None:
            raise ValueError("ce_kd_loss: debiased ALM needs the student's word_start_mask [V].")
    return alm


class _CEKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, bt, targets, teacher, t_ids, kd_mask):  # noqa: ANN001, ANN205 (autograd signature)
        problem = _Problem(x, spec, bt, targets, teacher, t_ids, kd_mask)
        (total, ce, kd), dg, parts = problem.solve()
        ctx.temps, ctx.ws_mask = parts.temps, parts.ws_mask
        ctx.save_for_backward(x, problem.index, dg, *parts.lses, *parts.dlses)
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_ce, _grad_kd):  # noqa: ANN001, ANN205
        x, index, dg, *rest = ctx.saved_tensors
        n_t = len(ctx.temps) + (ctx.ws_mask is not None)
        parts = _Partitions(ctx.temps, rest[:n_t], rest[n_t:], ctx.ws_mask)
        scale = grad_total.to(_work_dtype(x))
        grad = torch.empty_like(x)
        for a, b in _chunks(x):
            # fp32 logits: build the chunk's gradient in place in the output, no copy.
            out = grad[a:b] if x.dtype == _work_dtype(x) else None
            acc = row_gradient(x[a:b], parts.rows(a, b), index[a:b], dg[a:b], scale, out=out)
            if out is None:
                grad[a:b] = acc
        return grad, None, None, None, None, None, None


@dataclass(frozen=True)
class _Partitions:
    """The log-partitions a loss read, per row, with the loss's gradient w.r.t. each.

    ``temps`` starts with 1.0; ``lses`` / ``dlses`` follow it, then the word-start
    log-partition's pair when ``ws_mask`` [V] is set (ALM's debiasing).
    """

    temps: list[float]
    lses: tuple
    dlses: tuple
    ws_mask: torch.Tensor | None = None
    # Set when the logits were overwritten by exp(x - rowmax) (``_Problem(overwrite=True)``):
    # those rows' sums [n], so that softmax(x) is one division away, not a second exp.
    exp_sums: torch.Tensor | None = None

    def rows(self, a: int, b: int) -> "_Partitions":
        sums = self.exp_sums[a:b] if self.exp_sums is not None else None
        return _Partitions(self.temps, tuple(t[a:b] for t in self.lses), tuple(t[a:b] for t in self.dlses), self.ws_mask,
                           sums)


def row_gradient(x: torch.Tensor, parts: _Partitions, index: torch.Tensor, dg: torch.Tensor, scale: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The loss's gradient w.r.t. logit rows x [n, V], from its gradients w.r.t. what it read.

    ``parts``: the rows' log-partitions and their gradients; ``index`` [n, m] / ``dg`` [n, m]:
    the gathered ids and their gradients; ``scale``: the upstream gradient. Written into ``out``
    (which may be ``x`` itself: each entry is read before it is written) or a new [n, V] tensor
    in the work dtype.
    """
    dtype = _work_dtype(x)
    acc = out if out is not None else torch.empty(x.shape, dtype=dtype, device=x.device)
    lses, dlses = parts.lses, parts.dlses
    if parts.ws_mask is not None:  # the word-start log-partition comes last
        lse_ws, dl_ws, lses, dlses = lses[-1], dlses[-1], lses[:-1], dlses[:-1]
        ws = parts.ws_mask.to(device=x.device, dtype=dtype)
    lse1, dl1 = lses[0], dlses[0]  # temperature 1.0 comes first
    if parts.exp_sums is not None and len(parts.temps) == 1 and parts.ws_mask is None:
        # x holds exp(x - rowmax): the gradient's softmax part in one pass.
        torch.mul(x, (dl1 * scale / parts.exp_sums)[:, None], out=acc)
        return acc.scatter_add_(1, index, dg * scale)
    if parts.exp_sums is not None:
        torch.div(x, parts.exp_sums[:, None], out=acc)  # softmax(x)
    else:
        torch.sub(x, lse1[:, None], out=acc).exp_()  # softmax(x)
    other = None
    for tau, lse, dl in zip(parts.temps[1:], lses[1:], dlses[1:]):
        # softmax(x / tau) = softmax(x) ** (1 / tau) * exp(lse_1 / tau - lse_tau): a power, not an exp.
        term = acc.pow(1.0 / tau).mul_(((lse1 / tau - lse).exp() * dl * (scale / tau))[:, None])
        other = term if other is None else other.add_(term)
    if parts.ws_mask is not None:
        # d logsumexp(x[W]) / dx = softmax(x) * exp(lse_1 - lse_W) on W, 0 elsewhere.
        term = torch.mul(acc, ws).mul_(((lse1 - lse_ws).exp() * dl_ws * scale)[:, None])
        other = term if other is None else other.add_(term)
    acc.mul_((dl1 * scale)[:, None])
    if other is not None:
        acc.add_(other)
    return acc.scatter_add_(1, index, dg * scale)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision logits (and fp32), fp64 kept (the tests' references run in fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(x: torch.Tensor) -> list[tuple[int, int]]:
    n, v = x.shape
    step = max(1, CHUNK_ELEMENTS // max(v, 1))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


class _Problem:
    """One batch's loss as a function of a few gathered logits and log-partitions per row.

    ``weights``: (each row's KD weight [N], the number of CE targets) when the rows are a slice
    of a batch (losses.fused_linear): the batch's, not the slice's, averages.

    ``overwrite`` (losses.fused_linear's own block of logits, in the work dtype; CE, the KL
    family and ULD, whose gathered logits are read before it: the known ids', or the student's
    top-K with its values): the dense pass turns ``x`` into
    exp(x - rowmax) in place, which :func:`row_gradient` then reuses. That saves the block a
    second exp and its temporary, so a block of a given memory can hold more rows.
    """

    OVERWRITABLE = ("sft", "kl", "uld")

    def __init__(self, x, spec: FusedLoss, bt, targets, teacher, t_ids, kd_mask, weights=None,  # noqa: ANN001
                 overwrite: bool = False) -> None:
        t_lp, tempered, self.alm_inputs = teacher
        self.x, self.spec, (self.b, self.t) = x, spec, bt
        alm = self.alm_inputs
        debias = spec.loss == "alm" and spec.alm.mode == "debias" and alm is not None and alm.debiased
        self.ws_mask = alm.word_start_mask.to(x.device) if debias else None  # the student's word starts [V]
        n, v = x.shape
        self.dtype = dtype = _work_dtype(x)
        self.kd_mask = kd_mask.reshape(n)
        self.has_target = targets.reshape(n) != -100
        label_ids = torch.where(self.has_target, targets.reshape(n), torch.zeros_like(targets.reshape(n)))
        # Each masked-in position's share of the KD term (kd_weights); 0 elsewhere.
        if weights is None:
            weights = (kd_weights(kd_mask.reshape(self.b, self.t), spec.reduction, dtype).reshape(n), self.has_target.sum())
        self.kd_w, self.ce_count = weights

        self.mlot_cfg = None
        self.tau = 1.0  # ULD's / KL's temperature
        if spec.loss == "mlot":
            self.mlot_cfg = checked_config(spec.mlot, torch.Size((self.b, self.t, v)), t_lp, t_ids, kd_mask)
            temps = [1.0] + sorted({self.mlot_cfg.tau_sl, self.mlot_cfg.tau_sd} - {1.0})
        elif spec.loss in ("uld", "kl"):
            self.tau = spec.temperature
            temps = [1.0] if self.tau == 1.0 else [1.0, self.tau]
        else:
            temps = [1.0]
        kd_lp = t_lp if self.tau == 1.0 else tempered[self.tau]
        self.t_lp = kd_lp.reshape(n, -1).to(dtype)
        self.teacher_ids = None
        if spec.loss == "kl":
            self.teacher_ids = ids_in_vocab(t_ids.reshape(n, -1), self.kd_mask, v)
        self.with_tail = self.teacher_ids is not None and self.teacher_ids.shape[-1] < v
        top_k = min(self.t_lp.shape[-1], v) if spec.loss == "uld" else 0
        # the hybrid's student ids of the teacher entries, and the student's top ids outside them.
        self.hybrid_ids = None
        if spec.loss == "hybrid":  # masked-out rows (padding) read no id at all
            self.hybrid_ids = torch.where(self.kd_mask[:, None], t_ids.reshape(n, -1).long(), -1)
        if self.hybrid_ids is not None and bool(((self.hybrid_ids >= v) & self.kd_mask[:, None]).any()):
            raise ValueError(f"hybrid: a mapped student id is outside the student vocabulary [0, {v}).")

        if overwrite and (spec.loss not in self.OVERWRITABLE or x.dtype != dtype):
            raise ValueError(f"_Problem: overwrite is for {self.OVERWRITABLE} on logits in the work dtype")
        self.overwrite = overwrite
        if overwrite:  # x is about to be overwritten: gather what the loss reads first
            early = [label_ids[:, None]] + ([self.teacher_ids] if self.teacher_ids is not None else [])
            gathered_early = x.gather(1, torch.cat(early, dim=1))
        stats = self._dense_pass(temps, top_k)
        self.exp_sums = stats.get("exp_sums")
        # The ids whose logits the loss reads, one block per role; their gradients scatter back here.
        blocks = {"label": label_ids[:, None]}
        if self.teacher_ids is not None:
            blocks["teacher"] = self.teacher_ids
        if top_k:
            blocks["top"] = stats["top_ids"]
        if self.hybrid_ids is not None:
            blocks["mapped"] = self.hybrid_ids.clamp_min(0)
            blocks["rest"] = stats["rest_ids"]
        if self.mlot_cfg is not None:
            side = teacher_side(self.mlot_cfg, t_lp.to(dtype), t_ids, kd_mask, tempered=tempered)
            self.t_r, self.t_sd = side.r, side.sd
            ranked = rank_student_ids(stats["rank_sums"], self.mlot_cfg)  # [B, k]
            blocks["ranked"] = ranked.repeat_interleave(self.t, dim=0)  # [N, k]
        self.index = torch.cat(list(blocks.values()), dim=1)
        ends = list(itertools.accumulate(blk.shape[1] for blk in blocks.values()))
        self.columns = {name: slice(end - blk.shape[1], end) for (name, blk), end in zip(blocks.items(), ends)}
        if overwrite and top_k:  # the blocks' order: label, then the top-K (ULD has no teacher ids)
            gathered_early = torch.cat([gathered_early, stats["top_vals"]], dim=1)
        self.gathered = (gathered_early if overwrite else x.gather(1, self.index)).to(dtype).requires_grad_()
        self.lse = {tau: stats["lse"][tau].requires_grad_() for tau in temps}  # 1.0 first
        self.lse_ws = stats["lse_ws"].requires_grad_() if self.ws_mask is not None else None
        self.tail = stats.get("tail")

    @torch.no_grad()
    def _dense_pass(self, temps: list[float], top_k: int) -> dict:
        """Log-partitions per temperature, plus the student top-K ids, MLOT ranking sums and KL tails.

        KL's tail is the student's mass outside the teacher ids at KL's temperature.
        """
        x = self.x
        n, v = x.shape
        dtype = self.dtype
        lse = {tau: torch.empty(n, dtype=dtype, device=x.device) for tau in temps}
        out: dict = {"lse": lse}
        if top_k:
            out["top_ids"] = torch.empty(n, top_k, dtype=torch.long, device=x.device)
            if self.overwrite:  # their logits, before x is overwritten
                out["top_vals"] = torch.empty(n, top_k, dtype=x.dtype, device=x.device)
        if self.hybrid_ids is not None:
            out["rest_ids"] = torch.empty(n, min(self.hybrid_ids.shape[1], v), dtype=torch.long, device=x.device)
        if self.with_tail:
            out["tail"] = torch.empty(n, dtype=dtype, device=x.device)
        if self.mlot_cfg is not None:
            out["rank_sums"] = torch.zeros(self.b, v, dtype=dtype, device=x.device)
            seq_of_row = torch.arange(n, device=x.device) // self.t
        if self.ws_mask is not None:
            out["lse_ws"] = torch.empty(n, dtype=dtype, device=x.device)
            ws = self.ws_mask.to(dtype)
        # The ranking, the tail, other temperatures and ALM's word starts need the chunk's exp
        # anyway: the log-partition comes with it.
        needs_exp = (self.with_tail or self.mlot_cfg is not None or len(temps) > 1 or self.ws_mask is not None
                     or self.overwrite)
        if self.overwrite:
            out["exp_sums"] = torch.empty(n, dtype=dtype, device=x.device)
        for a, b in _chunks(x):
            xc = x[a:b].to(dtype)
            if top_k:
                # Dividing by a temperature keeps the order: the top-K ids are those at tau = 1.
                top = torch.topk(xc, top_k, dim=-1, sorted=True)
                out["top_ids"][a:b] = top.indices
                if self.overwrite:
                    out["top_vals"][a:b] = top.values
            if self.hybrid_ids is not None:  # top ids outside the matched entries' (-inf added there)
                ids = self.hybrid_ids[a:b]
                off = torch.where(ids >= 0, float("-inf"), 0.0).to(dtype)
                rest = xc.scatter_add(1, ids.clamp_min(0), off)
                out["rest_ids"][a:b] = torch.topk(rest, out["rest_ids"].shape[1], dim=-1, sorted=True).indices
                del rest
            if not needs_exp:
                lse[1.0][a:b] = torch.logsumexp(xc, dim=-1)
                continue
            m = xc.amax(dim=-1, keepdim=True)
            e = (torch.sub(xc, m, out=xc) if self.overwrite else xc - m).exp_()  # [n, V] in (0, 1]
            z = e.sum(dim=-1, keepdim=True)
            lse[1.0][a:b] = (m + z.log()).squeeze(-1)
            if self.overwrite:
                out["exp_sums"][a:b] = z.squeeze(-1)
            if self.ws_mask is not None:  # the mass on the word starts: one matrix-vector product
                z_ws = torch.mv(e, ws).clamp_min_(torch.finfo(dtype).tiny)
                out["lse_ws"][a:b] = m.squeeze(-1) + z_ws.log_()
            e_kd, z_kd = e, z  # exp((x - m) / tau) and its sum at KL's temperature
            for tau in temps:
                if tau != 1.0:
                    # exp((x - m) / tau) = e ** (1 / tau): a power, not a second exp of the logits.
                    e_tau = e.pow(1.0 / tau)
                    z_tau = e_tau.sum(dim=-1, keepdim=True)
                    lse[tau][a:b] = (m / tau + z_tau.log()).squeeze(-1)
                    if tau == self.tau:
                        e_kd, z_kd = e_tau, z_tau
                    del e_tau
            if self.mlot_cfg is not None:
                # Softmax at temperature 1 summed over each sequence's valid positions (the
                # ranking), as one matrix product: weights [n, B] = mask / z on the row's sequence.
                weights = torch.zeros(b - a, self.b, dtype=dtype, device=x.device)
                weights.scatter_(1, seq_of_row[a:b, None], (self.kd_mask[a:b, None] / z).to(dtype))
                out["rank_sums"].addmm_(weights.T, e)
            elif self.with_tail:
                # The student's mass outside the teacher ids, summed directly: 1 - sum(s_ids)
                # would cancel when the top-K holds nearly everything.
                ids = self.teacher_ids[a:b]
                kept = e_kd.gather(1, ids) if self.overwrite and e_kd is e else None  # e is x: put them back
                out["tail"][a:b] = (e_kd.scatter_(1, ids, 0.0).sum(dim=-1, keepdim=True) / z_kd).squeeze(-1)
                if kept is not None:
                    e_kd.scatter_(1, ids, kept)
        return out

    def solve(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, _Partitions]:
        """(total, ce, kd) detached, the gradient of total w.r.t. the gathered logits [N, m], and
        the log-partitions with the gradient w.r.t. each."""
        with torch.enable_grad():
            total, ce, kd = self.loss()
            leaves = [self.gathered, *self.lse.values()]
            if self.lse_ws is not None:
                leaves.append(self.lse_ws)
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(l) for g, l in zip(grads, leaves)]
        parts = _Partitions(list(self.lse), tuple(l.detach() for l in leaves[1:]), tuple(grads[1:]), self.ws_mask,
                            self.exp_sums)
        return (total.detach(), ce.detach(), kd.detach()), grads[0], parts

    def _block(self, name: str) -> torch.Tensor:
        """The gathered logits of one role ("label", "teacher", "top", "ranked"): [N, width]."""
        return self.gathered[:, self.columns[name]]

    def loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lse1 = self.lse[1.0]
        zero = lse1.new_zeros(())
        ce_rows = torch.where(self.has_target, lse1 - self._block("label")[:, 0], zero)
        ce = ce_rows.sum() / self.ce_count.clamp_min(1)
        kd = self._kd() if self.spec.loss != "sft" else zero
        return ce + self.spec.weight * kd, ce, kd

    def _kd(self) -> torch.Tensor:
        spec, mask = self.spec, self.kd_mask
        if spec.loss == "mlot":
            cfg = self.mlot_cfg
            g = self._block("ranked")
            lse = {tau: part.reshape(self.b, self.t) for tau, part in self.lse.items()}
            s_log_r, s_sd = student_ranked(cfg, g.reshape(self.b, self.t, g.shape[1]), lse)
            return mlot_terms(
                cfg, self.t_r, self.t_sd, s_log_r, s_sd, mask.reshape(self.b, self.t), reduction=spec.reduction
            )
        if spec.loss == "alm":
            return self._alm()
        tau, lse = self.tau, self.lse[self.tau]
        if spec.loss == "hybrid":
            per_position = self._hybrid_rows(lse)
        elif spec.loss == "uld":
            per_position = uld_per_position(self._block("top") / tau - lse[:, None], self.t_lp)
        else:
            s_log = self._block("teacher") / tau - lse[:, None]
            if self.with_tail:
                s_log = torch.cat([s_log, self._log_tail(s_log)[:, None]], dim=1)
            per_position = kl_per_position(s_log, self.t_lp, spec.kl_kind, spec.kl_beta)
        per_position = torch.where(mask, per_position * self.kd_w, torch.zeros_like(per_position))
        kd = per_position.sum()
        return kd * tau**2 if tau != 1.0 else kd

    # --- hybrid (GOLD) and ALM -------------------------------------------------------------
    def _hybrid_rows(self, lse: torch.Tensor) -> torch.Tensor:
        """Per-row hybrid loss from the "mapped" and "rest" blocks (losses/hybrid.py)."""
        matched = self.hybrid_ids >= 0
        s_mapped = self._block("mapped") - lse[:, None]
        rest = self._block("rest") - lse[:, None]
        # Past the student's remaining tokens the top ids are excluded ones: no mass there.
        n_rest = self.x.shape[1] - matched.sum(dim=-1, keepdim=True)
        ranks = torch.arange(rest.shape[1], device=rest.device)
        rest = torch.where(ranks < n_rest, rest, torch.full_like(rest, float("-inf")))
        w_m, w_u = self.spec.hybrid.weights(float("nan"))
        return hybrid_per_position(s_mapped, rest, self.t_lp, matched, self.spec.hybrid.beta, w_m, w_u)

    def _alm(self) -> torch.Tensor:
        """ALM over the batch's chunks from the student's label log-probs (losses/alm.py)."""
        label_lp = (self._block("label")[:, 0] - self.lse[1.0]).reshape(self.b, self.t)
        ws = (self.lse_ws - self.lse[1.0]).reshape(self.b, self.t) if self.lse_ws is not None else None
        return alm_of_label_logprobs(label_lp, self.has_target.reshape(self.b, self.t), self.alm_inputs, self.spec.alm,
                                     self.spec.reduction, word_start_logprobs=ws)
    # --- end of hybrid and ALM ---------------------------------------------------------

    def _log_tail(self, s_log_ids: torch.Tensor) -> torch.Tensor:
        """log of the student's tail mass: the exact value, with the gradient of ``log(1 - sum s_ids)``.

        The two are equal as functions of the logits, so their gradients are too; the exact
        value keeps the small tails that ``1 - sum`` would cancel to noise.
        """
        tail = self.tail.clamp_min(torch.finfo(self.tail.dtype).tiny)
        expr = 1.0 - s_log_ids.exp().sum(dim=-1)
        return tail.log() + (expr - expr.detach()) / tail
