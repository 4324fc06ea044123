"""ALM's chunks: the stretches of text that both tokenizations bound, from their character spans.

Approximate likelihood matching (losses/alm.py) compares the likelihood that teacher and
student give to the same piece of text. A piece is comparable when both tokenizations cover
exactly it with whole tokens, so the text is cut where *both* sides end a token: the chunk
boundaries are the character positions that are a target token's end on both sides (spans
normalised as in pipeline/offsets.py, so they tile the text). A chunk is the run of target
tokens between two consecutive boundaries, on each side. Its teacher log-likelihood is the
sum of the cache's ``label_logprob`` over the teacher's positions predicting its tokens.

Rules:

* Only target tokens (those covering a character of a target span, see align.py) take part; a
  chunk lies within one span on both sides (never across the text between two spans); a chunk
  counts only if both sides have a token in it and both sides' first tokens start at the
  same character (so a token that only one side lets straddle the prompt/response boundary
  costs the first chunk, never a misaligned one).
* Byte pieces: tokens covering part of a character have an empty span at the character's
  end (offsets.py), so they join the chunk of that character; a boundary never falls inside
  a character.
* The end of a response (COMMON contract: an EOS token with the empty span at the end of
  the text) is a chunk of its own, the EOS token alone on each side, when both sides end
  with one; an EOS on one side only is in no chunk.
* Text after the last common boundary (a cut by ``max_length``) is in no chunk.

Debiasing (the paper's outcome chunks; tokenkit's ``alm_mode`` "merge_by_space_prob+
append_space"): a token's probability also says where the *next* token starts, and the two
tokenizers disagree on that, so a chunk's likelihood is multiplied on both sides by the
model's probability that the token after the chunk starts a word (whitespace-initial or
special: ``token_bytes.word_start_mask``), where both tokenizations agree that a token
begins. To make that factor mean the same on both sides, consecutive chunks are merged
until the teacher's word-start probability after the last one exceeds a threshold (0.1):
the merged chunk ends where a word (or the end) is likely to follow. Each chunk then also
carries the student position whose logits predict the token after it (``end``) and the
teacher's word-start log-probability there, from the cache's ``word_start_logprob``
(NaN where the cache has no position after the chunk: the end-of-sequence chunk, or a row
cut by ``max_length`` right after it; such a chunk is not debiased on either side). Merging
never joins chunks across a gap (a chunk dropped by the rules above), nor into the
end-of-sequence chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from logitcache.pipeline.student.align import target_span_index


class ALMChunks(NamedTuple):
    """One example's chunks: see :func:`alm_chunks`."""

    chunk: np.ndarray  # int64 [n_student]: the chunk of the token that position q predicts (-1: none)
    teacher_ll: np.ndarray  # float32 [C]: each chunk's summed teacher log-probability
    end: np.ndarray  # int64 [C]: the student position predicting the token after the chunk (-1: none)
    teacher_word_start: np.ndarray  # float32 [C]: the teacher's word-start log-prob there (NaN: none)


def alm_chunks(
    t_starts: np.ndarray, t_ends: np.ndarray, teacher_targets: np.ndarray, teacher_label_logprob: np.ndarray,
    s_starts: np.ndarray, s_ends: np.ndarray, student_targets: np.ndarray, n_student: int,
    *, teacher_eos: bool = False, student_eos: bool = False,
    teacher_word_start: np.ndarray | None = None, merge_threshold: float | None = None,
    target_spans: np.ndarray | None = None,
) -> ALMChunks:
    """Chunk index per student position, and per chunk the teacher log-likelihood and what debiasing needs.

    Args:
        t_starts, t_ends: [n_t] normalised character spans of the teacher tokens.
        teacher_targets: ascending teacher positions p (predicting token p + 1) that are targets.
        teacher_label_logprob: [n_t] the cache's label_logprob: at p, log p_T(token p + 1).
        s_starts, s_ends, student_targets: the same for the student.
        n_student: student tokens; the output has one entry per student position.
        teacher_eos, student_eos: the side's last token is an end-of-sequence token (empty span
            at the end of the text), which then forms its own chunk when both sides have one.
        teacher_word_start: [n_t - 1] the cache's ``word_start_logprob`` (None: NaN per chunk).
        merge_threshold: merge consecutive chunks until the teacher's word-start probability
            after the last one exceeds this (None: no merging).
        target_spans: the row's target spans ([m, 2]; None: one, as v1). A chunk lies within one
            span on both sides (its tokens all belong to it, ``align.target_span_index``), and
            merging never joins chunks of two spans: the text between two spans is no target, so
            a chunk across it would compare likelihoods of pieces the two sides cut differently.

    Returns:
        :class:`ALMChunks`.
    """
    chunk = np.full(n_student, -1, dtype=np.int64)
    t_pos = np.asarray(teacher_targets, dtype=np.int64)
    s_pos = np.asarray(student_targets, dtype=np.int64)
    both_eos = teacher_eos and student_eos
    # The end-of-sequence tokens never join a text chunk: set aside here, and appended as the
    # last chunk below when both sides have one.
    if teacher_eos:
        t_pos = t_pos[t_pos + 1 != len(t_starts) - 1]
    if student_eos:
        s_pos = s_pos[s_pos + 1 != n_student - 1]
    t_end = np.asarray(t_ends, dtype=np.int64)[t_pos + 1]
    s_end = np.asarray(s_ends, dtype=np.int64)[s_pos + 1]
    bounds = np.intersect1d(t_end, s_end)  # sorted common token ends
    # Token -> index of the first boundary at or after its end; past the last boundary: none.
    t_c = np.searchsorted(bounds, t_end, side="left")
    s_c = np.searchsorted(bounds, s_end, side="left")
    t_in, s_in = t_c < len(bounds), s_c < len(bounds)
    n_b = len(bounds)
    t_count = np.bincount(t_c[t_in], minlength=n_b)
    s_count = np.bincount(s_c[s_in], minlength=n_b)
    # First token of each chunk on each side: its start must be the same character.
    big = np.iinfo(np.int64).max
    t_first = np.full(n_b, big, dtype=np.int64)
    s_first = np.full(n_b, big, dtype=np.int64)
    np.minimum.at(t_first, t_c[t_in], np.asarray(t_starts, dtype=np.int64)[t_pos[t_in] + 1])
    np.minimum.at(s_first, s_c[s_in], np.asarray(s_starts, dtype=np.int64)[s_pos[s_in] + 1])
    valid = (t_count > 0) & (s_count > 0) & (t_first == s_first)
    span_of_chunk = np.zeros(n_b, dtype=np.int64)
    if target_spans is not None and n_b:
        t_sp = target_span_index(t_starts, t_ends, t_pos, target_spans)
        s_sp = target_span_index(s_starts, s_ends, s_pos, target_spans)
        lo = np.full(n_b, big, dtype=np.int64)
        hi = np.full(n_b, -1, dtype=np.int64)
        for c, sp, inside in ((t_c, t_sp, t_in), (s_c, s_sp, s_in)):
            np.minimum.at(lo, c[inside], sp[inside])
            np.maximum.at(hi, c[inside], sp[inside])
        valid &= lo == hi
        span_of_chunk = lo
    ll = np.zeros(n_b, dtype=np.float64)
    np.add.at(ll, t_c[t_in], np.asarray(teacher_label_logprob, dtype=np.float64)[t_pos[t_in]])
    # The last token of each chunk on each side: the position predicting the token after it.
    t_last_tok = np.full(n_b, -1, dtype=np.int64)
    s_last_tok = np.full(n_b, -1, dtype=np.int64)
    np.maximum.at(t_last_tok, t_c[t_in], t_pos[t_in] + 1)
    np.maximum.at(s_last_tok, s_c[s_in], s_pos[s_in] + 1)
    kept = np.flatnonzero(valid)
    end = s_last_tok[kept]
    t_ws = np.full(len(kept), np.nan)
    if teacher_word_start is not None:
        ws_col = np.asarray(teacher_word_start, dtype=np.float64)
        rows = t_last_tok[kept]
        has = rows < len(ws_col)
        t_ws[has] = ws_col[rows[has]]
    # Chunk numbers 0..C-1 over the kept ones; merged, a group number per kept chunk.
    group = np.arange(len(kept))
    if merge_threshold is not None and len(kept):
        close = np.ones(len(kept), dtype=bool)  # a group ends at this chunk
        close[:-1] = (np.exp(t_ws[:-1]) > merge_threshold) | np.isnan(t_ws[:-1]) | (np.diff(kept) != 1)
        close[:-1] |= np.diff(span_of_chunk[kept]) != 0
        group = np.concatenate(([0], np.cumsum(close[:-1])))
        ll_kept = np.zeros(int(group[-1]) + 1)
        np.add.at(ll_kept, group, ll[kept])
        teacher_ll, end, t_ws = ll_kept, end[close], t_ws[close]
    else:
        teacher_ll = ll[kept]
    new_index = np.full(n_b, -1, dtype=np.int64)
    new_index[kept] = group
    keep_s = s_in.copy()
    keep_s[s_in] = valid[s_c[s_in]]
    chunk[s_pos[keep_s]] = new_index[s_c[keep_s]]
    if both_eos and len(t_starts) >= 2 and n_student >= 2:
        t_last, s_last = len(t_starts) - 2, n_student - 2
        if np.isin(t_last, teacher_targets) and np.isin(s_last, student_targets):
            chunk[s_last] = len(teacher_ll)
            teacher_ll = np.append(teacher_ll, float(teacher_label_logprob[t_last]))
            end, t_ws = np.append(end, -1), np.append(t_ws, np.nan)  # nothing follows the end
    return ALMChunks(chunk, np.asarray(teacher_ll, dtype=np.float32), np.asarray(end, dtype=np.int64),
                     np.asarray(t_ws, dtype=np.float32))
