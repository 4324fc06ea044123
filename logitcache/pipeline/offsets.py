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

import functools
from dataclasses import dataclass
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


# Tokenizing a prefix of a text gives the whole text's first tokens as long as the cut lies well
# behind them: a tokenizer decides each token from a bounded neighbourhood (a pre-tokenized word,
# a merge window). This many tokens past the ones kept stand between the cut and them.
PREFIX_MARGIN_TOKENS = 64


def encode_prefix_with_offsets(
    tokenizer, text: str, max_tokens: int | None, *, add_special_tokens: bool = True,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``encode_with_offsets`` for a caller that keeps at most ``max_tokens`` tokens.

    Why: a 100 MB record tokenized whole with offsets takes gigabytes before any truncation.
    Here prefixes of growing length (x4) are tokenized until one holds more than
    ``max_tokens + PREFIX_MARGIN_TOKENS`` tokens, or the whole text is; the work is bounded by
    the characters of about ``max_tokens`` tokens, not by ``len(text)``. The first
    ``max_tokens`` tokens and spans are the whole text's; later ones may differ (near the
    cut) and must be dropped by the caller. ``max_tokens`` None: the whole text.
    """
    if max_tokens is not None:
        chars = 8 * (max_tokens + PREFIX_MARGIN_TOKENS)
        while chars < len(text):
            ids, starts, ends = encode_with_offsets(tokenizer, text[:chars], add_special_tokens=add_special_tokens)
            if len(ids) > max_tokens + PREFIX_MARGIN_TOKENS:
                return ids, starts, ends
            chars *= 4
    return encode_with_offsets(tokenizer, text, add_special_tokens=add_special_tokens)


def encode_suffix_with_offsets(
    tokenizer, text: str, max_tokens: int, *, add_special_tokens: bool = True,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The last ``max_tokens`` tokens of ``encode_with_offsets(text)``, spans in ``text``'s characters.

    Why: a prompt cut from the left (``--truncate-prompts``) keeps its end, and tokenizing a
    100 MB prompt whole takes gigabytes. As :func:`encode_prefix_with_offsets` grows prefixes,
    this tokenizes ends of growing length (x4) until one holds more than
    ``max_tokens + PREFIX_MARGIN_TOKENS`` tokens, or the whole text is: the tokens near the cut
    (and an added BOS) may differ from the whole text's, the margin keeps them out of the tail.
    A token may span many characters, hence tokens are counted, never guessed from characters.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive (got {max_tokens})")
    chars = 8 * (max_tokens + PREFIX_MARGIN_TOKENS)
    while chars < len(text):
        cut = len(text) - chars
        ids, starts, ends = encode_with_offsets(tokenizer, text[cut:], add_special_tokens=add_special_tokens)
        if len(ids) > max_tokens + PREFIX_MARGIN_TOKENS:
            return ids[-max_tokens:], (starts[-max_tokens:] + cut).astype(np.int32), (ends[-max_tokens:] + cut).astype(np.int32)
        chars *= 4
    ids, starts, ends = encode_with_offsets(tokenizer, text, add_special_tokens=add_special_tokens)
    return ids[-max_tokens:], starts[-max_tokens:], ends[-max_tokens:]


# --- bytes -------------------------------------------------------------------------------------
#
# Character spans cannot tell the pieces of a split character apart: every later piece has an
# empty span at the character's end. Offset alignment pairs tokens by the BYTES of the UTF-8 text
# they stand for, which needs each token's byte length: a property of the tokenizer, one table
# per tokenizer, built once per process.


@dataclass(frozen=True)
class PieceBytes:
    """Per token id, how many bytes of the UTF-8 text the token stands for.

    ``nbytes`` is -1 where that is unknown: the token then stands for the characters of its span
    if it has whole ones, and for nothing a pairing can rely on if it is a piece of a split
    character. ``added`` marks added tokens (special or not): one with an empty span was put
    there by the tokenizer (BOS, EOS) and stands for no text, one with a span for its characters.
    """

    nbytes: np.ndarray  # int32 [V]
    added: np.ndarray  # bool [V]
    kind: str  # "byte_level" | "sentencepiece" | "unknown"


def decoder_types(tokenizer) -> set[str]:
    """The ``type`` of a fast tokenizer's decoder and of every decoder it chains, plus
    "MetaspaceReplace" for a Replace that puts back SentencePiece's '▁' (older Llama files)."""
    import json

    def walk(d) -> set[str]:
        if not isinstance(d, dict):
            return set()
        kinds = {str(d.get("type"))}
        if d.get("type") == "Replace" and METASPACE in json.dumps(d.get("pattern"), ensure_ascii=False):
            kinds.add("MetaspaceReplace")
        for sub in d.get("decoders") or []:
            kinds |= walk(sub)
        return kinds

    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    try:
        return walk(json.loads(decoder.__getstate__()))
    except Exception:  # an exotic decoder: no byte lengths, whole characters still pair
        return set()


@functools.lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: printable stand-in character of a byte-level BPE piece -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def piece_bytes_table(tokenizer) -> PieceBytes:
    """The byte length of every token of a fast tokenizer.

    * byte-level BPE (GPT-2, Llama-3, Tekken: a ByteLevel decoder): every character of a piece
      is one byte (GPT-2's ``bytes_to_unicode``, inverted), so lengths are exact, including
      pieces that end one character and start the next;
    * SentencePiece style (Metaspace / byte fallback): a ``<0xNN>`` piece is one byte; other
      pieces cover whole characters, so their characters are used (unknown here; this also
      keeps the dummy-prefix '▁' and a literal '▁' in the text right);
    * anything else: unknown, so whole characters pair and pieces of split characters do not.
    """
    vocab = tokenizer.get_vocab()
    size = max(max(vocab.values(), default=-1) + 1, len(tokenizer))
    nbytes = np.full(size, -1, dtype=np.int32)
    added = np.zeros(size, dtype=bool)
    kinds = decoder_types(tokenizer)
    kind = "byte_level" if "ByteLevel" in kinds else (
        "sentencepiece" if kinds & {"Metaspace", "ByteFallback", "MetaspaceReplace"} else "unknown")
    if kind == "byte_level":
        byte_of = byte_level_decoder()
        for piece, i in vocab.items():
            if all(c in byte_of for c in piece):
                nbytes[i] = len(piece)
    elif kind == "sentencepiece":
        for piece, i in vocab.items():
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                nbytes[i] = 1
    added_vocab = dict(tokenizer.get_added_vocab())
    for i in getattr(tokenizer, "all_special_ids", []) or []:
        added_vocab.setdefault(tokenizer.convert_ids_to_tokens(i), i)
    for content, i in added_vocab.items():
        if 0 <= i < size:
            added[i] = True
            nbytes[i] = len(content.encode("utf-8", "surrogatepass"))
    return PieceBytes(nbytes=nbytes, added=added, kind=kind)


def char_byte_offsets(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: the UTF-8 byte offset of every character index of ``text``."""
    if text.isascii():
        return np.arange(len(text) + 1, dtype=np.int64)
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    out = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000), out=out[1:])
    return out


def byte_spans(
    ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, table: PieceBytes | None, char_bytes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The UTF-8 byte range every token stands for, and whether it is known.

    Args:
        ids, starts, ends: [n] token ids and their normalised character spans (see above).
        table: the tokenizer's :func:`piece_bytes_table` (None: all lengths unknown).
        char_bytes: :func:`char_byte_offsets` of the text.
    Returns:
        ``(byte_start, byte_end, known)``, int64, int64, bool [n]. Where ``known``, the token
        stands for exactly ``text.encode()[byte_start:byte_end]`` (empty for an added token the
        tokenizer put in: BOS, EOS); where not, it must not be paired by bytes.

    Tokens tile the bytes of the text, so each ends where the next starts, and none ends past the
    end of its character span: ``end[i] = min(start[i+1], bytes of ends[i])``, solved backwards in
    one vectorised pass (a reversed running minimum). The spans anchor it again after anything
    that is not byte-exact (a gap, a normaliser, an unknown length), and a range that does not fit
    its character span (it must end inside the span's last character and start inside the
    character before the span's first, or at it) is marked unknown.
    """
    ids = np.asarray(ids, dtype=np.int64)
    s = np.asarray(starts, dtype=np.int64)
    e = np.asarray(ends, dtype=np.int64)
    n = len(ids)
    empty = s == e
    if table is None or n == 0:
        length = np.full(n, -1, dtype=np.int64)
        added = np.zeros(n, dtype=bool)
    elif n and 0 <= ids.min() and ids.max() < len(table.nbytes):
        length = table.nbytes[ids].astype(np.int64)
        added = table.added[ids]
    else:
        inside = (ids >= 0) & (ids < len(table.nbytes))
        safe = np.where(inside, ids, 0)
        length = np.where(inside, table.nbytes[safe], -1).astype(np.int64)
        added = inside & table.added[safe]
    if len(char_bytes) == char_bytes[-1] + 1:
        # ASCII: no character is split, every span is its bytes (what the general pass gives, faster).
        return s, e, ~empty | added
    cs, ce = char_bytes[s], char_bytes[e]
    unknown = (length < 0) & ~added
    # an added token stands for its span's characters (none when the tokenizer put it in)
    length = np.where(added | unknown, ce - cs, length)
    csum = np.cumsum(length)
    end = csum + np.minimum.accumulate((ce - csum)[::-1])[::-1]  # never past ce, by construction
    start = np.maximum(end - length, 0)  # a prefix space ('Ġ' or '▁' the text lacks) stands for no byte

    last_char = char_bytes[np.maximum(e - 1, 0)]
    before_first = char_bytes[np.maximum(s - 1, 0)]
    whole = ~empty & (end > last_char) & (start <= cs) & ((s == 0) | (start > before_first))
    # A token of unknown length is trusted only for whole characters, and not when it is the
    # first piece of a split character (the next token is a later piece of it).
    next_is_piece = np.zeros(n, dtype=bool)
    next_is_piece[:-1] = empty[1:] & ~added[1:]
    whole &= ~unknown | ((start == cs) & (end == ce) & ~next_is_piece)
    piece = empty & ~added & ~unknown & (length > 0) & (e > 0) & (start > last_char)
    known = whole | piece | (empty & added)
    return start, end, known
