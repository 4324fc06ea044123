"""Top-k of the teacher's next-token distribution, a chunk of positions at a time.

The full logits of a batch are ``[B, T, V]``: for B=8, T=4096 and a 128k vocabulary that
is 16 GiB in fp32. We never build it: the LM head is applied to ``chunk`` positions at a
time, upcast to fp32 there (log-softmax in bf16 loses the tail), reduced to top-k, the
label's log-prob and the log-normaliser, and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TopK:
    """Per position: ``logprobs``/``ids`` [N, k] sorted descending, ``label_logprob``/``logsumexp`` [N]."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    label_logprob: torch.Tensor
    logsumexp: torch.Tensor


def chunked_topk(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    k: int,
    chunk: int = 1024,
) -> TopK:
    """Top-k log-probabilities of ``head(hidden)`` without materialising all logits.

    Args:
        hidden: [N, H] final hidden states of the N positions to score (padding removed).
        head: maps [n, H] hidden states to [n, V] logits (the LM head). It must return a
            new tensor: the logits are overwritten in place to save a second [n, V] buffer.
        labels: [N] the actual next token of each position.
        k: how many entries to keep per position.
        chunk: positions per head call; peak extra memory is about ``chunk * V * 4`` bytes.

    Returns:
        TopK with fp32 log-probabilities normalised over the full vocabulary.
    """
    return chunked_topk_from_logits_fn(lambda a, b: head(hidden[a:b]), hidden.shape[0], labels, k, chunk)


def chunked_topk_from_logits_fn(
    logits_of: Callable[[int, int], torch.Tensor], n: int, labels: torch.Tensor, k: int, chunk: int = 1024
) -> TopK:
    """As :func:`chunked_topk`, with ``logits_of(a, b)`` giving the [b - a, V] logits of positions a..b
    (a new tensor each call, or one in a narrower dtype: it is overwritten in place)."""
    out_lp, out_ids, out_label, out_lse = [], [], [], []
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        logits = logits_of(a, b).float()
        vals, ids = torch.topk(logits, k, dim=-1, sorted=True)
        label = logits.gather(-1, labels[a:b, None].to(logits.device)).squeeze(-1)
        # log-sum-exp in place (the max is the top-1): torch.logsumexp would allocate a
        # second [n, V] buffer, doubling the peak of this step.
        top1 = vals[:, :1]
        lse = logits.sub_(top1).exp_().sum(-1).log_() + top1.squeeze(-1)
        del logits
        out_lp.append(vals - lse[:, None])
        out_ids.append(ids)
        out_label.append(label - lse)
        out_lse.append(lse)
    if not out_lp:
        empty = torch.zeros(0)
        return TopK(empty.reshape(0, k), empty.reshape(0, k).long(), empty, empty)
    return TopK(torch.cat(out_lp), torch.cat(out_ids), torch.cat(out_label), torch.cat(out_lse))
