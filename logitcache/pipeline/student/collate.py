"""Pad student examples into batch tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class KDCollator:
    """Pads a list of featurized examples (see features.py) on the right.

    Returns:
        input_ids [B, T] long, attention_mask [B, T] long, labels [B, T] long (-100 on
        prompt and padding), teacher_logprobs [B, T, K] float32, teacher_ids [B, T, K]
        long, kd_mask [B, T] bool, and, when the dataset tags examples for resuming,
        stream_worker / stream_index [B] long.
    """

    pad_token_id: int = 0

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        B = len(examples)
        T = max(len(e["input_ids"]) for e in examples)
        K = examples[0]["teacher_logprobs"].shape[1]
        input_ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        attention = np.zeros((B, T), dtype=np.int64)
        labels = np.full((B, T), -100, dtype=np.int64)
        t_lp = np.zeros((B, T, K), dtype=np.float32)
        t_ids = np.zeros((B, T, K), dtype=np.int64)
        kd_mask = np.zeros((B, T), dtype=bool)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = e["input_ids"]
            attention[i, :n] = 1
            labels[i, :n] = e["labels"]
            t_lp[i, :n] = e["teacher_logprobs"]
            t_ids[i, :n] = e["teacher_ids"]
            kd_mask[i, :n] = e["kd_mask"]
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels),
            "teacher_logprobs": torch.from_numpy(t_lp),
            "teacher_ids": torch.from_numpy(t_ids),
            "kd_mask": torch.from_numpy(kd_mask),
        }
        if "_worker" in examples[0]:
            batch["stream_worker"] = torch.tensor([e["_worker"] for e in examples], dtype=torch.long)
            batch["stream_index"] = torch.tensor([e["_index"] for e in examples], dtype=torch.long)
        return batch
