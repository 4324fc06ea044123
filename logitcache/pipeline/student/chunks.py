"""ALM's chunks: the stretches of text that both tokenizations bound, from their character spans.

Approximate likelihood matching (losses/alm.py) compares the likelihood that teacher and
student give to the same piece of text. A piece is comparable when both tokenizations cover
exactly it with whole tokens, so the text is cut where *both* sides end a token: the chunk
boundaries are the character positions that are a target token's end on both sides (spans
normalised as in pipeline/offsets.py, so they tile the text). A chunk is the run of target
tokens between two consecutive boundaries, on each side. Its teacher log-likelihood is the
sum of the cache's ``label_logprob`` over the teacher's positions predicting its tokens.

Rules:

* Only target tokens (those covering a response character, see align.py) take part; a chunk
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
"""

from __future__ import annotations

import numpy as np


def alm_chunks(
    t_starts: np.ndarray, t_ends: np.ndarray, teacher_targets: np.ndarray, teacher_label_logprob: np.ndarray,
    s_starts: np.ndarray, s_ends: np.ndarray, student_targets: np.ndarray, n_student: int,
    *, teacher_eos: bool = False, student_eos: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk index per student position and the teacher log-likelihood per chunk.

    Args:
        t_starts, t_ends: [n_t] normalised character spans of the teacher tokens.
        teacher_targets: ascending teacher positions p (predicting token p + 1) that are targets.
        teacher_label_logprob: [n_t] the cache's label_logprob: at p, log p_T(token p + 1).
        s_starts, s_ends, student_targets: the same for the student.
        n_student: student tokens; the output has one entry per student position.
        teacher_eos, student_eos: the side's last token is an end-of-sequence token (empty span
            at the end of the text), which then forms its own chunk when both sides have one.

    Returns:
        (alm_chunk, alm_teacher_ll): int64 [n_student], the chunk of the token that position q
        predicts (-1: none), and float32 [C], each chunk's summed teacher log-probability.
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
    new_index = np.cumsum(valid) - 1  # chunks renumbered 0..C-1 over the valid ones
    ll = np.zeros(n_b, dtype=np.float64)
    np.add.at(ll, t_c[t_in], np.asarray(teacher_label_logprob, dtype=np.float64)[t_pos[t_in]])
    keep_s = s_in.copy()
    keep_s[s_in] = valid[s_c[s_in]]
    chunk[s_pos[keep_s]] = new_index[s_c[keep_s]]
    teacher_ll = ll[valid]
    if both_eos and len(t_starts) >= 2 and n_student >= 2:
        t_last, s_last = len(t_starts) - 2, n_student - 2
        if np.isin(t_last, teacher_targets) and np.isin(s_last, student_targets):
            chunk[s_last] = len(teacher_ll)
            teacher_ll = np.append(teacher_ll, float(teacher_label_logprob[t_last]))
    return chunk, teacher_ll.astype(np.float32)
