"""CE + KD from the student's last hidden states and LM head, never holding the [N, V] logits.

:mod:`.fused` computes the loss from each row of logits only through log-partitions and a few
gathered entries, and for the losses here every row's share is its own (the batch's averages
are fixed weights known beforehand). So the loss can run one block of rows at a time: the
block's logits ``h[a:b] @ W.T + bias``, its loss and its gradient (``fused.row_gradient``),
that gradient turned into the block's ``dh`` rows and its share of ``dW`` / ``db``, and the
block dropped. The gradients are computed in the forward pass, as Liger-Kernel's fused-linear
losses do: the head's matmuls run three times, as in the plain path, not four (a recompute in
backward would add one); backward only scales them by the upstream gradient.

Peak memory beyond the inputs and the gradients every path holds (dh [N, d], dW [V, d]):
one block of logits (``BLOCK_ELEMENTS`` logits, 12 MiB in fp32; at least ``MIN_ROWS`` rows),
which for CE, the KL family and ULD the loss turns into its exp in place and then into its gradient,
so no second block-sized tensor; their fp32 copies for half-precision inputs; BLAS buffers and
[N, K]-sized tensors. Measured: about 3 blocks in all.

Time: the same three matmuls as the plain path, but in blocks of a few dozen rows, each of which
streams the whole W twice and reads and writes the whole dW once. On a CPU that is bandwidth- and
small-matmul-bound (2.2x the plain path's loss step at N=2048, d=1024, V=32000 on 2 shared cores,
benchmarks/peers.py); larger ``block_rows`` trade memory for time. On a GPU (Liger-Kernel's
setting, with the same blocking) the matmuls stay compute-bound.

Losses (:func:`supports`): CE alone ("sft"), the KL family (forward, reverse, JSD, with the
exact tail mass), ULD (its student top-K is per row) and the hybrid, at any temperature
:mod:`.fused` takes, here. MultiLevelOT (both variants) and ALM (plain and debiased) couple rows
(MultiLevelOT ranks the student's ids by softmax sums over a sequence or the batch, ALM sums label
log-probs over chunks of positions), so a block cannot finish its loss alone: they run in
:mod:`.fused_linear_coupled`, two passes over the head around a loss computed from a few
statistics per row, with the same memory bound. Not here, and why:

- MultiLevelOT's "assignment" ranking matches the teacher's ranked columns with every student
  column of a sequence (a [k, V] cost over all its positions' probabilities): not written, it
  runs the plain path (logits, then the standalone loss) in the trainer.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from logitcache.pipeline.student.losses.alm import ALMTargets
from logitcache.pipeline.student.losses import fused_linear_coupled as coupled
from logitcache.pipeline.student.losses.chunking import kd_weights
from logitcache.pipeline.student.losses.fused import (
    FusedLoss,
    _Problem,
    _work_dtype,
    check_inputs,
    row_gradient,
)
from logitcache.pipeline.student.losses.fused import supports as fused_supports
from logitcache.pipeline.student.losses.head_grads import BLOCK_ELEMENTS, HeadGrads, PrecomputedHeadGrads

# Losses whose rows are independent given the batch's weights (see the module docstring).
ROW_LOSSES = ("sft", "kl", "uld", "hybrid")
# Losses that couple rows, computed from per-row statistics in two passes (.fused_linear_coupled).
COUPLED_LOSSES = ("mlot", "alm")
# Blocks of BLOCK_ELEMENTS logits (head_grads.py). Here a block costs about 3 of its size in resident
# memory (the logits, overwritten by their exp and then their gradient, the [rows, d] products, BLAS
# buffers: measured): 0.074x the logits at N = 4096, V = 32000 (under 0.1x from N = 3000 at any
# vocabulary). Never fewer rows than MIN_ROWS, below which the traffic of W and dW dominates.
MIN_ROWS = 32


def supports(spec: FusedLoss) -> bool:
    """Whether :func:`fused_linear_ce_kd_loss` computes ``spec`` (else: logits, then ``ce_kd_loss``)."""
    if spec.loss in COUPLED_LOSSES:  # .fused_linear_coupled
        return spec.loss == "alm" or spec.mlot.resolved().student_rank == "sum"
    return spec.loss in ROW_LOSSES and fused_supports(spec)


def fused_linear_ce_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    kd_mask: torch.Tensor,
    spec: FusedLoss,
    *,
    tempered: Mapping[float, torch.Tensor] | None = None,
    std_logprobs: torch.Tensor | None = None,
    alm: ALMTargets | tuple[torch.Tensor, torch.Tensor] | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ce_kd_loss(hidden @ weight.T + bias, ...)`` without the [B, T, V] logits or their gradient.

    Args:
        hidden: [B, T, d] the student's last hidden states (after its final norm).
        weight: [V, d] the LM head's weight (the embedding itself when tied: its gradient adds up).
        bias: [V] the head's bias, or None.
        labels, teacher_logprobs, teacher_ids, kd_mask, spec, tempered, alm: as :func:`.fused.ce_kd_loss`.
        std_logprobs: [B, T, K] MultiLevelOT "code"'s teacher targets (as ``multilevel_ot_loss``).
        block_rows: positions per block (default: ``BLOCK_ELEMENTS // V``, at least ``MIN_ROWS``;
            MultiLevelOT and ALM: :func:`.fused_linear_coupled.coupled_ce_kd_loss`'s).

    Returns:
        (total, ce, kd) as :func:`.fused.ce_kd_loss`; total's gradient goes to hidden, weight
        and bias. Its backward runs once (the gradients are scaled in place).

    Raises:
        ValueError: what ``ce_kd_loss`` raises, and a spec :func:`supports` rejects.
    """
    if not supports(spec):
        raise ValueError(f"fused_linear_ce_kd_loss computes {', '.join(ROW_LOSSES + COUPLED_LOSSES)} "
                         f"(MultiLevelOT with student_rank 'sum'), not {spec.loss!r} with {spec}; "
                         "compute the logits and use ce_kd_loss or the standalone loss.")
    if spec.loss in COUPLED_LOSSES:
        teacher = coupled.CoupledTeacher(teacher_logprobs, teacher_ids, kd_mask, tempered, std_logprobs, alm)
        return coupled.coupled_ce_kd_loss(hidden, weight, bias, labels, spec, teacher, block_rows)
    check_inputs(spec, tempered, None)
    b, t, d = hidden.shape
    targets = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1)  # [B, T]: row q's label
    rows = max(1, block_rows or max(MIN_ROWS, BLOCK_ELEMENTS // max(weight.shape[0], 1)))
    teacher = (teacher_logprobs, dict(tempered or {}))
    # Under autocast (the Trainer's --bf16) the blocks run in the inputs' own dtypes: the in-place
    # gradient accumulation needs one dtype, and the loss is computed in fp32 either way.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _LinearCEKD.apply(hidden.reshape(b * t, d), weight, bias, spec, (b, t), targets, teacher,
                                 teacher_ids, kd_mask, rows)


class _LinearCEKD(PrecomputedHeadGrads):
    @staticmethod
    def forward(ctx, h, w, bias, spec, bt, targets, teacher, t_ids, kd_mask, rows):  # noqa: ANN001, ANN205
        n, v = h.shape[0], w.shape[0]
        # Autocast's bf16 hidden states against fp32 weights: one dtype for the blocks, the weight's.
        h_dtype, h = h.dtype, h.to(w.dtype)
        bias = bias.to(w.dtype) if bias is not None else None
        dtype = _work_dtype(h)
        t_lp, tempered = teacher
        flat = {"targets": targets.reshape(n), "lp": t_lp.reshape(n, -1), "ids": t_ids.reshape(n, -1),
                "mask": kd_mask.reshape(n), **{tau: lp.reshape(n, -1) for tau, lp in tempered.items()}}
        kd_w = kd_weights(kd_mask, spec.reduction, dtype).reshape(n)
        ce_count = (flat["targets"] != -100).sum()
        # Rows with neither a CE target nor a KD target add nothing: leave them out of the matmuls.
        active = torch.nonzero((flat["targets"] != -100) | flat["mask"]).squeeze(1)
        grads = HeadGrads(h, w, bias)
        sums = torch.zeros(3, dtype=dtype, device=h.device)  # total, ce, kd
        # The block's logits are ours: the loss may turn them into their exp in place (one exp
        # and one block-sized temporary fewer per block; see _Problem).
        overwrite = h.dtype == dtype and spec.loss in _Problem.OVERWRITABLE
        for a in range(0, len(active), rows):
            idx = active[a : a + rows]
            hb = h[idx]
            x = F.linear(hb, w, bias)  # [rows, V] in the model's dtype, as its head computes them
            pick = {key: val[idx] for key, val in flat.items()}
            block = (pick["lp"], {tau: pick[tau] for tau in tempered}, None)
            problem = _Problem(x, spec, (1, len(idx)), pick["targets"], block, pick["ids"], pick["mask"],
                               weights=(kd_w[idx], ce_count), overwrite=overwrite)
            values, dg, partitions = problem.solve()
            sums += torch.stack(values)
            index = problem.index
            del problem  # its fp32 copy of half-precision logits
            # fp32 logits: the gradient overwrites them in place.
            g = row_gradient(x, partitions, index, dg, sums.new_ones(()), out=x if x.dtype == dtype else None)
            grads.add_block(idx, hb, g.to(h.dtype), w)
        ctx.grads = grads.result(h_dtype)
        total, ce, kd = sums.unbind()
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd
