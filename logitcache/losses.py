"""Shortcut for the distillation losses: ``from logitcache.losses import uld_loss``.

The implementations live in :mod:`logitcache.pipeline.student.losses`; this module re-exports
its public names (listed explicitly so editors and linters see them).
"""

from logitcache.pipeline.student.losses import (
    REVERSE_KL_TEACHER_FLOOR,
    FusedLoss,
    MLOTConfig,
    ce_kd_loss,
    fused_supports,
    kl_loss,
    multilevel_ot_loss,
    uld_loss,
)

__all__ = [
    "REVERSE_KL_TEACHER_FLOOR", "FusedLoss", "MLOTConfig", "ce_kd_loss", "fused_supports", "kl_loss",
    "multilevel_ot_loss", "uld_loss",
]
