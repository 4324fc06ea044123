"""What each token id stands for in bytes, from a fast tokenizer's definition (both stages use it).

Tokenizer families write the same bytes differently (byte-level BPE writes a leading space
as 'Ġ' and every byte as a printable stand-in, SentencePiece writes it as '▁' and unknown
bytes as '<0xNN>'), so comparing tokens across tokenizers, or asking whether a token starts
a word, goes through the bytes a token stands for:

* byte-level BPE (a ByteLevel decoder): every character is GPT-2's ``bytes_to_unicode``
  stand-in for one byte; the token is those bytes.
* SentencePiece family (a Metaspace decoder, or a Replace of '▁' by ' '): '▁' is a space;
  with byte fallback, '<0xNN>' is the byte NN.
* anything else: the token string, UTF-8 encoded.
* special tokens (BOS, EOS, UNK, PAD, chat markers) stand for no bytes: ("special", role).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from logitcache.pipeline.offsets import byte_level_decoder, decoder_types

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
ROLES = ("eos_token", "bos_token", "unk_token", "pad_token")


def _decoder_kind(tokenizer) -> tuple[str, bool]:
    """("byte_level" | "metaspace" | "plain", byte_fallback) from the fast tokenizer's definition."""
    types = decoder_types(tokenizer)
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model") or {}
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
    if "ByteLevel" in types:
        return "byte_level", byte_fallback
    return ("metaspace" if types & {"Metaspace", "MetaspaceReplace"} else "plain"), byte_fallback


def token_keys(tokenizer) -> tuple[list[Any], list[bool]]:
    """Per id: the bytes it stands for (or ("special", name) for a special token), and whether
    it is a byte-fallback piece. Ids without a token (holes in the vocabulary) get None."""
    kind, byte_fallback = _decoder_kind(tokenizer)
    decoder = byte_level_decoder()
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    roles = {getattr(tokenizer, f"{r}_id", None): r for r in reversed(ROLES)}  # eos wins if ids coincide
    keys: list[Any] = []
    is_byte = []
    for i, piece in enumerate(pieces):
        fallback = False
        if piece is None:
            key = None
        elif i in special:
            key = ("special", roles.get(i, piece))
        elif kind == "byte_level" and all(c in decoder for c in piece):
            key = bytes(decoder[c] for c in piece)
        else:
            m = _BYTE_PIECE.match(piece) if byte_fallback else None
            if m:
                key, fallback = bytes([int(m.group(1), 16)]), True
            else:
                key = (piece.replace("\u2581", " ") if kind == "metaspace" else piece).encode("utf-8")
        keys.append(key)
        is_byte.append(fallback)
    return keys, is_byte


# ALM's debiasing (tokenkit's space_mask_mode "space+tab+newline+special"): the tokens after
# which a chunk's likelihood no longer depends on how either tokenizer would go on.
WORD_START_BYTES = frozenset(b" \t\n")


def word_start_mask(tokenizer, size: int | None = None) -> np.ndarray:
    """bool [size]: the ids whose token starts with a space, tab or newline byte, or is special.

    ``size``: the logits' width (default ``len(tokenizer)``); ids past the tokenizer (a padded
    embedding) are False.
    """
    keys, _ = token_keys(tokenizer)
    size = len(keys) if size is None else int(size)
    mask = np.zeros(size, dtype=bool)
    for i, key in enumerate(keys[:size]):
        if isinstance(key, tuple):
            mask[i] = True
        elif isinstance(key, bytes) and key[:1] and key[0] in WORD_START_BYTES:
            mask[i] = True
    return mask
