"""Which teacher position each student position learns from.

Both tokenizations cover the same ``text``. Position p of a sequence predicts token p+1, so
a position "is" the span of the token it predicts. A position is a *target* when its
predicted token starts in the response (at or after ``prompt_chars``); only targets get
CE and KD. Result: for every student position q (0..n_s-2) the teacher position it is
paired with, or -1.

* ``position`` (the ULD and MultiLevelOT papers): the i-th target of the student is paired
  with the i-th target of the teacher, up to the shorter of the two responses.
* ``offset`` (DSKD's exact token alignment, on stored offsets): a student target is paired
  with the teacher target whose predicted token has exactly the same character span (for
  the empty-span later pieces of a split character: the same piece in order); unmatched
  positions get no KD (CE still applies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALIGNMENTS = ("offset", "position")


@dataclass
class Alignment:
    teacher_pos: np.ndarray  # int64 [n_s - 1]: paired teacher position, -1 where none
    targets: int  # student target positions
    matched: int  # of which paired with a teacher position

    @property
    def fraction_matched(self) -> float:
        return self.matched / self.targets if self.targets else 0.0


def target_positions(starts: np.ndarray, ends: np.ndarray, prompt_chars: int, limit_chars: int | None = None) -> np.ndarray:
    """Positions p (predicting token p+1) whose predicted token starts in the response and,
    with ``limit_chars``, ends within the first ``limit_chars`` characters.

    Args:
        starts, ends: [n] character spans of the tokens (normalised, see offsets.py).
    Returns:
        int64 ascending array of positions in 0..n-2.
    """
    s, e = np.asarray(starts[1:]), np.asarray(ends[1:])
    keep = s >= prompt_chars
    if limit_chars is not None:
        keep &= e <= limit_chars
    return np.flatnonzero(keep)


def align_by_position(teacher_targets: np.ndarray, student_targets: np.ndarray, n_student_positions: int) -> Alignment:
    """Pair the i-th student target with the i-th teacher target (response starts aligned)."""
    out = np.full(n_student_positions, -1, dtype=np.int64)
    m = min(len(teacher_targets), len(student_targets))
    out[student_targets[:m]] = teacher_targets[:m]
    return Alignment(out, targets=len(student_targets), matched=m)


def _span_keys(starts: np.ndarray, ends: np.ndarray, text_len: int) -> np.ndarray:
    """One int64 key per token: its span, plus its order within a run of identical spans.

    Spans tile the text, so only empty spans repeat: the later pieces of a character split
    over several tokens (byte-level BPE, byte fallback) sit at that character's end. The
    order tells the second piece from the third, so two tokenizers that split a character
    the same way pair up piece by piece. Keys increase along the sequence.
    """
    s, e = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    n = len(s)
    idx = np.arange(n)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (s[1:] != s[:-1]) | (e[1:] != e[:-1])
    order = idx - np.maximum.accumulate(np.where(new_run, idx, 0))
    return (s * (text_len + 1) + e) * 1024 + np.minimum(order, 1023)


def align_by_offset(
    t_starts: np.ndarray, t_ends: np.ndarray, teacher_targets: np.ndarray,
    s_starts: np.ndarray, s_ends: np.ndarray, student_targets: np.ndarray,
    n_student_positions: int,
) -> Alignment:
    """Pair a student target with the teacher target predicting a token of identical span.

    Tokens with an empty span match only as the same piece (by order) after the same
    character: exact when both tokenizers split that character alike, which covers a
    student sharing the teacher's tokenizer (every target then matches).
    """
    out = np.full(n_student_positions, -1, dtype=np.int64)
    text_len = int(max(np.max(t_ends, initial=0), np.max(s_ends, initial=0)))
    t_keys = _span_keys(t_starts, t_ends, text_len)[teacher_targets + 1]
    s_keys = _span_keys(s_starts, s_ends, text_len)[student_targets + 1]
    idx = np.searchsorted(t_keys, s_keys)
    found = idx < len(t_keys)
    found[found] = t_keys[idx[found]] == s_keys[found]
    out[student_targets[found]] = teacher_targets[idx[found]]
    return Alignment(out, targets=len(student_targets), matched=int(found.sum()))
