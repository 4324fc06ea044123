"""Target spans: which characters of an example's ``text`` students learn from (format v2).

A row's ``target_spans`` is an int32 array [m, 2] of [start, end) character ranges of ``text``:
sorted, non-overlapping (touching is allowed), each inside the text; m may be 0 (no targets).
Stored in v2 shards as two list<int32> columns, ``target_start`` and ``target_end`` (plain
Parquet lists: any reader gets them without a struct type). v2 keeps ``prompt_chars`` beside
them, written as the first span's start (``len(text)`` when there is none), so a tool that
reads the v1 column still finds where the first target starts.

v1 shards hold ``prompt_chars`` alone: a v1 row reads as the one span
``(prompt_chars, len(text))``, or none when ``prompt_chars`` is ``len(text)`` (a response cut
away by ``--max-length``; stage 1 never stored the -1 of an empty response, it skips those).

A v2 row also holds ``messages``: for a record that came from a chat (``--messages-field``),
the chat itself as JSON (null for any other record), so that a student with a chat template of
its own can render the same chat its way (pipeline/student/chat_view.py).

Pure numpy/pyarrow.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from logitcache.storage.lists import flat_list_column

SPAN_COLUMNS = ("target_start", "target_end")
CHAT_COLUMN = "messages"  # the chat a record was rendered from, as JSON; null for other records

Spans = np.ndarray  # int32 [m, 2]


def as_spans(spans: Sequence[Sequence[int]] | np.ndarray) -> Spans:
    """Any sequence of (start, end) pairs as an int32 [m, 2] array."""
    a = np.asarray(spans, dtype=np.int64)
    return a.reshape(-1, 2).astype(np.int32) if a.size else np.zeros((0, 2), np.int32)


def spans_from_prompt_chars(prompt_chars: int, n_chars: int) -> Spans:
    """A v1 row's spans: everything after the prompt, or none."""
    if prompt_chars < 0 or prompt_chars >= n_chars:
        return np.zeros((0, 2), np.int32)
    return np.array([[prompt_chars, n_chars]], dtype=np.int32)


def prompt_chars_of(spans: Spans, n_chars: int) -> int:
    """The v1 column's value for a v2 row: where the first target starts (the text's end if none)."""
    return int(spans[0, 0]) if len(spans) else n_chars


def single_span(spans: Spans, n_chars: int) -> bool:
    """Whether v1's ``prompt_chars`` says exactly this (nothing, or one span to the end of the text)."""
    return len(spans) == 0 or (len(spans) == 1 and int(spans[0, 1]) == n_chars)


def span_problem(spans: Spans, n_chars: int) -> str | None:
    """What is wrong with ``spans`` for a text of ``n_chars`` characters, or None."""
    if spans.ndim != 2 or spans.shape[1] != 2:
        return "target spans are not a list of [start, end] pairs"
    s, e = spans[:, 0].astype(np.int64), spans[:, 1].astype(np.int64)
    if ((s < 0) | (e > n_chars)).any():
        return f"a target span lies outside the text ({n_chars} characters)"
    if (e < s).any():
        return "a target span ends before it starts"
    if (s[1:] < e[:-1]).any():
        return "target spans overlap or are not sorted by start"
    return None


def ends_at_text_end(spans: Spans, n_chars: int) -> bool:
    """Whether the last span reaches the end of the text: the end-of-sequence token is then a target."""
    return bool(len(spans)) and int(spans[-1, 1]) >= n_chars


def spans_arrays(rows: Sequence[dict]) -> dict[str, pa.Array]:
    """The v2 span columns of ``rows`` (each with ``target_spans``, or v1's ``prompt_chars``)."""
    all_spans = [row_spans(r) for r in rows]
    out = {}
    for j, name in enumerate(SPAN_COLUMNS):
        chunks = [s[:, j] for s in all_spans]
        offsets = np.zeros(len(chunks) + 1, dtype=np.int32)
        np.cumsum([len(c) for c in chunks], out=offsets[1:])
        flat = np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, np.int32)
        out[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))
    out[CHAT_COLUMN] = pa.array([r.get(CHAT_COLUMN) for r in rows], pa.string())
    return out


def row_spans(row: dict) -> Spans:
    """A row's spans, whichever format it came from."""
    if "target_spans" in row:
        return as_spans(row["target_spans"])
    return spans_from_prompt_chars(int(row["prompt_chars"]), len(row["text"]))


def prompt_chars_column(rows: Sequence[dict]) -> pa.Array:
    """v1's column: as given for a v1 row, derived from the spans for a v2 row."""
    return pa.array([prompt_chars_of(as_spans(r["target_spans"]), len(r["text"])) if "target_spans" in r
                     else int(r["prompt_chars"]) for r in rows], pa.int32())


def decode_spans(batch: pa.RecordBatch, texts: list[str] | None) -> list[Spans] | None:
    """Per row of ``batch`` its spans: from v2's columns, or v1's ``prompt_chars`` (None: neither read)."""
    names = batch.schema.names
    if all(n in names for n in SPAN_COLUMNS):
        (starts, s_off), (ends, e_off) = (flat_list_column(batch.column(names.index(n))) for n in SPAN_COLUMNS)
        out = []
        for i in range(batch.num_rows):
            s, e = starts[s_off[i]:s_off[i + 1]], ends[e_off[i]:e_off[i + 1]]
            m = min(len(s), len(e))  # equal in a sound shard (span_problems checks it)
            out.append(np.stack([s[:m], e[:m]], axis=1).astype(np.int32))
        return out
    if "prompt_chars" in names and texts is not None:
        pcs = batch.column(names.index("prompt_chars")).to_pylist()
        return [spans_from_prompt_chars(p, len(t)) for p, t in zip(pcs, texts)]
    return None


def span_problems(batch: pa.RecordBatch) -> list[str]:
    """One message for the rows of a v2 batch whose spans are malformed (naming the first); empty for v1."""
    names = batch.schema.names
    if not all(n in names for n in SPAN_COLUMNS) or "text" not in names or not batch.num_rows:
        return []
    texts = batch.column(names.index("text"))
    n_chars = pc.utf8_length(texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts).to_numpy()
    prompt = batch.column(names.index("prompt_chars")).to_numpy() if "prompt_chars" in names else None
    (_, s_off), (_, e_off) = (flat_list_column(batch.column(names.index(n))) for n in SPAN_COLUMNS)
    bad_rows, first, what = 0, None, ""
    for i, spans in enumerate(decode_spans(batch, None)):
        n = int(n_chars[i])
        if s_off[i + 1] - s_off[i] != e_off[i + 1] - e_off[i]:
            problem = "target_start and target_end hold different numbers of values"
        else:
            problem = span_problem(spans, n)
        if problem is None and prompt is not None and int(prompt[i]) != prompt_chars_of(spans, n):
            problem = "prompt_chars is not the first target span's start"
        if problem:
            bad_rows += 1
            if first is None:
                first, what = batch.column(names.index("id"))[i].as_py(), problem
    if not bad_rows:
        return []
    return [f"{bad_rows} rows with bad target spans: {what} (first: id {first!r})"]


def chat_problems(batch: pa.RecordBatch) -> list[str]:
    """One message for the rows whose ``messages`` is not null and not a JSON list of messages."""
    import json

    names = batch.schema.names
    if CHAT_COLUMN not in names:
        return []
    bad, first = 0, None
    for i, value in enumerate(batch.column(names.index(CHAT_COLUMN)).to_pylist()):
        if value is None:
            continue
        try:
            chat = json.loads(value)
            ok = isinstance(chat, list) and all(isinstance(m, dict) for m in chat)
        except ValueError:
            ok = False
        if not ok:
            bad += 1
            first = first if first is not None else batch.column(names.index("id"))[i].as_py()
    return [f"{bad} rows whose messages are not a JSON list of messages (first: id {first!r})"] if bad else []
