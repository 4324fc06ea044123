"""Token sequences of different lengths -> one padded batch. Shared by both stages."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its end-of-sequence id, else 0 (padding is masked anyway)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, both long [B, T] with T the longest sequence.

    ``side="left"`` puts every sequence's last token in the last column (what generation needs).
    """
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        input_ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[i, cols] = 1
    return input_ids, attention_mask
