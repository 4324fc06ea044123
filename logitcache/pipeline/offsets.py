"""Character spans of tokens, normalised so that they tile the text.

Fast tokenizers report, per token, the span of *characters* it came from. Raw spans
overlap where a token covers only part of a character (byte-level BPE splits "è" or an
emoji into byte tokens, SentencePiece byte-fallback emits <0xNN> tokens): every such
token reports the whole character. They leave gaps where a tokenizer trims whitespace
from a span or a normaliser drops characters. Special tokens added by the tokenizer
(BOS, EOS) report an empty span.

We normalise them with one rule, used for teacher (stage 1) and student (stage 2) alike,
so spans of different tokenizers are comparable:

* spans are non-overlapping and in order: a character covered by several tokens belongs
  to the **first** of them; the later ones get an empty span at the end of the earlier
  one. (A token that covers part of a character thus gets the whole character if it is
  the first piece, else nothing.)
* a gap before a token belongs to that token (the 'Ġ' of byte-level BPE and the '▁' of
  SentencePiece mark exactly that: the space is part of the following token);
* a token with an empty raw span (added special token) gets an empty span where the
  previous token ended;
* SentencePiece's dummy prefix: a stand-alone '▁' token that stands for no character of
  the text (the tokenizer reports the span of the character after it, which the next token
  reports too) gets an empty span too, so that character goes to the token that carries it.
  A '▁' token that is a space of the text, or a literal '▁' character, keeps its span.

So concatenating ``text[start:end]`` over all tokens gives ``text`` up to the last
token's end, and ``text[start:end]`` is the token's surface text whenever the token
covers whole characters.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from logitcache.errors import LogitCacheError


def normalize_offsets(raw: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Turn a fast tokenizer's ``offset_mapping`` into tiling spans.

    Args:
        raw: per token ``(start, end)`` character offsets, as returned with
            ``return_offsets_mapping=True``.

    Returns:
        ``(char_start, char_end)``, int32 arrays of ``len(raw)`` entries.
    """
    n = len(raw)
    starts = np.empty(n, dtype=np.int32)
    ends = np.empty(n, dtype=np.int32)
    prev = 0
    for i, (s, e) in enumerate(raw):
        if e <= s or e <= prev:
            # Added special token, or a later piece of a character already given away.
            starts[i] = ends[i] = prev
            continue
        starts[i] = prev
        ends[i] = prev = e
    return starts, ends


def require_fast_tokenizer(tokenizer, what: str = "tokenizer") -> None:
    """Offsets come from the Rust tokenizers; a slow (Python) tokenizer has none."""
    if not getattr(tokenizer, "is_fast", False):
        raise LogitCacheError(
            f"the {what} {getattr(tokenizer, 'name_or_path', '')!r} is a slow tokenizer without character "
            "offsets; logitcache needs a fast one (a tokenizer.json): load it with use_fast=True or convert it "
            "with `transformers.convert_slow_tokenizer`."
        )


METASPACE = "\u2581"  # '▁'


def encode_with_offsets(tokenizer, text: str, *, add_special_tokens: bool = True) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Token ids of ``text`` and their normalised character spans."""
    require_fast_tokenizer(tokenizer)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    raw = list(enc["offset_mapping"])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    for i, piece in enumerate(pieces[:-1]):
        (s, e), (next_s, next_e) = raw[i], raw[i + 1]
        # The dummy prefix: the next token reports the same character. (Telling it by the
        # character instead fails on a text that starts with '\n' or '\u3000', where the dummy
        # '▁' would take the character from its token, and on a literal '▁' in the text.)
        if piece == METASPACE and e > s and next_s <= s < next_e:
            raw[i] = (s, s)
    starts, ends = normalize_offsets(raw)
    return ids, starts, ends
