"""Shared by the losses: a per-position loss summed over chunks of positions, a lean logsumexp,
and the per-position weights of the two reductions (:func:`kd_weights`).

:func:`chunked_position_sum` runs the plain formula once per chunk (as torchtune's chunked
losses do) and recomputes each chunk in backward, so no full-size intermediate of the
[N, V] logits (softmax, log-softmax) exists at once; the caller normalises once at the end.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

DEFAULT_CHUNK_SIZE = 1024

Reduction = Literal["sample", "token"]
REDUCTIONS = ("sample", "token")

# fn(logits_chunk [n, V], *row_chunks) -> scalar: the loss summed over the chunk's masked-in rows.
PositionSum = Callable[..., torch.Tensor]


class _ChunkedPositionSum(torch.autograd.Function):
    """``sum_c fn(logits[c], *rows[c])`` over chunks c of positions, with no full-size intermediate.

    Forward runs ``fn`` per chunk under no_grad and keeps only the running sum. Backward
    recomputes each chunk with grad enabled, takes ``torch.autograd.grad`` of that chunk's sum
    w.r.t. that chunk of logits and writes it into the [N, V] gradient: the only full-size
    tensor is the gradient itself, which every loss must produce. The extra memory is that of
    ``fn`` on one chunk, forward or backward. Gradient flows to the logits only.
    """

    @staticmethod
    def forward(ctx, logits, fn, chunk_size, mask, *rows):  # noqa: ANN001, ANN205 (autograd signature)
        ctx.fn, ctx.chunk_size = fn, chunk_size
        ctx.save_for_backward(logits, mask, *rows)
        total = torch.zeros((), dtype=logits.dtype, device=logits.device)
        for a, b in _live_chunks(mask, chunk_size):
            total += fn(logits[a:b], mask[a:b], *(r[a:b] for r in rows))
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        logits, mask, *rows = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # chunks with no masked-in row keep their exact 0
        for a, b in _live_chunks(mask, ctx.chunk_size):
            with torch.enable_grad():
                x = logits[a:b].detach().requires_grad_()
                (g,) = torch.autograd.grad(ctx.fn(x, mask[a:b], *(r[a:b] for r in rows)), x, grad_output)
            grad[a:b] = g
            del g, x
        return (grad, None, None, None, *(None for _ in rows))


class _LogSumExp(torch.autograd.Function):
    """``logsumexp(x, dim=-1, keepdim=True)`` whose backward allocates only the gradient itself.

    The gradient is ``grad * exp(x - lse)``, as torch's own, but computed in place in one
    [n, V] buffer instead of three, which is most of what a chunk's backward holds.
    """

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205 (autograd signature)
        out = torch.logsumexp(x, dim=-1, keepdim=True)
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, out = ctx.saved_tensors
        return (x - out).exp_().mul_(grad)


def logsumexp_last(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [..., 1] log-sum-exp over the last dimension, with a lean backward."""
    return _LogSumExp.apply(x)


def _live_chunks(mask: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk of ``chunk_size`` positions holding at least one masked-in row."""
    n = mask.shape[0]
    starts = range(0, n, chunk_size)
    if not starts:
        return []
    live = torch.zeros(len(starts), dtype=torch.bool, device=mask.device)
    live.scatter_reduce_(0, torch.arange(n, device=mask.device) // chunk_size, mask, reduce="amax")
    return [(a, min(a + chunk_size, n)) for a, keep in zip(starts, live.tolist()) if keep]


def chunked_position_sum(
    fn: PositionSum,
    logits: torch.Tensor,
    mask: torch.Tensor,
    *rows: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """``fn(logits, mask, *rows)`` (a sum over positions), computed ``chunk_size`` positions at a time.

    ``fn`` is the plain, unchunked formula; it is reused per chunk (as torchtune's chunked KD
    loss reuses its plain one) and the caller normalises once at the end. With ``chunk_size``
    None, or when a row tensor other than the logits needs a gradient (the chunked backward
    gives one to the logits only), ``fn`` runs once on the whole batch.

    Args:
        fn: ``fn(logits [n, V], mask [n], *rows [n, ...]) -> scalar``, additive over positions.
        logits: [N, V]. mask: [N] bool. rows: tensors with N in their first dimension.
        chunk_size: positions per chunk (>= 1), or None for no chunking.
    """
    if chunk_size is None or any(r.requires_grad for r in rows):
        return fn(logits, mask, *rows)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions or None, got {chunk_size}.")
    return _ChunkedPositionSum.apply(logits, fn, chunk_size, mask, *rows)


def kd_weights(mask: torch.Tensor, reduction: Reduction, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[B, T] bool -> [B, T] weights w with ``KD = sum_p w_p * loss_p``: how per-position losses are averaged.

    - ``"sample"`` (llm-recipes, Multi-Level-OT, TRL's GOLD): the mean over each sequence's
      masked-in positions, then the mean over the sequences that have at least one;
      ``w = 1 / (n_b * S)`` with n_b the sequence's count and S the number of such sequences.
    - ``"token"``: the mean over all masked-in positions of the batch, ``w = 1 / sum_b n_b``.

    A sequence with no masked-in position is left out of the sample mean (TRL counts it as a
    0 in the mean; llm-recipes' would be NaN). Masked-out positions get 0; with none masked in
    every weight is 0, so the loss is exactly 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'sample' or 'token', got {reduction!r}.")
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"kd_weights: mask must be a bool [B, T] tensor, got {mask.dtype} {tuple(mask.shape)}.")
    m = mask.to(dtype)
    if reduction == "token":
        return m / m.sum().clamp_min(1)
    n = m.sum(dim=1, keepdim=True)  # [B, 1]
    sequences = (n > 0).sum().clamp_min(1)
    return m / (n.clamp_min(1) * sequences)


def check_temperature(temperature: float) -> None:
    """Raise ValueError unless ``temperature`` is a positive finite number."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}.")


def position_weights(mask: torch.Tensor, weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[N] weights of the masked-in positions: ``weights`` (checked), or 1 / count (the token mean)."""
    if weights is None:
        # 1 / max(count, 1) makes the all-masked case an exact 0 whose gradient is 0.
        return mask.to(dtype) / mask.sum().clamp_min(1).to(dtype)
    if weights.shape != mask.shape:
        raise ValueError(f"weights must have the mask's shape {tuple(mask.shape)}, got {tuple(weights.shape)}.")
    return weights.detach().to(dtype)
