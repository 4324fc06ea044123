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

Debiasing (``ALMConfig.mode`` "debias", the default; tokenkit's ``alm_mode``
"merge_by_space_prob+append_space", its recommended setting): chunks are merged until the
teacher's probability that a word starts after them exceeds ``merge_threshold`` (0.1,
tokenkit's ``tokenizer_pair_bias_threshold``; chunks.py), and each chunk's log-likelihood
gets, on both sides, the log-probability that the token after it starts a word::

    ll_T(c) += log sum_{v in W_T} p_T(v | ..c),    ll_S(c) += log sum_{v in W_S} p_S(v | ..c)

W: the side's tokens starting with a space, tab or newline byte, and its special tokens
(tokenkit's ``space_mask_mode`` "space+tab+newline+special"; ``token_bytes.word_start_mask``).
The teacher's term needs its full vocabulary: stage 1 stores it per position
(``word_start_logprob``, ``logitcache teacher --word-start``, on by default with the hf
engine). A chunk with nothing after it (the end-of-sequence chunk) is not debiased. Mode
"plain" is tokenkit's "unconstrained" chunking without debiasing, for caches without the
column (vLLM's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ALMDivergence = Literal["binary_kl", "binary_ce"]
ALMMode = Literal["debias", "plain"]


@dataclass(frozen=True)
class ALMConfig:
    """ALM's hyper-parameters (tokenkit's defaults)."""

    temperature: float = 100.0  # binarization_temp
    epsilon: float = 1e-6
    divergence: ALMDivergence = "binary_kl"
    mode: ALMMode = "debias"  # merge_by_space_prob+append_space; "plain": unconstrained
    merge_threshold: float = 0.1  # tokenizer_pair_bias_threshold

    def check(self) -> None:
        if self.mode not in ("debias", "plain"):
            raise ValueError(f"ALMConfig: mode must be 'debias' or 'plain', got {self.mode!r}.")
        if not 0.0 <= self.merge_threshold < 1.0:
            raise ValueError(f"ALMConfig: merge_threshold must be in [0, 1), got {self.merge_threshold}.")
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


@dataclass
class ALMTargets:
    """What ALM reads besides the student's logits, per batch (chunks.py via the collator).

    ``chunk_index`` [B, T] long: per position q the chunk of token q + 1 (-1: none).
    ``teacher_ll`` [B, C]: the teacher's log-likelihood of each chunk.
    Debiasing (all three, or none): ``end`` [B, C] long, the position whose prediction
    follows each chunk (-1: none); ``teacher_word_start`` [B, C], the teacher's word-start
    log-probability there (NaN: none); ``word_start_mask`` [V] bool, the student's word-start
    tokens.
    """

    chunk_index: torch.Tensor
    teacher_ll: torch.Tensor
    end: torch.Tensor | None = None
    teacher_word_start: torch.Tensor | None = None
    word_start_mask: torch.Tensor | None = None

    @property
    def debiased(self) -> bool:
        return self.end is not None


def debias_terms(word_start_logprobs: torch.Tensor, end: torch.Tensor, teacher_word_start: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`alm_per_chunk_mean`'s debiasing arguments: the student's word-start log-prob after
    each chunk [B, C], read from its per-position values [B, T] at ``end`` [B, C], and the
    teacher's [B, C], NaN (not debiased) wherever ``end`` is -1."""
    t_ws = torch.where(end >= 0, teacher_word_start, torch.full_like(teacher_word_start, float("nan")))
    return {"student_word_start": word_start_logprobs.gather(1, end.clamp_min(0)), "teacher_word_start": t_ws}


def alm_per_chunk_mean(student_label_logprobs: torch.Tensor, chunk_index: torch.Tensor, teacher_chunk_ll: torch.Tensor,
                       cfg: ALMConfig = ALMConfig(), reduction: str = "token", *,
                       student_word_start: torch.Tensor | None = None,
                       teacher_word_start: torch.Tensor | None = None) -> torch.Tensor:
    """ALM from the student's label log-probs [B, T], chunk indices [B, T] and teacher chunk lls [B, C].

    Chunks with no student token (padding of the collated [B, C]) do not count. ``reduction``:
    "token", the mean of D over the batch's chunks (tokenkit's); "sample", the mean over each
    sequence's chunks, then over sequences that have one. Exactly 0 when no chunk counts.
    Debiasing: ``student_word_start`` / ``teacher_word_start`` [B, C] are added to the two
    sides' chunk log-likelihoods where the teacher's is finite (NaN: the chunk is not debiased).
    """
    s_ll, counts = chunk_sums(student_label_logprobs, chunk_index, teacher_chunk_ll.shape[1])
    t_ll = teacher_chunk_ll.to(s_ll.dtype)
    if teacher_word_start is not None:
        t_ws = teacher_word_start.to(s_ll.dtype)
        has = torch.isfinite(t_ws)
        s_ll = s_ll + torch.where(has, student_word_start.to(s_ll.dtype), torch.zeros_like(s_ll))
        t_ll = t_ll + torch.where(has, t_ws, torch.zeros_like(t_ll))
    valid = counts > 0
    d = binarised_divergence(t_ll, s_ll, cfg)
    d = torch.where(valid, d, torch.zeros_like(d))
    if reduction == "sample":
        per_seq = valid.sum(dim=1)
        seq_mean = d.sum(dim=1) / per_seq.clamp_min(1).to(d.dtype)
        return seq_mean.sum() / (per_seq > 0).sum().clamp_min(1).to(d.dtype)
    if reduction != "token":
        raise ValueError(f"alm: reduction must be 'sample' or 'token', got {reduction!r}.")
    return d.sum() / valid.sum().clamp_min(1).to(d.dtype)


def alm_of_label_logprobs(label_logprobs: torch.Tensor, has_target: torch.Tensor, alm: ALMTargets,
                          cfg: ALMConfig = ALMConfig(), reduction: str = "token", *,
                          word_start_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """ALM from the student's per-position log-probabilities: what every path computes once it has them.

    Args:
        label_logprobs: [B, T] ``log_softmax(x_q)[label_{q+1}]`` (any finite value where
            ``has_target`` is False).
        has_target: [B, T] bool, position q has a label q + 1.
        alm: the chunks (and, for debiasing, ``end`` and ``teacher_word_start``).
        cfg, reduction: as :func:`alm_loss`.
        word_start_logprobs: [B, T] ``log sum_{v in W} softmax(x_q)_v``, or None: not debiased.
    """
    idx = torch.where(has_target, alm.chunk_index.to(label_logprobs.device).long(), -1)
    debias = {}
    if word_start_logprobs is not None:
        debias = debias_terms(word_start_logprobs, alm.end.to(label_logprobs.device).long(),
                              alm.teacher_word_start.to(label_logprobs))
    return alm_per_chunk_mean(label_logprobs, idx, alm.teacher_ll.to(label_logprobs), cfg, reduction, **debias)


def alm_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_index: torch.Tensor,
    teacher_chunk_ll: torch.Tensor,
    cfg: ALMConfig = ALMConfig(),
    reduction: str = "token",
    *,
    end: torch.Tensor | None = None,
    teacher_word_start: torch.Tensor | None = None,
    word_start_mask: torch.Tensor | None = None,
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
        end, teacher_word_start, word_start_mask: debiasing (all three or none), see
            :class:`ALMTargets`; ``cfg.mode`` "plain" ignores them.

    Returns:
        Scalar: the mean of the binarised divergence over the chunks; exactly 0 (zero
        gradient) when there is none.
    """
    cfg.check()
    b, t, _ = student_logits.shape
    nxt = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1)
    log_p = torch.log_softmax(student_logits, dim=-1)
    lp = log_p.gather(-1, nxt.clamp_min(0)[..., None]).squeeze(-1)
    ws = None
    if cfg.mode == "debias" and end is not None:
        ws = torch.logsumexp(log_p[..., word_start_mask.to(log_p.device)], dim=-1)  # [B, T]
    alm = ALMTargets(chunk_index, teacher_chunk_ll, end, teacher_word_start)
    return alm_of_label_logprobs(lp, nxt >= 0, alm, cfg, reduction, word_start_logprobs=ws)
