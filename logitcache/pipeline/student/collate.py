"""Pad student examples into batch tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


# Optional teacher columns (features.teacher_extras) -> their padding value.
_EXTRAS = {"teacher_lse": 0.0, "teacher_lse_tau": 0.0, "teacher_logit_std": 1.0, "teacher_lse_std": 0.0}


@dataclass
class KDCollator:
    """Pads a list of featurized examples (see features.py) on the right.

    Returns:
        input_ids [B, T] long, attention_mask [B, T] long, labels [B, T] long (-100 on
        prompt and padding), teacher_logprobs [B, T, K] float32, teacher_ids [B, T, K]
        long, kd_mask [B, T] bool, and, when the dataset tags examples for resuming,
        stream_worker / stream_index [B] long, and feature_counts [B, F] (FeatureStats.counts). When the cache has them (features.teacher_extras):
        teacher_lse [B, T], teacher_lse_tau [B, T, M], teacher_logit_std [B, T] and
        teacher_lse_std [B, T], float32 (padding: 0, std 1). For ALM (features' alm_chunks):
        alm_chunk [B, T] long (-1: no chunk) and alm_teacher_ll [B, C] float32 (padding: 0); with
        debiasing also alm_end [B, C] long (-1: none) and alm_teacher_ws [B, C] float32 (NaN: none).
    """

    pad_token_id: int = 0

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "_more" in examples[0]:
            first = [{k: v for k, v in e.items() if k != "_more"} for e in examples]
            batch = self(first)
            for j in range(len(examples[0]["_more"])):
                # each teacher's columns through the one-teacher path, on the same student tokens
                theirs = self([{"input_ids": e["input_ids"], "labels": e["labels"], **e["_more"][j]} for e in examples])
                for name, value in theirs.items():
                    if name not in ("input_ids", "attention_mask", "labels"):
                        batch[f"{name}_{j + 1}"] = value
            return batch
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
        for name, fill in _EXTRAS.items():
            if name in examples[0]:
                first = np.asarray(examples[0][name])
                padded = np.full((B, T, *first.shape[1:]), fill, dtype=np.float32)
                for i, e in enumerate(examples):
                    padded[i, : len(e[name])] = e[name]
                batch[name] = torch.from_numpy(padded)
        if "alm_chunk" in examples[0]:  # ALM's chunks (features.py), -1 / 0 on padding
            chunk = np.full((B, T), -1, dtype=np.int64)
            t_ll = np.zeros((B, max(1, max(len(e["alm_teacher_ll"]) for e in examples))), dtype=np.float32)
            for i, e in enumerate(examples):
                chunk[i, : len(e["alm_chunk"])] = e["alm_chunk"]
                t_ll[i, : len(e["alm_teacher_ll"])] = e["alm_teacher_ll"]
            batch["alm_chunk"], batch["alm_teacher_ll"] = torch.from_numpy(chunk), torch.from_numpy(t_ll)
            if "alm_end" in examples[0]:  # debiasing: no end (-1) and no word-start (NaN) on padding
                end = np.full(t_ll.shape, -1, dtype=np.int64)
                ws = np.full(t_ll.shape, np.nan, dtype=np.float32)
                for i, e in enumerate(examples):
                    end[i, : len(e["alm_end"])] = e["alm_end"]
                    ws[i, : len(e["alm_teacher_ws"])] = e["alm_teacher_ws"]
                batch["alm_end"], batch["alm_teacher_ws"] = torch.from_numpy(end), torch.from_numpy(ws)
        if "_counts" in examples[0]:  # each example's featurizer counts (features.FeatureStats.counts)
            batch["feature_counts"] = torch.from_numpy(np.stack([e["_counts"] for e in examples]))
        if "_worker" in examples[0]:
            batch["stream_worker"] = torch.tensor([e["_worker"] for e in examples], dtype=torch.long)
            batch["stream_index"] = torch.tensor([e["_index"] for e in examples], dtype=torch.long)
        return batch
