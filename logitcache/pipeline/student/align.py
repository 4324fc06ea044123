"""Which teacher position each student position learns from.

Both tokenizations cover the same ``text``. Position p of a sequence predicts token p+1, so
a position "is" the span of the token it predicts. Only *targets* get CE and KD.

Targets. A row has target spans ([start, end) character ranges of ``text``; v1's
``prompt_chars`` is the one span from it to the end). A position is a target when its
predicted token covers at least one character of a span: ``start < span_end`` and
``end > span_start`` (for one span to the end of the text: its span ENDS after ``prompt_chars``). So a token that straddles the
prompt/response boundary (byte-level BPE's ``':\\n'`` for prompt ``'Answer:'`` + response
``'\\nYes'``) belongs to the response, on the teacher's side and the student's alike; it gets
CE and can get KD, and the response starts at the same place on both sides whichever way each
tokenizer cut the boundary. A token with an empty span (a later byte piece of a split
character, an added special token) counts by its position: a target when it sits inside a
span, after its start and at most at its end (``span_start < pos <= span_end``: a piece of a
span's last character, which sits at the character's end, belongs to it; one at the span's start
belongs to the character before). (Before this rule a straddling token was dropped on one side
only, and every later ``position`` pair was shifted by one.) A target belongs to the last span
it reaches (``target_span_index``): a token straddling the gap between two spans belongs to the
later one, on both sides alike.

The end. A sequence may end with an end-of-sequence token (the teacher's, appended in stage 1
and recorded as the manifest's ``eos_id``; the student's, appended by the featurizer), with an
empty span at ``len(text)``. Its position predicts "the response is over": a target when the
last span reaches the end of the text (always for v1's one span; for a chat, when its last turn
is a target turn), paired with the other side's end by both alignments (ends have no characters, so they are
paired as ends, not by span or bytes). A side without an end (an old cache, a student
tokenizer without EOS, a student cut by ``max_length``) leaves the other side's end unpaired:
CE only for the student's.

Result: for every student position q (0..n_s-2) the teacher position it is paired with, or -1.

* ``position`` (the ULD and MultiLevelOT papers): the i-th target of the student is paired
  with the i-th target of the teacher, up to the shorter of the two responses, counted from
  the same character on both sides (the first character after the prompt where both
  tokenizations end a token: see ``align_by_position``); the ends are paired with each other.
  With several spans the counting restarts in each: the i-th target of span j on one side
  pairs with the i-th of span j on the other.
* ``offset`` (DSKD's exact token alignment, on stored offsets): a student target is paired
  with the teacher target whose predicted token stands for exactly the same BYTES of the
  UTF-8 text (``offsets.byte_spans``): for whole characters that is the same character span;
  a piece of a split character pairs only with a piece covering the same bytes (a byte-level
  piece ``'ĺ'`` with a byte-fallback ``<0x98>`` of that byte, never with the piece before or
  after it); a token whose bytes are not known pairs with nothing. Unmatched positions get
  no KD (CE still applies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

ALIGNMENTS = ("offset", "position")


@dataclass
class Alignment:
    teacher_pos: np.ndarray  # int64 [n_s - 1]: paired teacher position, -1 where none
    targets: int  # student target positions (the end included)
    matched: int  # of which paired with a teacher position
    end_targets: int = 0  # 1 when the student has an end target
    end_matched: int = 0  # 1 when it is paired with the teacher's end

    @property
    def fraction_matched(self) -> float:
        return self.matched / self.targets if self.targets else 0.0


SpanLike = Union[int, Sequence[Sequence[int]], np.ndarray]


def _as_span_array(spans: SpanLike) -> np.ndarray:
    """int64 [m, 2]; an int is v1's ``prompt_chars``: one span from it to the end of the text."""
    if isinstance(spans, (int, np.integer)):
        return np.array([[int(spans), np.iinfo(np.int64).max]], dtype=np.int64)
    a = np.asarray(spans, dtype=np.int64)
    return a.reshape(-1, 2) if a.size else np.zeros((0, 2), np.int64)


def target_positions(starts: np.ndarray, ends: np.ndarray, spans: SpanLike, limit_chars: int | None = None) -> np.ndarray:
    """Positions p (predicting token p+1) whose predicted token is a target (see the module) and,
    with ``limit_chars``, ends within the first ``limit_chars`` characters.

    Args:
        starts, ends: [n] character spans of the tokens (normalised, see offsets.py), without
            an end-of-sequence token (the featurizer handles the ends).
        spans: the row's target spans ([m, 2] [start, end) pairs, sorted and apart), or v1's
            ``prompt_chars`` (an int: one span from it to the end).
    Returns:
        int64 ascending array of positions in 0..n-2.
    """
    return np.flatnonzero(_target_span_of(np.asarray(starts[1:]), np.asarray(ends[1:]), spans, limit_chars) >= 0)


def target_span_index(starts: np.ndarray, ends: np.ndarray, positions: np.ndarray, spans: SpanLike) -> np.ndarray:
    """The span (0..m-1) each target position belongs to: the last span its predicted token
    reaches (a token straddling the gap between two spans belongs to the later one, on both sides)."""
    tok = np.asarray(positions, dtype=np.int64) + 1
    return _target_span_of(np.asarray(starts)[tok], np.asarray(ends)[tok], spans, None)


def _target_span_of(s: np.ndarray, e: np.ndarray, spans: SpanLike, limit_chars: int | None) -> np.ndarray:
    """Per token [s, e): the index of the last span it is a target of, or -1."""
    sp = _as_span_array(spans)
    s, e = np.asarray(s, np.int64), np.asarray(e, np.int64)
    if not len(sp):
        return np.full(len(e), -1, dtype=np.int64)
    # The last span starting before the token's end: the only candidate that can hold it last.
    j = np.searchsorted(sp[:, 0], e, side="left") - 1
    jj = np.maximum(j, 0)
    a, b = sp[jj, 0], sp[jj, 1]
    empty = s == e
    # Overlap for a token with characters; for an empty span, its place in (a, b].
    hit = (j >= 0) & (e > a) & np.where(empty, e <= b, s < b)
    if limit_chars is not None:
        hit &= e <= limit_chars
    return np.where(hit, j, -1)


def _pair_ends(out: np.ndarray, teacher_end: int | None, student_end: int | None) -> tuple[int, int]:
    if student_end is None:
        return 0, 0
    if teacher_end is None:
        return 1, 0
    out[student_end] = teacher_end
    return 1, 1


def align_by_position(
    teacher_targets: np.ndarray, student_targets: np.ndarray, n_student_positions: int,
    *, teacher_target_ends: np.ndarray | None = None, student_target_ends: np.ndarray | None = None,
    teacher_end: int | None = None, student_end: int | None = None,
    teacher_target_spans: np.ndarray | None = None, student_target_spans: np.ndarray | None = None,
) -> Alignment:
    """Pair the i-th student target with the i-th teacher target, and the student's end (position
    predicting its EOS) with the teacher's.

    With the targets' token ends (characters, ``*_target_ends``), both sides start at the same
    character: the first character where both tokenizations end a target token (a boundary
    token may cover ``':\n\n'`` on one side, ``'\n'`` + ``'\n'`` on the other) is where the
    counting starts. The tokens up to it are paired from that boundary backwards (the ones
    ending there with each other; a side's extra leading pieces get CE only), then index by
    index after it, up to the shorter response.

    With the span each target belongs to (``*_target_spans``, ``target_span_index``), the
    counting restarts in every span: the i-th student target of span j pairs with the i-th
    teacher target of span j (so a difference in length in one turn of a chat does not shift
    the pairs of every later turn).
    """
    out = np.full(n_student_positions, -1, dtype=np.int64)
    if teacher_target_spans is None or student_target_spans is None:
        matched = _pair_in_order(out, teacher_targets, student_targets, teacher_target_ends, student_target_ends)
    else:
        matched = 0
        for j in np.union1d(teacher_target_spans, student_target_spans):
            t_in, s_in = teacher_target_spans == j, student_target_spans == j
            matched += _pair_in_order(
                out, teacher_targets[t_in], student_targets[s_in],
                None if teacher_target_ends is None else teacher_target_ends[t_in],
                None if student_target_ends is None else student_target_ends[s_in],
            )
    end_t, end_m = _pair_ends(out, teacher_end, student_end)
    return Alignment(out, targets=len(student_targets) + end_t, matched=matched + end_m, end_targets=end_t,
                     end_matched=end_m)


def _pair_in_order(out: np.ndarray, teacher_targets: np.ndarray, student_targets: np.ndarray,
                   teacher_target_ends: np.ndarray | None, student_target_ends: np.ndarray | None) -> int:
    """One run of targets (a response, or one span): anchored at the first common end, then index by index."""
    jt = js = 0
    if teacher_target_ends is not None and student_target_ends is not None and len(student_target_ends):
        # Both are non-decreasing: the first teacher end that the student has too.
        at = np.searchsorted(student_target_ends, teacher_target_ends)
        hit = student_target_ends[np.minimum(at, len(student_target_ends) - 1)] == teacher_target_ends
        if hit.any():
            first = teacher_target_ends[int(hit.argmax())]
            jt = int(np.searchsorted(teacher_target_ends, first, side="right"))
            js = int(np.searchsorted(student_target_ends, first, side="right"))
    m0 = min(jt, js)
    out[student_targets[js - m0 : js]] = teacher_targets[jt - m0 : jt]
    m1 = min(len(teacher_targets) - jt, len(student_targets) - js)
    out[student_targets[js : js + m1]] = teacher_targets[jt : jt + m1]
    return m0 + m1


def _span_keys(starts: np.ndarray, ends: np.ndarray, total: int) -> np.ndarray:
    """One int64 key per token: its span, plus its order within a run of identical spans.

    Spans tile the text (in characters or bytes), so only empty spans repeat; the order tells
    them apart (two added tokens at one place; with character spans, the later pieces of a
    split character). Keys increase along the sequence.
    """
    s, e = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    keys = (s * (total + 1) + e) * 1024
    repeat = keys[1:] == keys[:-1]
    if not repeat.any():
        return keys
    idx = np.arange(len(s))
    new_run = np.ones(len(s), dtype=bool)
    new_run[1:] = ~repeat
    order = idx - np.maximum.accumulate(np.where(new_run, idx, 0))
    return keys + np.minimum(order, 1023)


def align_by_offset(
    t_starts: np.ndarray, t_ends: np.ndarray, teacher_targets: np.ndarray,
    s_starts: np.ndarray, s_ends: np.ndarray, student_targets: np.ndarray,
    n_student_positions: int,
    *, t_known: np.ndarray | None = None, s_known: np.ndarray | None = None,
    teacher_end: int | None = None, student_end: int | None = None,
) -> Alignment:
    """Pair a student target with the teacher target predicting a token of identical span.

    Spans are the tokens' byte ranges (``offsets.byte_spans``; then ``*_known`` says which are
    known, the others pair with nothing) or, without them, character spans (empty spans then
    pair by order after the same character). The ends are paired with each other. With one
    tokenizer on both sides every target pairs.
    """
    out = np.full(n_student_positions, -1, dtype=np.int64)
    total = max(int(t_ends[-1]) if len(t_ends) else 0, int(s_ends[-1]) if len(s_ends) else 0)  # ends never decrease
    t_all = _span_keys(t_starts, t_ends, total)
    s_all = _span_keys(s_starts, s_ends, total)
    if t_known is not None:
        teacher_targets = teacher_targets[t_known[teacher_targets + 1]]
    t_keys = t_all[teacher_targets + 1]
    s_keys = s_all[student_targets + 1]
    s_ok = np.ones(len(student_targets), dtype=bool) if s_known is None else s_known[student_targets + 1]
    idx = np.searchsorted(t_keys, s_keys)
    found = s_ok & (idx < len(t_keys))
    found[found] = t_keys[idx[found]] == s_keys[found]
    out[student_targets[found]] = teacher_targets[idx[found]]
    end_t, end_m = _pair_ends(out, teacher_end, student_end)
    matched = int(found.sum()) + end_m
    return Alignment(out, targets=len(student_targets) + end_t, matched=matched, end_targets=end_t, end_matched=end_m)
