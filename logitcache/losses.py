"""Shortcut for the distillation losses: ``from logitcache.losses import uld_loss``.

The implementations live in :mod:`logitcache.pipeline.student.losses`; this module re-exports
its public names (listed explicitly so editors and linters see them).
"""

from logitcache.pipeline.student.losses import (
    REDUCTIONS,
    REVERSE_KL_TEACHER_FLOOR,
    FusedLoss,
    MLOTConfig,
    ce_kd_loss,
    fused_linear_ce_kd_loss,
    fused_linear_supports,
    fused_supports,
    kd_weights,
    kl_loss,
    mlot_temperatures,
    multilevel_ot_loss,
    sampled_kl_loss,
    uld_loss,
)
from logitcache.pipeline.student.losses import ALMConfig, ALMTargets, HybridConfig, alm_loss, hybrid_loss

__all__ = [
    "REDUCTIONS", "REVERSE_KL_TEACHER_FLOOR", "FusedLoss", "MLOTConfig", "ce_kd_loss", "fused_supports",
    "kd_weights", "kl_loss", "mlot_temperatures", "multilevel_ot_loss", "sampled_kl_loss", "uld_loss",
    "ALMConfig", "ALMTargets", "HybridConfig", "alm_loss", "hybrid_loss",
    "fused_linear_ce_kd_loss", "fused_linear_supports",
]
