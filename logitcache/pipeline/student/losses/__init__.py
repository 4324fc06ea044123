"""Distillation losses: plain functions on tensors, with explicit masks.

- :func:`uld_loss`: Universal Logit Distillation, any student tokenizer.
- :func:`multilevel_ot_loss` (+ :class:`MLOTConfig`): MultiLevelOT, any student tokenizer.
- :func:`kl_loss`: forward/reverse KL or JSD, for a student sharing the teacher's vocabulary.
- :func:`hybrid_loss` (+ :class:`HybridConfig`): TRL GOLD's hybrid, exact JSD on tokens both
  vocabularies share (``vocab_map``), ULD on the rest.
- :func:`alm_loss` (+ :class:`ALMConfig`): approximate likelihood matching of chunks (``chunks``).
- :func:`sampled_kl_loss`: forward KL to a cache's sampled targets (ids + count / N weights),
  Random Sampling KD's unbiased estimate of the full-vocabulary forward KL's gradient.

All take the teacher as a top-K cache gives it (log-probabilities over the full teacher
vocabulary, K entries per position) and return the KD term only: the caller adds the
student's cross-entropy and the weights between the two. No positions masked in gives
exactly 0. ULD and KL take [N, ...] rows and average them (the mean, or ``weights``:
:func:`kd_weights` gives the per-sequence "sample" mean of a [B, T] mask); MultiLevelOT takes
[B, T, ...] and a ``reduction``. At a ``temperature`` tau != 1 the teacher's log-probabilities
must be those at tau (exact from a cache: ``pipeline.student.targets``), the student is
``softmax(logits / tau)`` and the KD term is multiplied by tau**2.

- :func:`ce_kd_loss` (+ :class:`FusedLoss`): the trainer's CE + weight * KD in two passes
  over the logits, sharing one log-partition (ULD, KL, MultiLevelOT's paper variant).
- :func:`fused_linear_ce_kd_loss`: the same from the last hidden states and the LM head, block
  by block, never holding the [N, V] logits (CE, KL family, ULD, hybrid; MultiLevelOT and ALM in
  two passes, losses.fused_linear_coupled).
"""

from logitcache.pipeline.student.losses.chunking import REDUCTIONS, kd_weights
from logitcache.pipeline.student.losses.fused import FusedLoss, ce_kd_loss
from logitcache.pipeline.student.losses.fused import supports as fused_supports
from logitcache.pipeline.student.losses.fused_linear import fused_linear_ce_kd_loss
from logitcache.pipeline.student.losses.fused_linear import supports as fused_linear_supports
from logitcache.pipeline.student.losses.kl import REVERSE_KL_TEACHER_FLOOR, kl_loss
from logitcache.pipeline.student.losses.mlot import MLOTConfig, multilevel_ot_loss
from logitcache.pipeline.student.losses.mlot_parts import needed_temperatures as mlot_temperatures
from logitcache.pipeline.student.losses.sampled_kl import sampled_kl_loss
from logitcache.pipeline.student.losses.uld import uld_loss
# cross-tokenizer losses of issue 12 §3 (TRL GOLD's hybrid; ALM, arXiv 2503.20083).
from logitcache.pipeline.student.losses.alm import ALMConfig, ALMTargets, alm_loss
from logitcache.pipeline.student.losses.hybrid import HybridConfig, hybrid_loss

__all__ = [
    "REDUCTIONS", "REVERSE_KL_TEACHER_FLOOR", "FusedLoss", "MLOTConfig", "ce_kd_loss", "fused_supports",
    "kd_weights", "kl_loss", "mlot_temperatures", "multilevel_ot_loss", "sampled_kl_loss", "uld_loss",
    "ALMConfig", "ALMTargets", "HybridConfig", "alm_loss", "hybrid_loss",
    "fused_linear_ce_kd_loss", "fused_linear_supports",
]
