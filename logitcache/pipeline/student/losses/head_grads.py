"""What the two hidden-state losses (:mod:`.fused_linear`, :mod:`.fused_linear_coupled`) share:
the largest block of logits they hold, and a backward that only scales gradients the forward
already computed (dh [N, d], dW [V, d], db [V]), as Liger-Kernel's fused-linear losses do.
"""

from __future__ import annotations

import torch

# Logits per block at most: 3M (12 MiB in fp32). Each block streams the whole W twice and reads and
# writes the whole dW once, so larger blocks are faster; a block costs about 3 (row losses) to 4
# (coupled losses) of its size in resident memory, so this keeps either loss under 0.1x the logits
# at N = 4096 whatever the vocabulary (measured: benchmarks/fused_linear.py).
BLOCK_ELEMENTS = 3 << 20


class HeadGrads:
    """dh [N, d], dW [V, d] and db [V] (None without a bias), summed block by block in the forward."""

    def __init__(self, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.dh, self.dw = torch.zeros_like(h), torch.zeros_like(w)
        self.db = torch.zeros_like(bias) if bias is not None else None

    def add_block(self, idx: torch.Tensor, hb: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> None:
        """Block ``idx`` [r] (hidden rows hb [r, d]) with its logits' gradient g [r, V], in h's dtype."""
        self.dh[idx] = g @ w
        self.dw.addmm_(g.T, hb)
        if self.db is not None:
            self.db += g.sum(0)

    def result(self, h_dtype: torch.dtype) -> tuple:
        """(dh in the hidden states' own dtype, dW, db): what ``ctx.grads`` holds."""
        return self.dh.to(h_dtype), self.dw, self.db


class PrecomputedHeadGrads(torch.autograd.Function):
    """Base of an autograd function whose ``forward`` returns (total, ce, kd) and leaves
    ``ctx.grads = (dh, dW, db)``, total's gradients: backward scales them by the upstream one."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_ce, _grad_kd):  # noqa: ANN001, ANN205
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_linear_ce_kd_loss: its backward runs once (retain_graph is not supported).")
        if not bool(grad_total == 1):
            grads = tuple(g.mul_(grad_total.to(g.dtype)) if g is not None else None for g in grads)
        # autograd drops the Nones past the forward's inputs: one list serves every subclass.
        return (*grads, None, None, None, None, None, None, None)
