"""Distillation losses: plain functions on tensors, with explicit masks.

- :func:`uld_loss`: Universal Logit Distillation, any student tokenizer.
- :func:`multilevel_ot_loss` (+ :class:`MLOTConfig`): MultiLevelOT, any student tokenizer.
- :func:`kl_loss`: forward/reverse KL or JSD, for a student sharing the teacher's vocabulary.

All take the teacher as a top-K cache gives it (log-probabilities over the full teacher
vocabulary, K entries per position) and return the mean over masked-in positions; no
positions masked in gives exactly 0. They return only the KD term: the caller adds the
student's cross-entropy and the weights between the two.

- :func:`ce_kd_loss` (+ :class:`FusedLoss`): the trainer's CE + weight * KD in two passes
  over the logits, sharing one log-partition (ULD, KL, MultiLevelOT's paper variant).
"""

from logitcache.pipeline.student.losses.fused import FusedLoss, ce_kd_loss
from logitcache.pipeline.student.losses.fused import supports as fused_supports
from logitcache.pipeline.student.losses.kl import REVERSE_KL_TEACHER_FLOOR, kl_loss
from logitcache.pipeline.student.losses.mlot import MLOTConfig, multilevel_ot_loss
from logitcache.pipeline.student.losses.uld import uld_loss

__all__ = [
    "REVERSE_KL_TEACHER_FLOOR", "FusedLoss", "MLOTConfig", "ce_kd_loss", "fused_supports", "kl_loss",
    "multilevel_ot_loss", "uld_loss",
]
