"""ALM, approximate likelihood matching of chunks (Minixhofer, Vulić, Ponti, NeurIPS 2025).

"Universal Cross-Tokenizer Distillation via Approximate Likelihood Matching", arXiv
2503.20083; reference code github.com/bminixhofer/tokenkit (``tokenkit/training/losses.py``,
``compute_alm_loss``; the PyTorch walk-through ``docs/pytorch_alm_from_scratch.ipynb``).

The text is cut into chunks that both tokenizations bound (``pipeline/student/chunks.py``).
Per chunk c, each model's log-likelihood of the chunk is the sum of its log-probabilities of
its own tokens in the chunk: the teacher's from the cache's ``label_logprob`` (summed in the
featurizer), the student's from its logits, ``log_softmax(x_q)[label_{q+1}]``. With the
paper's binarisation at temperature tau, y = exp(ll_T / tau - eps) and
y_hat = exp(ll_S / tau - eps) are the "success" probabilities of two Bernoulli variables,
and the loss is an f-divergence between them, averaged over the batch's chunks::

    binary_kl:  D(c) = y (log y - log y_hat) + (1 - y) (log(1 - y) - log(1 - y_hat))
    binary_ce:  D(c) = -(y log y_hat + (1 - y) log(1 - y_hat))
    ALM = sum_c D(c) / #chunks

Defaults are tokenkit's: tau = 100 (``binarization_temp``), eps = 1e-6 (``compute_alm_loss``'s
epsilon, which keeps y below 1), the chunk log-likelihoods clipped at 0, the mean over the
chunks of the whole batch (``distill_main_path_numerator`` / ``_denominator`` =
"chunk_count"), and the shortest chunks (``distill_chunk_sizes = [1]``). tokenkit's default
distance is ``binary_ce``; ours is ``binary_kl``, which differs from it by the teacher's binary
entropy (a constant of the data), so both give the same gradients, and ``binary_kl`` is 0
when the student matches the teacher.

Scale: at tau = 100 the loss and its gradient are small; beside CE (``logitcache train`` adds
it) the gradient w.r.t. the logits is about 1e-3 of CE's for chunk log-likelihoods that differ
by 0.5-2 nats. tokenkit trains with ALM alone (pure distillation) under Adam, where the scale
cancels; with CE, a KD weight of the order of tau or more is needed for ALM to matter.

Not implemented: the paper's outcome-chunk debiasing (tokenkit's ``alm_mode``
"append_space" and "merge_by_space_prob"). It multiplies each chunk's likelihood by the
model's probability that the *next* token starts with whitespace (or is special), which for
the teacher needs its mass on all such tokens of its full vocabulary at the chunk's end: a
top-k cache gives only a lower bound of it. (A stage-1 column holding that log-mass per
position would make it exact.) This is tokenkit's "unconstrained" chunking with its default
distance, without debiasing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ALMDivergence = Literal["binary_kl", "binary_ce"]


@dataclass(frozen=True)
class ALMConfig:
    """ALM's hyper-parameters (tokenkit's defaults)."""

    temperature: float = 100.0  # binarization_temp
    epsilon: float = 1e-6
    divergence: ALMDivergence = "binary_kl"

    def check(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"ALMConfig: temperature must be positive, got {self.temperature}.")
        if self.divergence not in ("binary_kl", "binary_ce"):
            raise ValueError(f"ALMConfig: divergence must be 'binary_kl' or 'binary_ce', got {self.divergence!r}.")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of log(1/2) (as tokenkit's)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binarised_divergence(teacher_ll: torch.Tensor, student_ll: torch.Tensor, cfg: ALMConfig = ALMConfig()) -> torch.Tensor:
    """D(c) per chunk from the two chunk log-likelihoods (same shape, any)."""
    log_y = teacher_ll.clamp(max=0.0) / cfg.temperature - cfg.epsilon
    log_y_hat = student_ll.clamp(max=0.0) / cfg.temperature - cfg.epsilon
    y = log_y.exp()
    if cfg.divergence == "binary_ce":
        return -(y * log_y_hat + (1.0 - y) * log1mexp(log_y_hat))
    return y * (log_y - log_y_hat) + (1.0 - y) * (log1mexp(log_y) - log1mexp(log_y_hat))


def chunk_sums(student_label_logprobs: torch.Tensor, chunk_index: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence and chunk: the student's summed label log-probs and its number of tokens.

    Args:
        student_label_logprobs: [B, T] log p_S of the token each position predicts (any finite
            value where ``chunk_index`` is -1).
        chunk_index: [B, T] long, the chunk of that token, -1 for none.
        n_chunks: C, the chunk dimension of the result.

    Returns:
        ([B, C] sums, [B, C] counts).
    """
    inside = chunk_index >= 0
    idx = chunk_index.clamp_min(0)
    vals = torch.where(inside, student_label_logprobs, torch.zeros_like(student_label_logprobs))
    b = student_label_logprobs.shape[0]
    sums = vals.new_zeros(b, n_chunks).scatter_add(1, idx, vals)
    counts = torch.zeros(b, n_chunks, dtype=torch.long, device=idx.device).scatter_add(1, idx, inside.long())
    return sums, counts


def alm_per_chunk_mean(student_label_logprobs: torch.Tensor, chunk_index: torch.Tensor, teacher_chunk_ll: torch.Tensor,
                       cfg: ALMConfig = ALMConfig(), reduction: str = "token") -> torch.Tensor:
    """ALM from the student's label log-probs [B, T], chunk indices [B, T] and teacher chunk lls [B, C].

    Chunks with no student token (padding of the collated [B, C]) do not count. ``reduction``:
    "token", the mean of D over the batch's chunks (tokenkit's); "sample", the mean over each
    sequence's chunks, then over the sequences that have one. Exactly 0 when no chunk counts.
    """
    s_ll, counts = chunk_sums(student_label_logprobs, chunk_index, teacher_chunk_ll.shape[1])
    valid = counts > 0
    d = binarised_divergence(teacher_chunk_ll.to(s_ll.dtype), s_ll, cfg)
    d = torch.where(valid, d, torch.zeros_like(d))
    if reduction == "sample":
        per_seq = valid.sum(dim=1)
        seq_mean = d.sum(dim=1) / per_seq.clamp_min(1).to(d.dtype)
        return seq_mean.sum() / (per_seq > 0).sum().clamp_min(1).to(d.dtype)
    if reduction != "token":
        raise ValueError(f"alm: reduction must be 'sample' or 'token', got {reduction!r}.")
    return d.sum() / valid.sum().clamp_min(1).to(d.dtype)


def alm_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_index: torch.Tensor,
    teacher_chunk_ll: torch.Tensor,
    cfg: ALMConfig = ALMConfig(),
    reduction: str = "token",
) -> torch.Tensor:
    """ALM between a student and the teacher's chunk log-likelihoods, mean over chunks.

    Args:
        student_logits: [B, T, V] raw student logits; position q predicts ``labels[:, q + 1]``.
        labels: [B, T] long token ids (-100 allowed where ``chunk_index`` of q - 1 is -1).
        chunk_index: [B, T] long, per position q the chunk of token q + 1 (-1: none).
        teacher_chunk_ll: [B, C] the teacher's log-likelihood of each chunk (any value in
            chunks that no position names).
        cfg: temperature, epsilon and divergence.
        reduction: "token" (tokenkit's mean over the batch's chunks) or "sample" (per sequence,
            then over sequences).

    Returns:
        Scalar: the mean of the binarised divergence over the chunks; exactly 0 (zero
        gradient) when there is none.
    """
    cfg.check()
    b, t, _ = student_logits.shape
    nxt = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1)
    inside = (chunk_index >= 0) & (nxt >= 0)
    lp = torch.log_softmax(student_logits, dim=-1).gather(-1, nxt.clamp_min(0)[..., None]).squeeze(-1)
    return alm_per_chunk_mean(lp, torch.where(inside, chunk_index, -1), teacher_chunk_ll, cfg, reduction)
