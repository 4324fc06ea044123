"""One cache row -> one student training example (retokenize, truncate, align, gather)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.pipeline.offsets import encode_with_offsets, require_fast_tokenizer
from logitcache.pipeline.student.align import (
    ALIGNMENTS,
    align_by_offset,
    align_by_position,
    target_positions,
)
from logitcache.storage.rows import Row


@dataclass
class FeatureStats:
    """Counts over the examples this featurizer has seen (per process / dataloader worker)."""

    examples: int = 0
    truncated: int = 0  # student side cut to max_length (teacher side cut to match)
    no_kd: int = 0  # examples where no position aligned: CE only
    targets: int = 0  # student target positions
    matched: int = 0  # of which paired with a teacher position

    @property
    def fraction_matched(self) -> float:
        return self.matched / self.targets if self.targets else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "fraction_matched": self.fraction_matched}


@dataclass
class StudentFeaturizer:
    """Turns a cache row into the student's view of it.

    Output (``n`` = student tokens after truncation):
        input_ids       int64 [n]
        labels          int64 [n]      token id on response tokens, -100 on prompt tokens
        teacher_logprobs float16 [n, K] at student position q: the aligned teacher top-k
        teacher_ids     int32 [n, K]
        kd_mask         bool [n]       q has an aligned teacher position
    Student position q (logits row q) predicts token q+1, like the teacher's positions.
    """

    tokenizer: Any
    alignment: str = "offset"
    max_length: int | None = None
    add_special_tokens: bool = True
    stats: FeatureStats = field(default_factory=FeatureStats)

    def __post_init__(self) -> None:
        require_fast_tokenizer(self.tokenizer, "student tokenizer")
        if self.alignment not in ALIGNMENTS:
            raise LogitCacheError(f"--alignment {self.alignment!r}: use one of {', '.join(ALIGNMENTS)}.")
        if self.max_length is not None and self.max_length < 2:
            raise LogitCacheError(f"--max-length must be at least 2 tokens (got {self.max_length}).")

    def __call__(self, row: Row) -> dict[str, Any]:
        text, prompt_chars = row["text"], int(row["prompt_chars"])
        ids, s_starts, s_ends = encode_with_offsets(self.tokenizer, text, add_special_tokens=self.add_special_tokens)
        ids = np.asarray(ids, dtype=np.int64)
        limit_chars = None
        if self.max_length is not None and len(ids) > self.max_length:
            ids, s_starts, s_ends = ids[: self.max_length], s_starts[: self.max_length], s_ends[: self.max_length]
            # Cut the teacher where the student's text ends, so both sides see the same text.
            limit_chars = int(s_ends[-1])
            self.stats.truncated += 1
        n = len(ids)
        t_starts, t_ends = row["char_start"], row["char_end"]
        s_targets = target_positions(s_starts, s_ends, prompt_chars)
        t_targets = target_positions(t_starts, t_ends, prompt_chars, limit_chars)
        if self.alignment == "position":
            al = align_by_position(t_targets, s_targets, max(n - 1, 0))
        else:
            al = align_by_offset(t_starts, t_ends, t_targets, s_starts, s_ends, s_targets, max(n - 1, 0))

        labels = np.full(n, -100, dtype=np.int64)
        labels[s_targets + 1] = ids[s_targets + 1]
        k = row["topk_ids"].shape[1] if row["topk_ids"].ndim == 2 else 0
        t_lp = np.zeros((n, k), dtype=np.float16)
        t_ids = np.zeros((n, k), dtype=np.int32)
        kd_mask = np.zeros(n, dtype=bool)
        q = np.flatnonzero(al.teacher_pos >= 0)
        kd_mask[q] = True
        t_lp[q] = row["topk_logprobs"][al.teacher_pos[q]]
        t_ids[q] = row["topk_ids"][al.teacher_pos[q]]

        self.stats.examples += 1
        self.stats.targets += al.targets
        self.stats.matched += al.matched
        self.stats.no_kd += al.matched == 0
        return {
            "id": row["id"],
            "input_ids": ids,
            "labels": labels,
            "teacher_logprobs": t_lp,
            "teacher_ids": t_ids,
            "kd_mask": kd_mask,
        }
