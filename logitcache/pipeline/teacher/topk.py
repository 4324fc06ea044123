"""Top-k of the teacher's next-token distribution, a chunk of positions at a time.

The full logits of a batch are ``[B, T, V]``: for B=8, T=4096 and a 128k vocabulary that
is 16 GiB in fp32. We never build it: the LM head is applied to ``chunk`` positions at a
time, upcast to fp32 there (log-softmax in bf16 loses the tail), reduced to top-k, the
label's log-prob and the log-normaliser, and dropped.

Optionally, from the same chunk (issue 12 §2, §1b): the log-normaliser of the logits at
other temperatures, ``logsumexp(logits / tau)``, which makes every stored top-k entry
exact at tau (``p_tau = exp((logprob + logsumexp) / tau - lse_tau)``); and the logits'
mean and (unbiased) standard deviation over the full vocabulary with the log-normaliser
of the std-normalised logits, ``logsumexp(logits / (std + 1e-4))`` (MultiLevelOT's
``code`` variant); and the log of the probability that the next token starts a word (its
mass on the ids of a ``word_start`` mask: tokens starting with whitespace, and special
tokens), which ALM's chunk debiasing needs from the full vocabulary.

And (issue 15 §3) N draws per position from the teacher's distribution at temperature 1, by
inverse CDF over the same ``exp(logits - max)`` buffer (cumulated in place), each from a uniform
given by the caller: draws.py derives them from a per-sequence key and the
position, so a draw does not depend on the batch or chunk it was made in (a resume redraws the
same ids). See storage/samples.py for why the proposal is the teacher itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# MultiLevelOT's code divides the logits by (std + 1e-4) over the vocabulary.
STD_EPS = 1e-4
# The extra log-normalisers go through a buffer of this many bytes (a block of rows).
_BLOCK_BYTES = 1 << 24


@dataclass
class TopK:
    """Per position: ``logprobs``/``ids`` [N, k] sorted descending, ``label_logprob``/``logsumexp`` [N].

    ``lse_tau`` [N, M]: ``logsumexp(logits / tau)`` for each extra temperature asked for
    (None when none was). ``logit_mean``/``logit_std``/``lse_std`` [N]: asked for with
    ``stats=True`` (else None). ``word_start_logprob`` [N]: with a ``word_start`` mask, the
    log of the mass on its ids (at least log of float32's smallest normal, -87.3).
    """

    logprobs: torch.Tensor
    ids: torch.Tensor
    label_logprob: torch.Tensor
    logsumexp: torch.Tensor
    lse_tau: torch.Tensor | None = None
    logit_mean: torch.Tensor | None = None
    logit_std: torch.Tensor | None = None
    lse_std: torch.Tensor | None = None
    word_start_logprob: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None  # [N, S] int64: S draws per position (with ``uniforms``)


def chunked_topk(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    k: int,
    chunk: int = 1024,
    *,
    temperatures: Sequence[float] = (),
    stats: bool = False,
    word_start: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> TopK:
    """Top-k log-probabilities of ``head(hidden)`` without materialising all logits.

    Args:
        hidden: [N, H] final hidden states of the N positions to score (padding removed).
        head: maps [n, H] hidden states to [n, V] logits (the LM head). It must return a
            new tensor: the logits are overwritten in place to save a second [n, V] buffer.
        labels: [N] the actual next token of each position.
        k: how many entries to keep per position.
        chunk: positions per head call; peak extra memory is about ``chunk * V * 4`` bytes
            (plus 16 MiB with several temperatures or ``stats``).
        temperatures: extra temperatures (each > 0, not 1) whose log-normaliser to return.
        stats: also return the logits' mean, std and the log-normaliser of logits / (std + 1e-4).
        word_start: bool [V] on the logits' device; also return the log-mass on its ids.
        uniforms: [N, S] in [0, 1) (:func:`draw_uniforms`); also return S draws per position from
            the softmax of the logits (inverse CDF: draw j is the first id whose cumulative
            probability exceeds ``uniforms[:, j]``).

    Returns:
        TopK with fp32 log-probabilities normalised over the full vocabulary.
    """
    return chunked_topk_from_logits_fn(
        lambda a, b: head(hidden[a:b]), hidden.shape[0], labels, k, chunk, temperatures=temperatures, stats=stats,
        word_start=word_start, uniforms=uniforms,
    )


def chunked_topk_from_logits_fn(
    logits_of: Callable[[int, int], torch.Tensor],
    n: int,
    labels: torch.Tensor,
    k: int,
    chunk: int = 1024,
    *,
    temperatures: Sequence[float] = (),
    stats: bool = False,
    word_start: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> TopK:
    """As :func:`chunked_topk`, with ``logits_of(a, b)`` giving the [b - a, V] logits of positions a..b
    (a new tensor each call, or one in a narrower dtype: it is overwritten in place)."""
    taus = [float(t) for t in temperatures]
    out: dict[str, list[torch.Tensor]] = {name: [] for name in ("lp", "ids", "label", "lse", "tau", "mean", "std", "lse_std", "ws", "draws")}
    ws = None if word_start is None else word_start.to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        logits = logits_of(a, b).float()
        vals, ids = torch.topk(logits, k, dim=-1, sorted=True)
        label = logits.gather(-1, labels[a:b, None].to(logits.device)).squeeze(-1)
        # log-sum-exp in place (the max is the top-1): torch.logsumexp would allocate a
        # second [n, V] buffer, doubling the peak of this step.
        top1 = logits.amax(-1, keepdim=True) if k == 0 else vals[:, :1]
        d = logits.sub_(top1)
        del logits
        if not taus and not stats:
            lse = d.exp_().sum(-1).log_() + top1.squeeze(-1)
        else:
            lse, lse_tau, mean, std, lse_std = _with_extras(d, top1.squeeze(-1), taus, stats)
            if taus:
                out["tau"].append(lse_tau)
            if stats:
                out["mean"].append(mean)
                out["std"].append(std)
                out["lse_std"].append(lse_std)
        if ws is not None:
            # Both branches leave exp(logits - max) in d: the word-start mass is one
            # matrix-vector product with the mask, no second [n, V] buffer.
            z_ws = torch.mv(d, ws.to(d.device)).clamp_min_(tiny)
            out["ws"].append((z_ws.log_() + top1.squeeze(-1) - lse).clamp_max_(0.0))
        if uniforms is not None:
            # Inverse CDF on exp(logits - max), cumulated in place (no second [n, V] buffer).
            # A token whose exp underflowed (p < e^-103 of the top-1's) adds nothing: never drawn.
            cdf = d.cumsum_(-1)
            target = uniforms[a:b].to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
            out["draws"].append(torch.searchsorted(cdf, target.contiguous(), right=True).clamp_max_(cdf.shape[-1] - 1))
        del d
        out["lp"].append(vals - lse[:, None])
        out["ids"].append(ids)
        out["label"].append(label - lse)
        out["lse"].append(lse)
    if not out["lp"]:
        empty = torch.zeros(0)
        return TopK(
            empty.reshape(0, k), empty.reshape(0, k).long(), empty, empty,
            lse_tau=empty.reshape(0, len(taus)) if taus else None,
            logit_mean=empty if stats else None, logit_std=empty if stats else None, lse_std=empty if stats else None,
            word_start_logprob=empty if ws is not None else None,
            sample_ids=None if uniforms is None else empty.reshape(0, uniforms.shape[1]).long(),
        )
    return TopK(
        torch.cat(out["lp"]), torch.cat(out["ids"]), torch.cat(out["label"]), torch.cat(out["lse"]),
        lse_tau=torch.cat(out["tau"]) if taus else None,
        logit_mean=torch.cat(out["mean"]) if stats else None,
        logit_std=torch.cat(out["std"]) if stats else None,
        lse_std=torch.cat(out["lse_std"]) if stats else None,
        word_start_logprob=torch.cat(out["ws"]) if ws is not None else None,
        sample_ids=torch.cat(out["draws"]) if uniforms is not None else None,
    )


def _with_extras(d: torch.Tensor, top1: torch.Tensor, taus: list[float], stats: bool):
    """From ``d = logits - max`` [n, V] (consumed: exponentiated in place), the log-normaliser
    at temperature 1, at each of ``taus`` [n, M], and with ``stats`` the logits' mean, std and
    ``logsumexp(logits / (std + 1e-4))`` [n].

    Each extra scale s costs one fused pass over a 16 MiB block buffer (``exp(s * d)``,
    summed), before ``d`` is exponentiated in place for temperature 1. Temperature 2 is
    cheaper still: ``exp(d / 2) = sqrt(exp(d))`` from that same pass (a value of exp(d)
    that underflowed, d < -103, stands for an exp(d / 2) below 1e-22: nothing against the
    top-1's 1). The mean and std take a centred second moment (``d - mean(d)``, no
    cancellation), not torch.std_mean's Welford pass, which is several times slower on CPU.
    """
    n, V = d.shape
    mean = std = lse_std = None
    if stats:
        mean_d = d.mean(-1, keepdim=True)
        d.sub_(mean_d)
        var = torch.linalg.vector_norm(d, 2, dim=-1).square_() / max(V - 1, 1)  # unbiased, as torch.std
        d.add_(mean_d)
        mean, std = mean_d.squeeze(-1) + top1, var.sqrt_()
    scales: list[torch.Tensor | float] = [1 / t for t in taus if t != 2.0]  # 2: from exp(d), below
    if stats:
        scales.append(1 / (std + STD_EPS))
    rows = max(1, min(n, _BLOCK_BYTES // max(1, 4 * V)))
    buf = torch.empty((rows, V), dtype=d.dtype, device=d.device) if scales or 2.0 in taus else None
    sums: list[list[torch.Tensor]] = [[] for _ in scales]
    for i in range(0, n, rows):
        blk = d[i : i + rows]
        for j, s in enumerate(scales):
            b = buf[: blk.shape[0]]
            torch.mul(blk, s[i : i + rows, None] if isinstance(s, torch.Tensor) else s, out=b)
            sums[j].append(b.exp_().sum(-1))
    E = d.exp_()
    lse = E.sum(-1).log_() + top1
    partitions = [torch.cat(parts).log_() + s * top1 for s, parts in zip(scales, sums)]
    if 2.0 in taus:
        half = torch.cat([torch.sqrt(E[i : i + rows], out=buf[: len(E[i : i + rows])]).sum(-1) for i in range(0, n, rows)])
        lse_half = half.log_() + top1 / 2
        by_tau = iter(partitions)
        lse_tau = [lse_half if t == 2.0 else next(by_tau) for t in taus]
    else:
        lse_tau = partitions[: len(taus)]
    if stats:
        lse_std = partitions[-1]
    return lse, torch.stack(lse_tau, dim=-1) if taus else None, mean, std, lse_std
