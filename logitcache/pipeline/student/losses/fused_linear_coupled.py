"""CE + MultiLevelOT or ALM from the student's last hidden states and LM head, never holding the [N, V] logits.

These two losses couple rows (MultiLevelOT ranks the student's ids by probabilities summed over
a sequence or the batch, ALM sums label log-probs over chunks of positions), so a block of rows
cannot finish its loss alone as in :mod:`.fused_linear`. But both read each row of logits x [V]
only through a few numbers, its *statistics*:

- ALM: ``logsumexp(x)``, the label's logit and, debiased, ``logsumexp(x[W])`` over the word starts;
- MultiLevelOT "paper": ``logsumexp(x / tau)`` at 1, tau_SL and tau_SD, the label's logit and the
  logits at the k ranked ids; "code": ``logsumexp(x)``, the std of x over the vocabulary,
  ``logsumexp(x / (std + std_eps))``, the label's logit and the ranked logits.

So, exactly (no approximation anywhere):

1. one pass over blocks of rows computes the statistics without gradient (and, for MultiLevelOT,
   the student's probabilities summed per sequence, [B, V]: the ranking); the ranked logits are
   then ``h · W[ranked] + b[ranked]``, k dot products per row, no pass over V;
2. the loss is computed from the statistics [N, m] by autograd, with the very formulas the logits
   path uses (``mlot_parts.student_ranked`` / ``mlot_terms``, ``alm.alm_of_label_logprobs``),
   which gives the loss's gradient w.r.t. every statistic;
3. a second pass recomputes each block's logits and the same statistics function under autograd,
   and backpropagates those gradients (the gathered logits' by a scatter-add, their exact
   gradient): the block's d logits [rows, V], turned at once into its ``dh`` rows and its share
   of ``dW`` / ``db``, then dropped.

The head's matmul runs four times (pass 1; pass 2's forward and its two gradient matmuls), one
more than the plain path. Peak memory beyond the inputs and dh [N, d], dW [V, d]: one block of
logits and the few temporaries of its statistics' autograd (an 80th of the rows per block, see
``BLOCK_SHARE``), [N, m] statistics, MultiLevelOT's [B, V] sums and its Sinkhorn's few [B, T, T]
arrays (as on the logits path).
MultiLevelOT's "assignment" ranking reads every student probability of a sequence (it is not here).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F

from logitcache.pipeline.student.losses.alm import ALMTargets, alm_of_label_logprobs
from logitcache.pipeline.student.losses.chunking import logsumexp_last
from logitcache.pipeline.student.losses.fused import FusedLoss, _work_dtype, check_inputs
from logitcache.pipeline.student.losses.head_grads import BLOCK_ELEMENTS, HeadGrads, PrecomputedHeadGrads
from logitcache.pipeline.student.losses.mlot_parts import (
    checked_config,
    mlot_terms,
    rank_student_ids,
    student_ranked,
    teacher_side,
)

# Rows per block: an 80th of the positions. Pass 2's autograd of the statistics holds about 4 arrays
# of the block's size (the logits, x / tau, the gradient, a temporary; logsumexp_last's lean
# backward; about 6 in pass 1 of MultiLevelOT), so the loss holds 0.06-0.08x the logits whatever N
# (measured: benchmarks/fused_linear.py; 16 rows instead of 51 at N = 4096, V = 32000: 2.4x slower).
# Larger blocks are faster (each streams the whole W twice and dW once): at most BLOCK_ELEMENTS
# logits (12 MiB in fp32, as the row losses' blocks), at least MIN_ROWS rows.
BLOCK_SHARE = 80
MIN_ROWS = 16


class CoupledTeacher(NamedTuple):
    """The teacher's side of :func:`coupled_ce_kd_loss`, as :func:`.fused.ce_kd_loss` takes it.

    ``logprobs``, ``ids``: [B, T, K]; ``kd_mask``: [B, T] bool; ``tempered``: {tau: [B, T, K]};
    ``std_logprobs``: [B, T, K], MultiLevelOT "code"'s targets (as ``multilevel_ot_loss``);
    ``alm``: ALM's chunks.
    """

    logprobs: torch.Tensor
    ids: torch.Tensor
    kd_mask: torch.Tensor
    tempered: Mapping[float, torch.Tensor] | None = None
    std_logprobs: torch.Tensor | None = None
    alm: ALMTargets | tuple[torch.Tensor, torch.Tensor] | None = None


def coupled_ce_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                       spec: FusedLoss, teacher: CoupledTeacher, block_rows: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE + ``spec.weight`` * MultiLevelOT or ALM of ``hidden @ weight.T + bias``, without the [B, T, V] logits.

    :func:`.fused_linear.fused_linear_ce_kd_loss` calls it for ``spec.loss`` "mlot" (with
    ``student_rank`` "sum") and "alm". The logits path it equals: :func:`.fused.ce_kd_loss`
    (MultiLevelOT "paper", ALM), or ``causal_ce`` + :func:`.mlot.multilevel_ot_loss` ("code").

    Args:
        hidden: [B, T, d] the student's last hidden states. weight: [V, d] the head (tied: the
            embedding). bias: [V] or None. labels: [B, T] as :func:`.fused.ce_kd_loss`.
        block_rows: positions per block (default: N / ``BLOCK_SHARE``, at most ``BLOCK_ELEMENTS // V``,
            at least ``MIN_ROWS``).

    Returns:
        (total, ce, kd) as :func:`.fused.ce_kd_loss`; total's gradient goes to hidden, weight and
        bias (computed in the forward; its backward runs once).

    Raises:
        ValueError: what the logits path raises for the same inputs.
    """
    b, t, d = hidden.shape
    targets = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1)  # [B, T]: row q's label
    dtype = _work_dtype(weight)  # the blocks run in the weight's dtype
    if spec.loss == "alm":
        alm = check_inputs(spec, teacher.tempered, teacher.alm)
        stats = _ALMStats(spec, targets, teacher.kd_mask, alm, dtype, weight.device)
    else:
        stats = _MLOTStats(spec, targets, teacher, dtype, weight.shape[0])
    rows = max(1, block_rows or max(MIN_ROWS, min(b * t // BLOCK_SHARE, BLOCK_ELEMENTS // max(weight.shape[0], 1))))
    # As fused_linear: under autocast the blocks run in the inputs' own dtypes.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _CoupledLinear.apply(hidden.reshape(b * t, d), weight, bias, stats, rows)


class _RowStats:
    """What a coupled loss reads of each row of logits x [r, V] (work dtype), and its loss from that.

    ``dense(x)`` [r, m]: the statistics over the whole row (column 0: ``logsumexp(x)``);
    ``index`` [N, g]: the ids whose logits it reads (column 0: the label); ``loss(dense [N, m],
    gathered [N, g])``: (total, ce, kd). ``dense`` is the one function both passes call.
    """

    def __init__(self, spec: FusedLoss, targets: torch.Tensor, kd_mask: torch.Tensor, dtype: torch.dtype) -> None:
        self.spec, self.dtype = spec, dtype
        self.b, self.t = targets.shape
        flat = targets.reshape(-1)
        self.has_target = flat != -100
        self.label = torch.where(self.has_target, flat, torch.zeros_like(flat))[:, None]  # [N, 1]
        self.valid = kd_mask
        # Rows whose statistics the loss reads; the others get zeros (the loss masks them out).
        self.active = self.has_target | kd_mask.reshape(-1)
        self.width = 1  # columns of dense()

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, x: torch.Tensor, dense: torch.Tensor, rows: torch.Tensor) -> None:
        """Pass 1 sees block ``rows`` [r] (logits x, statistics dense): what must see every row first."""

    def gathered(self, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, label: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """After pass 1: (index [N, g], the logits there [N, g]), from the label logits [N, 1]."""
        return self.label, label

    def ce(self, lse: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE over the targets from [N] log-partitions and label logits (0 when none)."""
        rows = torch.where(self.has_target, lse - label, torch.zeros_like(lse))
        return rows.sum() / self.has_target.sum().clamp_min(1)

    def loss(self, dense: torch.Tensor, gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ce = self.ce(dense[:, 0], gathered[:, 0])
        kd = self.kd(dense, gathered)
        return ce + self.spec.weight * kd, ce, kd

    def kd(self, dense: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def seq(self, column: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...]."""
        return column.reshape(self.b, self.t, *column.shape[1:])


class _ALMStats(_RowStats):
    """ALM: ``logsumexp(x)`` (+ ``logsumexp(x[W])`` debiased) and the label's logit."""

    def __init__(self, spec: FusedLoss, targets: torch.Tensor, kd_mask: torch.Tensor, alm: ALMTargets,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(spec, targets, kd_mask, dtype)
        self.alm = alm
        self.ws_ids = None
        if spec.alm.mode == "debias" and alm.debiased:
            self.ws_ids = alm.word_start_mask.to(device).nonzero().squeeze(1)
            self.width = 2
            # The debiasing reads the word-start mass after each chunk, also at rows with no target.
            end = alm.end.to(targets.device).long()
            seq = torch.arange(self.b, device=end.device)[:, None].expand_as(end)
            ends = (seq * self.t + end)[end >= 0]
            self.active = self.active.index_fill(0, ends, True)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        cols = [logsumexp_last(x)]
        if self.ws_ids is not None:
            cols.append(logsumexp_last(x.index_select(1, self.ws_ids)))
        return torch.cat(cols, dim=1)

    def kd(self, dense: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
        lse = dense[:, 0]
        ws = self.seq(dense[:, 1] - lse) if self.ws_ids is not None else None
        return alm_of_label_logprobs(self.seq(gathered[:, 0] - lse), self.seq(self.has_target), self.alm, self.spec.alm,
                                     self.spec.reduction, word_start_logprobs=ws)


class _MLOTStats(_RowStats):
    """MultiLevelOT: log-partitions (and "code"'s std), the label's and the ranked ids' logits."""

    def __init__(self, spec: FusedLoss, targets: torch.Tensor, teacher: CoupledTeacher, dtype: torch.dtype,
                 vocab: int) -> None:
        super().__init__(spec, targets, teacher.kd_mask, dtype)
        t_lp, t_ids, kd_mask = teacher.logprobs, teacher.ids, teacher.kd_mask
        cfg = self.cfg = checked_config(spec.mlot, torch.Size((self.b, self.t, vocab)), t_lp, t_ids, kd_mask)
        side = teacher_side(cfg, t_lp.to(dtype), t_ids, kd_mask, tempered=teacher.tempered,
                            std_logprobs=teacher.std_logprobs)
        self.t_r, self.t_sd = side.r, side.sd
        self.code = cfg.variant == "code"
        # "paper": log-partitions at 1 (CE, the ranking), then tau_SL / tau_SD where they differ.
        self.temps = [1.0] + sorted({cfg.tau_sl, cfg.tau_sd} - {1.0})
        self.width = 3 if self.code else len(self.temps)
        self.rank_sums = torch.zeros(self.b, vocab, dtype=dtype, device=t_lp.device)
        self.row_seq = torch.arange(self.b * self.t, device=t_lp.device) // self.t

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        cols = [logsumexp_last(x)]
        if self.code:  # the code's softmaxes act on x / (std + eps), std unbiased over the vocabulary
            std = x.std(dim=-1, keepdim=True)
            cols += [std, logsumexp_last(x / (std + self.cfg.std_eps))]
        else:
            cols += [logsumexp_last(x / tau) for tau in self.temps[1:]]
        return torch.cat(cols, dim=1)

    def observe(self, x: torch.Tensor, dense: torch.Tensor, rows: torch.Tensor) -> None:
        # The ranking sums softmax(z) over each sequence's valid rows: z = x ("paper", at temperature
        # 1 whatever tau_SL) or x / (std + eps) ("code", whose tau_SL is 1).
        if self.code:
            p = (x / (dense[:, 1:2] + self.cfg.std_eps)).sub_(dense[:, 2:3]).exp_()
        else:
            p = (x - dense[:, :1]).exp_()
        p.mul_(self.valid.reshape(-1)[rows, None])
        self.rank_sums.index_add_(0, self.row_seq[rows], p)

    def gathered(self, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, label: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        ranked = rank_student_ids(self.rank_sums, self.cfg)  # [B, k]
        # The logits at a sequence's k ranked ids: k dot products per row, not another pass over V.
        # Summed in the work dtype and rounded once to the head's, as F.linear rounds its logits.
        h_w, w_r = h.reshape(self.b, self.t, -1).to(self.dtype), w[ranked].to(self.dtype)
        x_r = torch.bmm(h_w, w_r.transpose(1, 2))  # [B, T, k]
        if bias is not None:
            x_r = x_r + bias[ranked].to(self.dtype)[:, None, :]
        x_r = x_r.to(w.dtype)
        # Zero, like the other statistics, where no row is read: a finite value the loss masks out.
        x_r = torch.where(self.active.reshape(self.b, self.t, 1), x_r, torch.zeros_like(x_r))
        index = torch.cat([self.label, ranked.repeat_interleave(self.t, dim=0)], dim=1)
        return index, torch.cat([label, x_r.reshape(self.b * self.t, -1).to(label.dtype)], dim=1)

    def kd(self, dense: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
        cfg, ranked = self.cfg, gathered[:, 1:]
        if self.code:
            ranked = ranked / (dense[:, 1:2] + cfg.std_eps)
            lse = {1.0: self.seq(dense[:, 2])}
        else:
            lse = {tau: self.seq(dense[:, i]) for i, tau in enumerate(self.temps)}
        s_log_r, s_sd = student_ranked(cfg, self.seq(ranked), lse)
        return mlot_terms(cfg, self.t_r, self.t_sd, s_log_r, s_sd, self.valid, reduction=self.spec.reduction)


class _CoupledLinear(PrecomputedHeadGrads):
    """Pass 1 (statistics), the loss on them, pass 2 (gradients); backward: :class:`.head_grads.PrecomputedHeadGrads`'s."""

    @staticmethod
    def forward(ctx, h, w, bias, stats: _RowStats, rows: int):  # noqa: ANN001, ANN205
        h_dtype, h = h.dtype, h.to(w.dtype)
        bias = bias.to(w.dtype) if bias is not None else None
        active = torch.nonzero(stats.active).squeeze(1)
        blocks = [active[a : a + rows] for a in range(0, len(active), rows)]
        dense = torch.zeros(h.shape[0], stats.width, dtype=stats.dtype, device=h.device)
        label = dense.new_zeros(h.shape[0], 1)
        for idx in blocks:
            x = F.linear(h[idx], w, bias).to(stats.dtype)  # [rows, V]
            d_blk = stats.dense(x)
            dense[idx], label[idx] = d_blk, x.gather(1, stats.label[idx])
            stats.observe(x, d_blk, idx)
            del x
        index, gathered = stats.gathered(h, w, bias, label)
        leaves = [dense.requires_grad_(), gathered.requires_grad_()]
        with torch.enable_grad():
            total, ce, kd = stats.loss(*leaves)
            ups = torch.autograd.grad(total, leaves, allow_unused=True)
        up_dense, up_gathered = (u if u is not None else torch.zeros_like(l) for u, l in zip(ups, leaves))

        grads = HeadGrads(h, w, bias)
        for idx in blocks:
            hb = h[idx]
            x = F.linear(hb, w, bias).to(stats.dtype).requires_grad_()
            with torch.enable_grad():
                (g,) = torch.autograd.grad(stats.dense(x), x, up_dense[idx])
            del x
            # The gathered logits' gradient: no autograd needed (nor its [rows, V] buffer of zeros).
            grads.add_block(idx, hb, g.scatter_add_(1, index[idx], up_gathered[idx]).to(h.dtype), w)
        ctx.grads = grads.result(h_dtype)
        total, ce, kd = (v.detach().to(stats.dtype) for v in (total, ce, kd))
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd
