"""A student with a chat template of its own: the cache's chat, rendered the student's way.

A chat cache holds the teacher's rendering of each chat (its template's role markers and
end-of-turn tokens) and the chat itself (the ``messages`` column). A student whose tokenizer
has a different chat template learns in its own format: the featurizer renders the same
messages with the student's template (``pipeline/chat.py``, so the student's targets are its
assistant turns through ITS end-of-turn marker), and pairs student and teacher positions by the
characters of the assistant content, which both renderings hold verbatim.

What happens to template tokens: the student's role markers and other glue are context (no CE,
no KD), as the teacher's are; its end-of-turn marker is part of its target (CE: the student
learns to stop its own way) but has no teacher counterpart (the teacher's marker is another
string), so it gets no KD. Tool calls, which each template writes its own way, likewise get CE
only. KD pairs only tokens that lie inside the shared assistant content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from logitcache.pipeline.chat import content_pieces, render_chat_turns

Span = tuple[int, int]


@dataclass
class ChatView:
    """The student's rendering of a chat and how its characters map onto the teacher's text.

    text: the student's rendering. spans: its target spans. segments: int64 [m, 3] rows of
    (student start, teacher start, length): runs of assistant content both texts hold.
    """

    text: str
    spans: tuple[Span, ...]
    segments: np.ndarray

    def to_teacher(self, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Student token spans [n] in teacher-text characters, and whether each maps at all.

        A token maps when it lies wholly inside one segment (an empty span: at or inside its
        ends); an unmapped token gets the empty span (0, 0), which pairs with nothing that
        reads the mask [n] (its student offsets could lie beyond the teacher's text).
        """
        starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        t_starts, t_ends = starts.copy(), ends.copy()
        mapped = np.zeros(len(starts), dtype=bool)
        for s0, t0, length in self.segments:
            inside = (starts >= s0) & (ends <= s0 + length) & ~mapped
            t_starts[inside] += t0 - s0
            t_ends[inside] += t0 - s0
            mapped |= inside
        t_starts[~mapped] = 0
        t_ends[~mapped] = 0
        return t_starts, t_ends, mapped


def student_chat_view(
    messages: Sequence[dict[str, Any]], tokenizer, teacher_text: str, teacher_spans: np.ndarray,
    train_key: str = "train",
) -> ChatView:
    """Render ``messages`` with the student's template and pair its assistant content with the teacher's.

    ``teacher_spans`` [m, 2]: the cache row's target spans, in the same order as the student's
    (both are the trained, non-empty assistant turns); a teacher text cut by --max-length holds
    fewer or shorter spans, and only what it still holds is paired.
    """
    text, turns = render_chat_turns(messages, tokenizer, train_key=train_key)
    segments = []
    for (message, (s_a, s_b)), (t_a, t_b) in zip(turns, np.asarray(teacher_spans).reshape(-1, 2).tolist()):
        pieces = content_pieces(message)
        content = pieces[0].strip() if pieces else ""
        s_at, t_at = _content_at(text, s_a, s_b, pieces), _content_at(teacher_text, t_a, t_b, pieces)
        if not content or s_at is None or t_at is None:
            continue  # nothing both hold verbatim (a tool call alone, a template that rewrites content)
        length = min(len(content), t_b - t_at)  # the teacher's text may be cut short (--max-length)
        if length > 0 and teacher_text[t_at : t_at + length] == content[:length]:
            segments.append((s_at, t_at, length))
    spans = tuple(span for _, span in turns)
    return ChatView(text, spans, np.asarray(segments, dtype=np.int64).reshape(-1, 3))


def _content_at(text: str, a: int, b: int, pieces: list[str]) -> int | None:
    """Where the message's content, without its outer whitespace, starts in the span [a, b).

    Spans start at the content (chat.py); a template may trim it (Llama-3's ``| trim``), so the
    content is looked for as given and trimmed; its outer whitespace is then left unpaired.
    """
    if not pieces:
        return None
    content = pieces[0]
    stripped = content.strip()
    if text.startswith(content, a):
        return a + len(content) - len(content.lstrip())
    if stripped and text.startswith(stripped[: max(0, b - a)], a):
        return a
    return None
