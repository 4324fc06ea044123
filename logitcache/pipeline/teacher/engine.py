"""What a teacher engine provides (hf, vllm): the one small interface stage 1 is written against."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.storage.integrity import LOGPROB_TOL

ENGINES = ("hf", "vllm")


@dataclass
class ScoredSequence:
    """The teacher's predictions along one sequence of n tokens (n - 1 positions).

    Log-probabilities are the raw distribution at temperature 1 over the full vocabulary.
    """

    topk_ids: np.ndarray  # int32 [n - 1, k], most likely first
    topk_logprobs: np.ndarray  # float32 [n - 1, k], descending (the cache's codec rounds them)
    label_logprob: np.ndarray  # float32 [n - 1]: log-prob of the actual next token
    logsumexp: np.ndarray  # float32 [n - 1]: log-normaliser of the raw logits
    # Only from engines that see the full logits (hf), when asked for (see topk.py):
    lse_tau: np.ndarray | None = None  # float32 [n - 1, M]: logsumexp(logits / tau) per extra tau
    logit_mean: np.ndarray | None = None  # float32 [n - 1]: mean of the logits over the vocabulary
    logit_std: np.ndarray | None = None  # float32 [n - 1]: their unbiased standard deviation
    lse_std: np.ndarray | None = None  # float32 [n - 1]: logsumexp(logits / (logit_std + 1e-4))
    # float32 [n - 1]: log of the mass on tokens that start a word (whitespace-initial, special)
    word_start_logprob: np.ndarray | None = None
    # With --sample N (hf): N draws per position from the teacher's distribution, as distinct ids
    # and counts, [n - 1, N] each, padded with id 0 / count 0 (storage/samples.py).
    sample_ids: np.ndarray | None = None  # int32
    sample_counts: np.ndarray | None = None  # uint8


def first_bad_value(s: ScoredSequence) -> str | None:
    """What in one sequence's scores could not come from a sane model (NaN, inf, a log-prob
    above 0), or None. Stage 1 checks every sequence before anything of its batch is written."""
    checks = (("top-k log-probabilities", s.topk_logprobs, True), ("label log-probs", s.label_logprob, True),
              ("log-normalisers", s.logsumexp, False), ("lse_tau", s.lse_tau, False),
              ("logit means", s.logit_mean, False), ("logit stds", s.logit_std, False), ("lse_std", s.lse_std, False),
              ("word-start log-probs", s.word_start_logprob, True))
    for what, values, at_most_zero in checks:
        if values is None or not values.size:
            continue
        if not np.isfinite(values).all():
            return f"has NaN/inf {what}"
        if at_most_zero and values.max() > LOGPROB_TOL:
            return f"has {what} above 0 ({float(values.max()):.3g})"
    return None


@dataclass
class GenerationConfig:
    """How the teacher writes responses in generate mode (recorded in the manifest)."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise LogitCacheError(f"--max-new-tokens must be positive (got {self.max_new_tokens}).")
        if self.temperature < 0:
            raise LogitCacheError(f"--temperature must be 0 (greedy) or more (got {self.temperature}).")
        if not 0 < self.top_p <= 1:
            raise LogitCacheError(f"--top-p must be in (0, 1] (got {self.top_p}).")

    def describe(self) -> dict[str, Any]:
        return asdict(self)


class TeacherEngine(Protocol):
    """A teacher model behind stage 1. Both engines must produce identical rows."""

    name: str
    tokenizer: Any  # a fast tokenizer (offsets)
    temperatures: tuple[float, ...]  # extra temperatures whose log-normaliser score() returns
    logit_stats: bool  # whether score() returns logit_mean / logit_std / lse_std
    word_start: bool  # whether score() returns word_start_logprob
    fingerprint: str  # identity of the weights, for the manifest's settings check

    @property
    def vocab_size(self) -> int: ...  # width of the logits

    @property
    def max_length(self) -> int | None: ...  # context length in tokens

    def describe(self) -> dict[str, Any]: ...  # the manifest's "teacher" entry

    def score(self, seqs: Sequence[Sequence[int]], k: int) -> list[ScoredSequence]:
        """Top-k of every next-token prediction along each token sequence (teacher-forced).
        An engine made with ``sample=N`` (hf) takes ``keys=`` too: one draw key per sequence
        (topk.sequence_key), and fills ``sample_ids``/``sample_counts``."""

    def generate(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> list[list[int]]:
        """The new token ids the teacher writes after each prompt (without the prompt, no padding)."""
