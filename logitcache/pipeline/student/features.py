"""One cache row -> one student training example (retokenize, truncate, align, gather).

The end of the response is a target when the row's last target span reaches the end of the
text (see align.py; always for a v1 row): the student's featurizer appends the
student tokenizer's EOS (``tokenizer.eos_token_id``, when it has one and the encoded text does
not already end with it) with an empty span at ``len(text)``; it gets CE, and KD from the
teacher's end where the cache has one (manifest ``eos_id``; caches made before it have none:
CE only there). When ``max_length`` cuts the student's side, the cut side has no end, and the
teacher's end is not used either.
"""

from __future__ import annotations


import functools
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.pipeline.offsets import (
    PieceBytes,
    byte_spans,
    char_byte_offsets,
    encode_with_offsets,
    piece_bytes_table,
    require_fast_tokenizer,
)
from logitcache.pipeline.student.align import (
    ALIGNMENTS,
    align_by_offset,
    align_by_position,
    target_positions,
    target_span_index,
)
from logitcache.storage.rows import Row
from logitcache.storage.spans import ends_at_text_end, row_spans


@dataclass
class FeatureStats:
    """Counts over the examples this featurizer has seen (per process / dataloader worker)."""

    examples: int = 0
    truncated: int = 0  # student side cut to max_length (teacher side cut to match)
    no_kd: int = 0  # examples where no position aligned: CE only
    targets: int = 0  # student target positions (ends included)
    matched: int = 0  # of which paired with a teacher position
    end_targets: int = 0  # student ends (EOS predictions) among the targets
    end_matched: int = 0  # of which paired with the teacher's end

    @property
    def fraction_matched(self) -> float:
        return self.matched / self.targets if self.targets else 0.0

    @property
    def fraction_text_matched(self) -> float:
        """The aligned fraction of the targets that predict text (ends left out: they always pair)."""
        targets = self.targets - self.end_targets
        return (self.matched - self.end_matched) / targets if targets else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "fraction_matched": self.fraction_matched}

    def counts(self) -> np.ndarray:
        """The counts as one int64 vector, in field order (what travels with each example)."""
        return np.array([getattr(self, f.name) for f in fields(self)], dtype=np.int64)

    @classmethod
    def from_counts(cls, counts: Any) -> "FeatureStats":
        return cls(*(int(c) for c in counts))


def _end_of(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, eos_id: int | None, text_len: int) -> bool:
    """Whether the sequence ends with an appended end: ``eos_id`` with an empty span at the end of the
    text (an EOS written in the text, as some chat templates render it, is text like any other)."""
    return (
        eos_id is not None and len(ids) > 1 and int(ids[-1]) == eos_id
        and int(starts[-1]) == int(ends[-1]) == text_len
    )


_PIECE_BYTES: "weakref.WeakKeyDictionary[Any, PieceBytes]" = weakref.WeakKeyDictionary()


def _piece_bytes_of(tokenizer) -> PieceBytes:
    """The tokenizer's byte table, built once per tokenizer object (a featurizer per worker,
    and tests make many)."""
    try:
        return _PIECE_BYTES[tokenizer]
    except (KeyError, TypeError):
        table = piece_bytes_table(tokenizer)
    try:
        _PIECE_BYTES[tokenizer] = table
    except TypeError:  # not weakly referenceable: built each time
        pass
    return table


@dataclass
class StudentFeaturizer:
    """Turns a cache row into the student's view of it.

    Output (``n`` = student tokens after truncation):
        input_ids       int64 [n]      the student's tokens, its EOS appended (see the module)
        labels          int64 [n]      token id on target tokens (those covering a character of
                                       a target span, and the EOS), -100 elsewhere
        teacher_logprobs float16 [n, K] at student position q: the aligned teacher top-k
        teacher_ids     int32 [n, K]
        kd_mask         bool [n]       q has an aligned teacher position
    Student position q (logits row q) predicts token q+1, like the teacher's positions.

    ``teacher_bytes``: the cache tokenizer's :func:`piece_bytes_table`, for ``offset`` alignment
    of split characters (without it, their pieces get CE only). ``teacher_eos_id``: the
    manifest's ``eos_id`` (None: the cache has no ends).
    """

    tokenizer: Any
    alignment: str = "offset"
    max_length: int | None = None
    add_special_tokens: bool = True
    teacher_bytes: PieceBytes | None = None
    teacher_eos_id: int | None = None
    # ALM's chunks (chunks.py): adds alm_chunk int64 [n] and alm_teacher_ll float32 [C].
    # alignment "chunk" (``--loss alm``'s) is "offset" plus the chunks.
    alm_chunks: bool = False
    # ALM's debiasing (chunks.py): merge chunks at this teacher word-start probability and add
    # alm_end int64 [C] and alm_teacher_ws float32 [C]; the rows need ``word_start_logprob``.
    # None: plain chunks.
    alm_merge_threshold: float | None = None
    # A chat cache and a student with a chat template of its own (chat_view.py): each chat is
    # rendered the student's way, and paired with the teacher's by the assistant content.
    student_chat: bool = False
    message_train_field: str = "train"
    # "sample": the teacher columns carry the cache's draws instead of its top-k (sampled_targets)
    kd_targets: str = "topk"
    sample_width: int = 0  # the cache's N: every row's draws padded to it, so that batches stack
    stats: FeatureStats = field(default_factory=FeatureStats)

    def __post_init__(self) -> None:
        require_fast_tokenizer(self.tokenizer, "student tokenizer")
        if self.alignment == "chunk":
            self.alignment, self.alm_chunks = "offset", True
        if self.alignment not in ALIGNMENTS:
            raise LogitCacheError(f"--alignment {self.alignment!r}: use one of {', '.join(ALIGNMENTS)}.")
        if self.max_length is not None and self.max_length < 2:
            raise LogitCacheError(f"--max-length must be at least 2 tokens (got {self.max_length}).")
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self._eos_id: int | None = int(eos) if isinstance(eos, (int, np.integer)) else None
        self._student_bytes = _piece_bytes_of(self.tokenizer) if self.alignment != "position" else None

    def __call__(self, row: Row) -> dict[str, Any]:
        text = row["text"]
        spans = row_spans(row)  # v1 rows (and hand-made ones with prompt_chars alone): one span
        view = self._chat_view(row, text, spans)
        s_text, s_spans = (view.text, np.asarray(view.spans, dtype=np.int64).reshape(-1, 2)) if view else (text, spans)
        ids, s_starts, s_ends = encode_with_offsets(self.tokenizer, s_text, add_special_tokens=self.add_special_tokens)
        if self._eos_id is not None and (not ids or ids[-1] != self._eos_id):
            ids = ids + [self._eos_id]
            end = np.array([len(s_text)], dtype=s_starts.dtype)
            s_starts, s_ends = np.concatenate((s_starts, end)), np.concatenate((s_ends, end))
        ids = np.asarray(ids, dtype=np.int64)
        limit_chars = None
        if self.max_length is not None and len(ids) > self.max_length:
            ids, s_starts, s_ends = ids[: self.max_length], s_starts[: self.max_length], s_ends[: self.max_length]
            # Cut the teacher where the student's text ends, so both sides see the same text (in
            # its own rendering the student pairs only what it holds: nothing to cut).
            limit_chars = None if view else int(s_ends[-1])
            self.stats.truncated += 1
        n = len(ids)
        t_starts, t_ends = row["char_start"], row["char_end"]
        s_end = _end_of(ids, s_starts, s_ends, self._eos_id, len(s_text))
        t_end = _end_of(row["input_ids"], t_starts, t_ends, self.teacher_eos_id, len(text))
        # The text without the ends: the ends are targets of their own, paired with each other.
        n_s, n_t = n - s_end, len(t_starts) - t_end
        s_targets = target_positions(s_starts[:n_s], s_ends[:n_s], s_spans)
        t_targets = target_positions(t_starts[:n_t], t_ends[:n_t], spans, limit_chars)
        # The ends are targets when the last span reaches the end of the text (a chat ending with
        # a target turn; always for v1's one span).
        end_is_target = ends_at_text_end(spans, len(text))
        student_end = n_s - 1 if s_end and ends_at_text_end(s_spans, len(s_text)) else None
        teacher_end = n_t - 1 if t_end and s_end and end_is_target else None
        # KD pairs the student's targets in the teacher's text: the same offsets, or (a chat in
        # the student's own rendering) those of the shared assistant content, the rest CE only.
        kd_targets, a_starts, a_ends, a_end = s_targets, s_starts, s_ends, student_end
        if view is not None:
            a_starts, a_ends, mapped = view.to_teacher(s_starts, s_ends)
            kd_targets, a_end, teacher_end = s_targets[mapped[s_targets + 1]], None, None
        if self.alignment == "position":
            al = align_by_position(
                t_targets, kd_targets, max(n - 1, 0), teacher_target_ends=t_ends[t_targets + 1],
                student_target_ends=a_ends[kd_targets + 1], teacher_end=teacher_end, student_end=a_end,
                teacher_target_spans=target_span_index(t_starts, t_ends, t_targets, spans),
                student_target_spans=target_span_index(a_starts, a_ends, kd_targets, spans),
            )
        else:
            char_bytes = char_byte_offsets(text)
            t_tokens = row["input_ids"][:n_t]
            tb_start, tb_end, t_known = byte_spans(t_tokens, t_starts[:n_t], t_ends[:n_t], self.teacher_bytes, char_bytes)
            sb_start, sb_end, s_known = byte_spans(ids[:n_s], a_starts[:n_s], a_ends[:n_s], self._student_bytes, char_bytes)
            al = align_by_offset(
                tb_start, tb_end, t_targets, sb_start, sb_end, kd_targets, max(n - 1, 0),
                t_known=t_known, s_known=s_known, teacher_end=teacher_end, student_end=a_end,
            )
        if view is not None:  # the aligned fraction is of every target that gets CE
            al.targets += len(s_targets) - len(kd_targets) + (student_end is not None)

        labels = np.full(n, -100, dtype=np.int64)
        labels[s_targets + 1] = ids[s_targets + 1]
        if student_end is not None:
            labels[n - 1] = ids[n - 1]
        if self.kd_targets == "sample":
            row = sampled_targets(row, self.sample_width)
        k = row["topk_ids"].shape[1] if row["topk_ids"].ndim == 2 else 0
        t_lp = np.zeros((n, k), dtype=np.float16)
        t_ids = np.zeros((n, k), dtype=np.int32)
        kd_mask = np.zeros(n, dtype=bool)
        q = np.flatnonzero(al.teacher_pos >= 0)
        kd_mask[q] = True
        t_lp[q] = row["topk_logprobs"][al.teacher_pos[q]]
        t_ids[q] = row["topk_ids"][al.teacher_pos[q]]
        extras = teacher_extras(row, al.teacher_pos, n)
        if self.alm_chunks:  # the ends are targets too (chunks.py pairs them as a chunk of their own)
            from logitcache.pipeline.student.chunks import alm_chunks

            # (in the student's own rendering the ends are not paired: no teacher end either)
            t_all = np.append(t_targets, n_t - 1) if t_end and end_is_target and view is None else t_targets
            s_all = np.append(kd_targets, n_s - 1) if a_end is not None else kd_targets
            debias = self.alm_merge_threshold is not None
            c = alm_chunks(
                t_starts, t_ends, t_all, np.asarray(row["label_logprob"]), a_starts, a_ends, s_all, n,
                teacher_eos=t_end, student_eos=s_end,
                teacher_word_start=np.asarray(row["word_start_logprob"]) if debias else None,
                merge_threshold=self.alm_merge_threshold, target_spans=spans,
            )
            extras["alm_chunk"], extras["alm_teacher_ll"] = c.chunk, c.teacher_ll
            if debias:
                extras["alm_end"], extras["alm_teacher_ws"] = c.end, c.teacher_word_start

        self.stats.examples += 1
        self.stats.targets += al.targets
        self.stats.matched += al.matched
        self.stats.end_targets += al.end_targets
        self.stats.end_matched += al.end_matched
        self.stats.no_kd += al.matched == 0
        return {
            "id": row["id"],
            "input_ids": ids,
            "labels": labels,
            "teacher_logprobs": t_lp,
            "teacher_ids": t_ids,
            "kd_mask": kd_mask,
            **extras,
        }


    def _chat_view(self, row: Row, text: str, spans: np.ndarray):  # noqa: ANN202
        """The student's own rendering of the row's chat, or None (same text as the teacher's)."""
        if not self.student_chat or row.get("messages") is None:
            return None
        import json

        from logitcache.pipeline.student.chat_view import student_chat_view

        return student_chat_view(json.loads(row["messages"]), self.tokenizer, text, spans, self.message_train_field)

# --- extra teacher columns (issue 12 §1b, §2), gathered at the aligned teacher positions ---------


def sampled_targets(row: Row, width: int) -> Row:
    """``row`` with its draws (storage/samples.py) in place of its top-k: ids, and log(count / N)
    (padding: count 0, stored as float16's lowest, weight exp(-65504) = 0), so alignment carries them as it carries the top-k.
    float16 rounds the log-weight by at most 2**-9 relative (N <= 255): a 0.2 % weight error."""
    P = len(row["sample_counts"])
    counts = np.zeros((P, width), np.float32)
    ids = np.zeros((P, width), np.int32)
    have = np.asarray(row["sample_counts"]).reshape(P, -1)[:, :width]
    counts[:, : have.shape[1]] = have
    ids[:, : have.shape[1]] = np.asarray(row["sample_ids"]).reshape(P, -1)[:, :width]
    n = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        lp = np.maximum(np.log(counts / np.maximum(n, 1)), np.finfo(np.float16).min).astype(np.float16)
    return {**row, "topk_ids": ids, "topk_logprobs": lp}


def teacher_extras(row: Row, teacher_pos: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """The cache's optional per-position columns at each of the ``n`` student positions' aligned
    teacher position (``teacher_pos`` [<= n], -1 where none), only those the row has:

        teacher_lse       float32 [n]     the raw logits' log-normaliser (with lse_tau or the stats)
        teacher_lse_tau   float32 [n, M]  logsumexp(logits / tau) per manifest temperature
        teacher_logit_std float32 [n]     std of the logits over the vocabulary
        teacher_lse_std   float32 [n]     logsumexp(logits / (std + 1e-4))

    Unaligned positions hold 0 (std: 1, so that dividing by it stays finite); kd_mask masks them.
    The log-normaliser comes only with the columns that need it: a vllm cache has none (its
    logsumexp column holds 0), and neither lse_tau nor the stats.
    """
    has_tau, has_stats = "lse_tau" in row, "logit_std" in row and "lse_std" in row
    if not (has_tau or has_stats):
        return {}
    q = np.flatnonzero(teacher_pos >= 0)
    at = teacher_pos[q]

    def gather(column: np.ndarray, fill: float = 0.0) -> np.ndarray:
        out = np.full((n, *column.shape[1:]), fill, dtype=np.float32)
        out[q] = column[at]
        return out

    out = {"teacher_lse": gather(np.asarray(row["logsumexp"]))}
    if has_tau:
        out["teacher_lse_tau"] = gather(np.asarray(row["lse_tau"]).reshape(len(row["logsumexp"]), -1))
    if has_stats:
        out["teacher_logit_std"] = gather(np.asarray(row["logit_std"]), fill=1.0)
        out["teacher_lse_std"] = gather(np.asarray(row["lse_std"]))
    return out


# --- the cache's side: its tokenizer's bytes, and a refusal of students that align nothing ------


@functools.lru_cache(maxsize=8)
def _teacher_bytes_at(tokenizer_dir: str) -> PieceBytes:
    from logitcache.pipeline.loading import load_tokenizer

    # The cache's tokenizer is data from whoever wrote the cache: verified, and never runs code.
    return piece_bytes_table(load_tokenizer(tokenizer_dir, "the cache's tokenizer", trust_remote_code=False))


def teacher_piece_bytes(cache) -> PieceBytes | None:
    """The byte lengths of the cache tokenizer's tokens (``cache``: a CacheReader), loaded once per
    process; None when the cache holds no tokenizer (split characters then get CE only)."""
    if not cache.tokenizer_dir.is_dir():
        return None
    return _teacher_bytes_at(str(cache.verified_tokenizer_dir()))


def featurizer_for_cache(cache, tokenizer, alignment: str = "offset", max_length: int | None = None, *,
                         alm_merge_threshold: float | None = None, kd_targets: str = "topk") -> StudentFeaturizer:
    """The featurizer of ``cache`` (a CacheReader) for a student ``tokenizer``, as training uses it."""
    manifest = cache.manifest
    return StudentFeaturizer(
        tokenizer,
        alignment=alignment,
        max_length=max_length,
        add_special_tokens=manifest.template.get("add_special_tokens", True),
        teacher_bytes=teacher_piece_bytes(cache) if alignment != "position" else None,
        teacher_eos_id=getattr(manifest, "eos_id", None),
        alm_merge_threshold=alm_merge_threshold,
        kd_targets=kd_targets, sample_width=int(getattr(manifest, "sample", 0) or 0),
        student_chat=own_chat_template(manifest.template, tokenizer),
        message_train_field=manifest.template.get("message_train_field") or "train",
    )


def own_chat_template(template: dict[str, Any], tokenizer) -> bool:
    """Whether the student renders a chat cache's chats its own way: it has a chat template, and
    not the one the teacher's rendering used (the manifest's template records its sha256)."""
    from logitcache.pipeline.records import chat_template_sha256

    mine = getattr(tokenizer, "chat_template", None)
    if template.get("kind") != "messages" or not isinstance(mine, str):
        return False
    return chat_template_sha256(mine) != template.get("chat_template_sha256")
