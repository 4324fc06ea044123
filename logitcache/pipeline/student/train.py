"""Stage 2 training on transformers' Trainer: CE + λ·KD from the cache.

Checkpoints, resume, logging, mixed precision and torchrun/accelerate DDP come from the
Trainer. What we add: the KD term in ``compute_loss``, our streaming dataset (each rank
reads its own part of the cache, so the dataloader is not re-sharded by accelerate), and
the dataset's position saved with every checkpoint so a resumed job continues mid-epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from logitcache.errors import LogitCacheError
from logitcache.pipeline.progress import StepProgress, is_terminal, trainer_progress
from logitcache.pipeline.student import fused_head, losses
from logitcache.pipeline.student.config import (  # noqa: F401  (re-exported: the public names stay here)
    DEFAULT_ALIGNMENT, LOSSES, TRACKERS, TrainConfig, check_trackers, coerce_config_value, load_config_file,
)

# Optional per-position teacher columns of a batch (collate.py), read by teacher_targets().
TEACHER_EXTRAS = ("teacher_lse", "teacher_lse_tau", "teacher_logit_std", "teacher_lse_std")
DATA_STATE = "logitcache_data_state_rank{rank}.json"
AUTO_CHUNK_ELEMENTS = 2**27  # 512 MiB of fp32 logits: below it one pass is faster and fits


def causal_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits [B, T, V] at position q score labels[q + 1]."""
    shifted = labels[:, 1:]
    if not (shifted != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)


def teacher_targets(
    cfg: TrainConfig, teacher_logprobs: torch.Tensor, extras: dict[str, torch.Tensor], temperatures: list[float]
) -> tuple[dict[float, torch.Tensor], torch.Tensor | None]:
    """The teacher's exact targets that ``cfg``'s KD term needs besides its temperature-1 log-probabilities.

    Args:
        teacher_logprobs: [B, T, K]. extras: the batch's TEACHER_EXTRAS present (collate.py).
        temperatures: the cache's extra temperatures (manifest), the order of ``teacher_lse_tau``.

    Returns:
        ({tau: [B, T, K] log-probabilities at tau}, [B, T, K] std-normalised log-probabilities
        or None). A temperature the batch lacks is left out (check_compatibility refused the
        run unless MultiLevelOT's --approximate-temperature allows it).
    """
    from logitcache.pipeline.student import targets

    tempered: dict[float, torch.Tensor] = {}
    if "teacher_lse_tau" in extras:
        for tau in cfg.teacher_temperatures():
            if any(abs(t - tau) <= 1e-9 * max(1.0, tau) for t in temperatures):
                column = extras["teacher_lse_tau"][..., targets.tau_column(temperatures, tau)]
                tempered[tau] = targets.tempered_logprobs(teacher_logprobs, extras["teacher_lse"], column, tau)
    std_lp = None
    if cfg.loss == "mlot" and cfg.mlot_variant == "code" and "teacher_lse_std" in extras:
        std_lp = targets.std_normalised_logprobs(
            teacher_logprobs, extras["teacher_lse"], extras["teacher_logit_std"], extras["teacher_lse_std"]
        )
    return tempered, std_lp


def kd_term(
    cfg: TrainConfig,
    logits: torch.Tensor,
    t_lp: torch.Tensor,
    t_ids: torch.Tensor,
    mask: torch.Tensor,
    tempered: dict[float, torch.Tensor] | None = None,
    std_logprobs: torch.Tensor | None = None,
    matched_fraction: float = 1.0,
) -> torch.Tensor:
    """The KD loss of ``cfg.loss`` on logits [B, T, Vs] against aligned teacher top-k [B, T, K].

    ``tempered`` / ``std_logprobs``: the exact teacher targets of :func:`teacher_targets`.
    """
    if not mask.any():
        return logits.sum() * 0.0
    logits = logits.float()
    if cfg.loss == "mlot":
        return losses.multilevel_ot_loss(
            logits, t_lp, t_ids, mask, cfg.mlot_config(), tempered=tempered, std_logprobs=std_logprobs,
            reduction=cfg.kd_reduction,
        )
    tau = float(cfg.kd_temperature)
    if tau != 1.0:
        if not tempered or tau not in tempered:
            raise LogitCacheError(f"--kd-temperature {tau:g}: the batch has no teacher log-normaliser at {tau:g}; "
                                  f"rewrite the cache with `logitcache teacher --temperatures {tau:g}`.")
        t_lp = tempered[tau]
    weights = losses.kd_weights(mask, cfg.kd_reduction, dtype=logits.dtype)[mask]
    s, lp, ids = logits[mask], t_lp[mask], t_ids[mask]
    ones = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    if cfg.kd_targets == "sample":  # features.py put the draws here: ids, log(count / N)
        return losses.sampled_kl_loss(s, ids, lp.float().exp(), ones, weights=weights)
    chunk = cfg.kd_chunk_size or (1024 if s.numel() > AUTO_CHUNK_ELEMENTS else None)
    if cfg.loss == "uld":
        return losses.uld_loss(s, lp, ones, temperature=tau, weights=weights, chunk_size=chunk)
    if cfg.loss == "hybrid":  # t_ids are the mapped student ids here
        h = _extra_loss_configs(cfg, matched_fraction)["hybrid"]
        return losses.hybrid_loss(s, lp, ids, ones, beta=h.beta, matched_weight=h.matched_weight,
                                  unmatched_weight=h.unmatched_weight, weights=weights, chunk_size=chunk,
                                  temperature=tau)
    return losses.kl_loss(s, lp, ids, ones, kind=cfg.kl_kind, temperature=tau, weights=weights, chunk_size=chunk)


def _extra_loss_configs(cfg: TrainConfig, matched_fraction: float) -> dict[str, Any]:
    """the hybrid's weights resolved (GOLD's adaptive ones from the vocabulary map) and ALM's config."""
    w_m, w_u = losses.HybridConfig(matched_weight=cfg.hybrid_matched_weight, unmatched_weight=cfg.hybrid_unmatched_weight).weights(matched_fraction)
    return {
        "hybrid": losses.HybridConfig(beta=cfg.hybrid_beta, matched_weight=w_m, unmatched_weight=w_u),
        "alm": losses.ALMConfig(temperature=cfg.alm_temperature, divergence=cfg.alm_divergence, mode=cfg.alm_mode,
                                merge_threshold=cfg.alm_merge_threshold),
    }


def fused_loss_of(cfg: TrainConfig, matched_fraction: float = 1.0, supports=None) -> "losses.FusedLoss | None":  # noqa: ANN001
    """The one-pass CE + KD of ``cfg`` (see losses.fused), or None where only the two-step path exists.

    ``--kd-chunk-size`` asks for the standalone chunked losses explicitly, so it turns fusing off.
    ``matched_fraction``: the hybrid's vocabulary map's share of the teacher vocabulary (its
    adaptive weights). ``supports``: which fused loss is meant (default ``losses.fused_supports``;
    :func:`linear_loss_of` asks the hidden-state loss's).
    """
    spec = losses.FusedLoss(
        loss=cfg.loss, weight=cfg.kd_weight, kl_kind=cfg.kl_kind,
        mlot=cfg.mlot_config(),
        temperature=float(cfg.kd_temperature) if cfg.loss in ("uld", "kl", "hybrid") else 1.0,
        reduction=cfg.kd_reduction,
        **_extra_loss_configs(cfg, matched_fraction),
    )
    supports = supports or losses.fused_supports
    # Sampled targets take the standalone path after CE (losses/sampled_kl.py), not the fused pass.
    return spec if supports(spec) and not cfg.kd_chunk_size and cfg.kd_targets == "topk" else None


def linear_loss_of(cfg: TrainConfig, matched_fraction: float = 1.0) -> "losses.FusedLoss | None":
    """The CE + KD that ``--fused-linear`` computes from the hidden states (losses.fused_linear), or None.

    Also where the logits path has no fused pass (MultiLevelOT "code": CE, then the standalone loss).
    """
    return fused_loss_of(cfg, matched_fraction, losses.fused_linear_supports)


def batch_loss(
    cfg: TrainConfig,
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    kd_mask: torch.Tensor,
    fused: "losses.FusedLoss | None",
    tempered: dict[float, torch.Tensor] | None = None,
    std_logprobs: torch.Tensor | None = None,
    alm: "losses.ALMTargets | None" = None,
    matched_fraction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE + kd_weight * KD, CE, KD) of a batch: logits [B, T, V], labels [B, T], teacher [B, T, K], kd_mask [B, T].

    ``fused`` is ``fused_loss_of(cfg)``: the one-pass loss where it exists, else CE then the
    standalone KD loss. ``tempered`` / ``std_logprobs``: :func:`teacher_targets`.
    """
    if fused is not None:
        return losses.ce_kd_loss(logits, labels, teacher_logprobs, teacher_ids, kd_mask, fused, tempered=tempered, alm=alm)
    ce = causal_ce(logits, labels)
    kd = standalone_kd(cfg, logits, labels, TeacherBatch(teacher_logprobs, teacher_ids, kd_mask, tempered, std_logprobs,
                                                          alm, matched_fraction))
    return ce + cfg.kd_weight * kd, ce, kd


@dataclass
class TeacherBatch:
    """One teacher's targets for a batch (its own alignment): [B, T, K] top-k, kd_mask [B, T], and
    the exact targets of :func:`teacher_targets`, ALM's chunks, the hybrid's matched share."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    kd_mask: torch.Tensor
    tempered: dict[float, torch.Tensor] | None = None
    std_logprobs: torch.Tensor | None = None
    alm: "losses.ALMTargets | None" = None
    matched_fraction: float = 1.0


def standalone_kd(cfg: TrainConfig, logits: torch.Tensor, labels: torch.Tensor, t: TeacherBatch) -> torch.Tensor:
    """The KD term of ``cfg.loss`` against one teacher, without CE (plain autograd; 0 for sft)."""
    if cfg.loss == "alm":  # ALM needs only the label log-probs: the standalone path is plain autograd
        alm = t.alm
        return losses.alm_loss(logits.float(), labels, alm.chunk_index, alm.teacher_ll, _extra_loss_configs(cfg, 1.0)["alm"],
                               reduction=cfg.kd_reduction, end=alm.end, teacher_word_start=alm.teacher_word_start,
                               word_start_mask=alm.word_start_mask)
    if cfg.loss == "sft":
        return logits.new_zeros((), dtype=torch.float32)
    return kd_term(cfg, logits, t.logprobs, t.ids, t.kd_mask, t.tempered, t.std_logprobs, t.matched_fraction)


def teachers_loss(
    cfg: TrainConfig,
    logits: torch.Tensor,
    labels: torch.Tensor,
    teachers: list[TeacherBatch],
    weights: list[float],
    fused: "losses.FusedLoss | None",
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(CE + kd_weight · Σ_j w_j · KD_j, CE, [KD_j]) of a batch with one or several teachers.

    One teacher at weight 1 is :func:`batch_loss` itself. With several, CE and the first
    teacher's KD share the fused pass (its weight scaled by w_0), and each other teacher's KD is
    the standalone loss: a second fused pass would add CE (and its gradient) once more.
    """
    if len(teachers) == 1 and weights == [1.0]:
        t = teachers[0]
        loss, ce, kd = batch_loss(cfg, logits, labels, t.logprobs, t.ids, t.kd_mask, fused, t.tempered, t.std_logprobs,
                                  alm=t.alm, matched_fraction=t.matched_fraction)
        return loss, ce, [kd]
    first = teachers[0]
    if fused is not None:
        spec = dataclasses.replace(fused, weight=cfg.kd_weight * weights[0])
        loss, ce, kd = losses.ce_kd_loss(logits, labels, first.logprobs, first.ids, first.kd_mask, spec,
                                         tempered=first.tempered, alm=first.alm)
    else:
        ce = causal_ce(logits, labels)
        kd = standalone_kd(cfg, logits, labels, first)
        loss = ce + cfg.kd_weight * weights[0] * kd
    kds = [kd]
    for w, t in zip(weights[1:], teachers[1:]):
        kd = standalone_kd(cfg, logits, labels, t)
        loss = loss + cfg.kd_weight * w * kd
        kds.append(kd)
    return loss, ce, kds


def _first_sequence(t: TeacherBatch) -> TeacherBatch:
    """The batch's first sequence of ``t`` (every [B, ...] tensor sliced to [1, ...])."""
    one = slice(0, 1)
    alm = None
    if t.alm is not None:
        a = t.alm
        alm = losses.ALMTargets(a.chunk_index[one], a.teacher_ll[one], a.end[one] if a.end is not None else None,
                                a.teacher_word_start[one] if a.teacher_word_start is not None else None,
                                a.word_start_mask)
    return TeacherBatch(t.logprobs[one], t.ids[one], t.kd_mask[one], {tau: lp[one] for tau, lp in (t.tempered or {}).items()},
                        t.std_logprobs[one] if t.std_logprobs is not None else None, alm, t.matched_fraction)


class _EpochDataLoader(DataLoader):
    """A DataLoader that forwards Trainer's set_epoch to our dataset (reshuffle per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class KDTrainer(Trainer):
    """Trainer whose loss is CE + kd_weight · KD; logs `ce`, `kd` and `kd_fraction` (aligned targets)."""

    def __init__(self, *args, kd_config: TrainConfig, cache_temperatures: list[float] | None = None, vocab_map=None,  # noqa: ANN001
                 more_teachers: Sequence[tuple[list[float], Any]] = (), teacher_weights: list[float] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kd_config = kd_config
        # Per teacher (the --cache order): its cache's extra temperatures (the order of its
        # teacher_lse_tau) and the hybrid's teacher -> student id map (vocab_map.VocabMap), or None.
        teachers = [(cache_temperatures or [], vocab_map), *more_teachers]
        self.cache_temperatures_of = [[float(t) for t in temps] for temps, _ in teachers]
        self.cache_temperatures = self.cache_temperatures_of[0]
        self.vocab_map = vocab_map
        self._t2s_of = [torch.from_numpy(vm.teacher_to_student) if vm is not None else None for _, vm in teachers]
        self._t2s = self._t2s_of[0]
        self._matched_of = [vm.matched_fraction if vm is not None else 1.0 for _, vm in teachers]
        self._matched_fraction = self._matched_of[0]
        self.teacher_weights = list(teacher_weights) if teacher_weights is not None else [1.0 / len(teachers)] * len(teachers)
        self.fused_loss = fused_loss_of(kd_config, self._matched_fraction)
        # From the last hidden states and the head, no logits (fused_head.py); checked on the first step.
        self.linear_loss = linear_loss_of(kd_config, self._matched_fraction)
        sharded = bool(getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False))
        self.fused_linear = fused_head.wanted(kd_config, self.linear_loss, self.model, sharded, self.args.device.type)
        self._fused_linear_checked = False
        # Our loss is a per-batch mean: let the Trainer divide it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._sums = self._zero_sums()
        self.feature_counts = None  # FeatureStats.counts() summed over the examples trained on

    @staticmethod
    def _zero_sums() -> dict[str, float]:
        return {"ce": 0.0, "kd": 0.0, "kd_positions": 0, "targets": 0, "batches": 0, "mapped_mass": 0.0, "topk_mass": 0.0}

    def _loader(self, dataset) -> DataLoader:
        return _EpochDataLoader(
            dataset,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def get_train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        return self._loader(eval_dataset if eval_dataset is not None else self.eval_dataset)

    def _pop_teacher(self, inputs: dict[str, Any], j: int) -> TeacherBatch:
        """Teacher ``j``'s columns of the batch (collate.py: suffix ``_j`` for j >= 1), removed from ``inputs``."""
        sfx = f"_{j}" if j else ""
        t_lp, t_ids, kd_mask = inputs.pop("teacher_logprobs" + sfx), inputs.pop("teacher_ids" + sfx), inputs.pop("kd_mask" + sfx)
        extras = {name: inputs.pop(name + sfx) for name in TEACHER_EXTRAS if name + sfx in inputs}
        alm = None
        if "alm_chunk" + sfx in inputs:
            alm = losses.ALMTargets(inputs.pop("alm_chunk" + sfx), inputs.pop("alm_teacher_ll" + sfx))
            if "alm_end" + sfx in inputs:
                alm.end, alm.teacher_word_start = inputs.pop("alm_end" + sfx), inputs.pop("alm_teacher_ws" + sfx)
        # an --eval-cache batch has one teacher: the first cache's settings
        temps = self.cache_temperatures_of[j] if j < len(self.cache_temperatures_of) else self.cache_temperatures
        tempered, std_lp = teacher_targets(self.kd_config, t_lp, extras, temps)
        if j < len(self._t2s_of) and self._t2s_of[j] is not None:  # the hybrid reads the student ids of the teacher entries
            t_ids = self._map_ids(t_ids, j)
        matched = self._matched_of[j] if j < len(self._matched_of) else 1.0
        return TeacherBatch(t_lp, t_ids, kd_mask, tempered, std_lp, alm, matched)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        n = 1
        while f"teacher_logprobs_{n}" in inputs:
            n += 1
        teachers = [self._pop_teacher(inputs, j) for j in range(n)]
        weights = self.teacher_weights if n == len(self.teacher_weights) else [1.0]
        workers, indices = inputs.pop("stream_worker", None), inputs.pop("stream_index", None)
        counts = inputs.pop("feature_counts", None)
        if counts is not None and model.training:  # summed here: the featurizers may live in workers
            summed = counts.sum(0).cpu().numpy()
            self.feature_counts = summed if self.feature_counts is None else self.feature_counts + summed
        labels = inputs.pop("labels")
        if workers is not None and model.training:
            self.train_dataset.mark_consumed(workers.tolist(), indices.tolist())
        if self.fused_linear and model.training:
            outputs = model(**inputs, logits_to_keep=1, output_hidden_states=True)
            loss, ce, kds = self._hidden_state_loss(model, outputs.hidden_states[-1], labels, teachers[0])
        else:
            outputs = model(**inputs)
            loss, ce, kds = self._logits_loss(outputs.logits, labels, teachers, weights)
        kd = sum(w * k.detach() for w, k in zip(weights, kds)) if n > 1 else kds[0]
        if model.training and not bool(torch.isfinite(loss.detach())):
            # The Trainer would go on (NaN weights from here); stop before the optimizer step.
            raise LogitCacheError(
                f"the training loss is not finite at step {self.state.global_step + 1} (CE {float(ce):.4g}, "
                f"KD {float(kd):.4g}): the student's weights or outputs overflowed. Nothing was saved as the final "
                "model; lower --learning-rate, or check the student's weights (e.g. with `logitcache eval`)."
            )
        if model.training:
            kd_mask, t_lp, t_ids = teachers[0].kd_mask, teachers[0].logprobs, teachers[0].ids
            self._sums["ce"] += float(ce.detach())
            self._sums["kd"] += float(kd.detach())
            if n > 1:  # each teacher's term, unweighted
                for j, k in enumerate(kds):
                    self._sums[f"kd_{j}"] = self._sums.get(f"kd_{j}", 0.0) + float(k.detach())
            self._sums["kd_positions"] += int(kd_mask.sum())
            self._sums["targets"] += int((labels[:, 1:] != -100).sum())
            self._sums["batches"] += 1
            if self._t2s is not None:  # the share of the aligned teacher top-k mass whose token maps
                p = t_lp.detach().float().exp() * kd_mask[..., None]
                self._sums["mapped_mass"] += float((p * (t_ids >= 0)).sum())
                self._sums["topk_mass"] += float(p.sum())
        return (loss, outputs) if return_outputs else loss

    def _logits_loss(self, logits: torch.Tensor, labels: torch.Tensor, teachers: list[TeacherBatch],
                     weights: list[float]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        self._complete_alm(teachers, logits.shape[-1], logits.device)
        return teachers_loss(self.kd_config, logits, labels, teachers, weights, self.fused_loss)

    def _complete_alm(self, teachers: list[TeacherBatch], vocab: int, device: torch.device) -> None:
        """ALM's batches: refuse one without chunks; give debiased chunks the student's word starts [vocab]."""
        for t in teachers:
            if t.alm is not None and t.alm.debiased:
                t.alm.word_start_mask = self._word_start_mask(vocab, device)
        if self.kd_config.loss == "alm" and any(t.alm is None for t in teachers):
            raise LogitCacheError("--loss alm needs ALM's chunks in the batch (alignment 'chunk').")

    def _hidden_state_loss(self, model, hidden: torch.Tensor, labels: torch.Tensor,  # noqa: ANN001
                           t: TeacherBatch) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """CE + KD from the last hidden states [B, T, d] and the head (one teacher; fused_head.py).

        The first call compares it with the logits path on the batch's first sequence (a
        sequence, not the batch: the logits of the whole batch may be what does not fit).
        """
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        self._complete_alm([t], head.weight.shape[0], head.weight.device)

        def fused(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: TeacherBatch = t,
                  labels: torch.Tensor = labels):  # noqa: ANN202
            return losses.fused_linear_ce_kd_loss(h, w, b, labels, t.logprobs, t.ids, t.kd_mask, self.linear_loss,
                                                  tempered=t.tempered, std_logprobs=t.std_logprobs, alm=t.alm)

        if not self._fused_linear_checked:
            self._fused_linear_checked = True
            one = _first_sequence(t)
            problem = fused_head.self_check(
                hidden[:1], head,
                lambda logits: teachers_loss(self.kd_config, logits, labels[:1], [one], [1.0], self.fused_loss)[0],
                lambda h, w, b: fused(h, w, b, one, labels[:1])[0],
            )
            if problem and self.kd_config.fused_linear == "on":
                raise LogitCacheError(f"--fused-linear on: the first step's check against the logits failed ({problem}); "
                                      "use --fused-linear off.")
            if problem:
                _notify([f"--fused-linear: the first step's check against the logits failed ({problem}); training from "
                         "the logits."], self.is_world_process_zero())
                self.fused_linear = False
                return teachers_loss(self.kd_config, head(hidden), labels, [t], [1.0], self.fused_loss)
        total, ce, kd = fused(hidden, head.weight, head.bias)
        return total, ce, [kd]

    def _word_start_mask(self, width: int, device: torch.device) -> torch.Tensor:
        """The student's word-start tokens (ALM's debiasing) over its logits' width, built once."""
        mask = getattr(self, "_ws_mask", None)
        if mask is None or len(mask) != width or mask.device != device:
            from logitcache.pipeline.token_bytes import word_start_mask

            mask = self._ws_mask = torch.from_numpy(word_start_mask(self.processing_class, width)).to(device)
        return mask

    def _map_ids(self, teacher_ids: torch.Tensor, j: int = 0) -> torch.Tensor:
        """teacher ``j``'s ids [..., K] -> student ids of the same tokens, -1 where none (ids past the map too)."""
        if self._t2s_of[j].device != teacher_ids.device:
            self._t2s_of[j] = self._t2s_of[j].to(teacher_ids.device)  # once: the map moves with the batches
        t2s = self._t2s_of[j]
        inside = (teacher_ids >= 0) & (teacher_ids < len(t2s))
        return torch.where(inside, t2s[teacher_ids.clamp(0, len(t2s) - 1)], -1)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sums["batches"]:
            n = self._sums["batches"]
            logs["ce"] = round(self._sums["ce"] / n, 4)
            logs["kd"] = round(self._sums["kd"] / n, 4)
            for j in range(len(self.teacher_weights) if len(self.teacher_weights) > 1 else 0):
                logs[f"kd_{j}"] = round(self._sums.get(f"kd_{j}", 0.0) / n, 4)
            logs["kd_fraction"] = round(self._sums["kd_positions"] / max(self._sums["targets"], 1), 4)
            logs["fused_linear"] = int(self.fused_linear)  # 1: the loss ran from the hidden states (fused_head.py)
            if self._t2s is not None:
                logs["hybrid_mapped_mass"] = round(self._sums["mapped_mass"] / max(self._sums["topk_mass"], 1e-12), 4)
            self._sums = self._zero_sums()
        super().log(logs, *args, **kwargs)


def first_non_finite_gradient(model: torch.nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds NaN or inf, or None.

    One fused norm per parameter and one device sync: a norm is finite iff every entry is.
    Under FSDP each rank holds only its shard of every gradient (a DTensor's local part), so the
    ranks agree on the answer through one all-reduce: a rank that stopped alone would leave the
    others waiting in the next collective until the timeout.
    """
    import torch.distributed as dist

    names = [n for n, _ in model.named_parameters()]  # the same list on every rank
    local = [(i, _local_tensor(p.grad)) for i, (_, p) in enumerate(model.named_parameters()) if p.grad is not None]
    local = [(i, g) for i, g in local if g.numel() > 0]
    first = len(names)  # none
    if local:
        norms = torch._foreach_norm([g for _, g in local])
        finite = torch.isfinite(torch.stack([n.float() for n in norms]))
        if not bool(finite.all()):
            first = local[int((~finite).nonzero()[0, 0])][0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        agreed = torch.tensor([first], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        first = int(agreed)
    return names[first] if first < len(names) else None


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2's sharded gradient's) local part; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class FiniteGradientsCallback(TrainerCallback):
    """Stops training before an optimizer step would write NaN/inf into the weights.

    Not under fp16 mixed precision: there the gradient scaler expects overflowing steps, and
    skips them itself.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None and not args.fp16:
            name = first_non_finite_gradient(model)
            if name is not None:
                raise LogitCacheError(
                    f"a gradient is not finite at step {state.global_step + 1} (first: {name}), with a finite loss: "
                    "an overflow in the backward pass. Nothing was saved as the final model; lower --learning-rate "
                    "or train in float32."
                )
        return control


class SharedModesCallback(TrainerCallback):
    """Gives each checkpoint the modes of the user's umask once it is saved: safetensors writes
    its weights 0600, which another user of a shared run directory could not read."""

    def on_save(self, args, state, control, **kwargs):
        from logitcache.storage.fsutil import follow_umask

        if state.is_world_process_zero:
            follow_umask(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control


class EpochCallback(TrainerCallback):
    """Keeps the logged epoch counting from the run's start after a mid-epoch --resume.

    The dataset resumes mid-epoch itself (ignore_data_skip), so the Trainer counts the resumed
    epoch's steps from 0 and the logged epoch went backwards (0.39, then 0.13). The epoch is the
    optimizer steps done over the steps of a whole epoch, which the dataset's length gives.
    While the dataset follows a cache being written (--follow), that length is unknown and the
    Trainer's own fraction counts --max-steps: the epoch is then logged whole (0 until the
    followed one ends; every epoch has the same length, known from then on).
    """

    def __init__(self, dataset, batch_size: int, accumulation: int) -> None:  # noqa: ANN001
        self.dataset, self.batch_size, self.accumulation = dataset, batch_size, accumulation

    def updates_per_epoch(self) -> int | None:
        try:
            examples = len(self.dataset)
        except TypeError:  # following a cache being written
            return None
        return max(1, math.ceil(max(1, math.ceil(examples / self.batch_size)) / self.accumulation))

    def on_step_end(self, args, state, control, **kwargs):
        per = self.updates_per_epoch()
        state.epoch = float(math.floor(state.epoch)) if per is None else state.global_step / per
        return control


class DataStateCallback(TrainerCallback):
    """Saves the dataset's position (JSON, one file per rank) into every checkpoint.

    The state is written when the step ends with a save due, before the Trainer writes the
    checkpoint, whose ``trainer_state.json`` comes last. So a checkpoint is complete when
    it holds ``trainer_state.json`` and every rank's data state: a job killed while saving
    leaves a checkpoint without them, which :meth:`last_complete_checkpoint` passes over.
    """

    def __init__(self, dataset, rank: int) -> None:
        self.dataset, self.rank = dataset, rank

    def _write(self, args, state) -> None:
        from logitcache.storage.fsutil import atomic_write_bytes

        # Other ranks can get here before rank 0 has created the folder.
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(ckpt / DATA_STATE.format(rank=self.rank), json.dumps(self.dataset.state_dict()).encode())

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._write(args, state)
        return control

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state)  # the same state again; covers saves not announced at step end
        return control

    @staticmethod
    def is_complete(checkpoint: Path) -> bool:
        """Whether a save finished: ``trainer_state.json`` and every rank's data state are there."""
        if not (checkpoint / "trainer_state.json").is_file():
            return False
        states = sorted(checkpoint.glob(DATA_STATE.format(rank="*")))
        if not states:
            return False
        try:
            world = int(json.loads(states[0].read_text())["world_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return all((checkpoint / DATA_STATE.format(rank=r)).is_file() for r in range(world))

    @classmethod
    def last_complete_checkpoint(cls, out: Path) -> tuple[Path | None, list[Path]]:
        """The highest-numbered complete ``checkpoint-N`` in ``out``, and the incomplete ones above it."""
        found = []
        for p in out.iterdir() if out.is_dir() else []:
            name = p.name.split("-")
            if p.is_dir() and len(name) == 2 and name[0] == "checkpoint" and name[1].isdigit():
                found.append((int(name[1]), p))
        partial: list[Path] = []
        for _, p in sorted(found, reverse=True):
            if cls.is_complete(p):
                return p, partial
            partial.append(p)
        return None, partial


def _warmup_kwargs(warmup: float) -> dict[str, Any]:
    # transformers 5 takes a ratio in warmup_steps (a float < 1); 4.x has warmup_ratio.
    import dataclasses as dc

    from transformers import TrainingArguments

    if 0 < warmup < 1 and "warmup_ratio" in {f.name for f in dc.fields(TrainingArguments)}:
        return {"warmup_ratio": warmup}
    return {"warmup_steps": warmup if 0 < warmup < 1 else int(warmup)}


@dataclass
class TrainResult:
    out: str
    global_step: int
    train_loss: float
    seconds: float
    feature_stats: dict | None


def check_compatibility(cfg: TrainConfig, student_tokenizer, cache) -> None:
    """Refuse combinations that cannot work, before any model is trained (``cache``: a CacheReader)."""
    manifest = cache.manifest
    if cfg.loss == "kl":
        from logitcache.pipeline.loading import load_tokenizer

        # The cache's tokenizer is data from whoever wrote the cache: its files must match the
        # manifest's sha256, and it never runs code of its own.
        tok_dir = cache.verified_tokenizer_dir()
        teacher_tok = load_tokenizer(str(tok_dir), "the cache's tokenizer", trust_remote_code=False)
        if student_tokenizer.get_vocab() != teacher_tok.get_vocab():
            raise LogitCacheError(
                "--loss kl needs a student with the teacher's vocabulary, and this student's tokenizer differs "
                f"({len(student_tokenizer)} vs {len(teacher_tok)} tokens, or other ids); use --loss uld or --loss mlot "
                "for a student with another tokenizer."
            )
    sample = getattr(manifest, "sample", 0)
    if cfg.kd_targets == "sample" and not sample:
        raise LogitCacheError(
            "--kd-targets sample needs a cache with sampled targets, and this one has none; "
            "rewrite it with `logitcache teacher --sample 12` (or more), or use --kd-targets topk."
        )
    if cfg.kd_targets == "topk" and manifest.k == 0:
        raise LogitCacheError(
            f"this cache holds sampled targets only (k=0, sample={sample}); train with --kd-targets sample --loss kl."
        )
    if cfg.loss == "mlot" and manifest.k < cfg.mlot_k:
        raise LogitCacheError(
            f"--loss mlot ranks the top {cfg.mlot_k} teacher tokens, but the cache keeps only k={manifest.k}; "
            f"rerun the teacher with `logitcache teacher --top-k {cfg.mlot_k}` or more, or pass --mlot-k {manifest.k}."
        )
    check_teacher_targets(cfg, manifest)


def check_teacher_targets(cfg: TrainConfig, manifest) -> None:
    """Refuse a loss whose exact teacher targets (temperatures, logit statistics) the cache lacks, in one line."""
    from logitcache.pipeline.student import targets

    if cfg.loss == "mlot" and cfg.mlot_variant == "code":
        targets.require_logit_stats(manifest, "--loss mlot --mlot-variant code (logits divided by their std)")
    if cfg.alm_debiased() and not getattr(manifest, "word_start", False):
        vllm = manifest.teacher.get("engine") == "vllm" or not manifest.has_logsumexp
        raise LogitCacheError(
            "--loss alm debiases its chunks with the teacher's word-start probability, which this cache lacks; "
            f"rerun the teacher with `logitcache teacher {'--engine hf ' if vllm else ''}--word-start` (a new --out), "
            "or pass --alm-mode plain."
        )
    for tau in cfg.teacher_temperatures():
        try:
            targets.manifest_tau_column(manifest, tau)
        except LogitCacheError as e:
            if cfg.loss != "mlot":
                raise LogitCacheError(f"--loss {cfg.loss} --kd-temperature {tau:g}: {e}") from None
            if cfg.approximate_temperature:
                continue
            which = "tau_SD" if tau == cfg.mlot_config().tau_sd else "--kd-temperature"
            have = ", ".join(f"{t:g}" for t in getattr(manifest, "temperatures", []) or []) or "none"
            if manifest.teacher.get("logsumexp", True) is False:
                fix = f"`logitcache teacher --engine hf --temperatures {tau:g}` (a vllm cache has no log-normaliser)"
            else:
                fix = f"`logitcache teacher --temperatures {tau:g}`"
            raise LogitCacheError(
                f"--loss mlot compares the teacher at temperature {tau:g} ({which}), which this cache lacks (extra "
                f"temperatures: {have}); rewrite it with {fix}, or pass --approximate-temperature to renormalise "
                f"its top-k at {tau:g} instead (biased)."
            ) from None


def check_eval_targets(cfg: TrainConfig, train_manifest, eval_manifest) -> None:
    """Refuse an --eval-cache that lacks the loss's teacher targets or keeps its temperatures in other columns."""
    from logitcache.pipeline.student import targets

    try:
        check_teacher_targets(cfg, eval_manifest)
    except LogitCacheError as e:
        raise LogitCacheError(f"--eval-cache: {e}") from None

    def column(manifest, tau: float) -> int | None:
        try:
            return targets.manifest_tau_column(manifest, tau)
        except LogitCacheError:  # absent, which --approximate-temperature allows
            return None

    for tau in cfg.teacher_temperatures():
        if column(train_manifest, tau) != column(eval_manifest, tau):
            raise LogitCacheError(
                f"--eval-cache has temperature {tau:g} in another column than --cache, or only one of them has it "
                f"(temperatures {eval_manifest.temperatures} vs {train_manifest.temperatures}); write both with the "
                "same `logitcache teacher --temperatures`."
            )


def _notify(messages: list[str], show: bool) -> None:
    """Things a user must know before training starts: to the log, and once to stderr."""
    import logging
    import sys

    for message in messages:
        logging.getLogger(__name__).info(message)
        if show:
            print(f"warning: {message}", file=sys.stderr, flush=True)


def run_train(cfg: TrainConfig, progress_callback: TrainerCallback | None = None) -> TrainResult:
    """Train ``cfg.student`` from ``cfg.cache``.

    ``progress_callback`` (the demo): a TrainerCallback that shows progress its own way; it
    replaces transformers' progress bar and its printed log dictionaries.
    """
    import time

    from transformers.trainer_utils import get_last_checkpoint

    from logitcache.pipeline.loading import load_causal_lm, load_tokenizer
    from logitcache.pipeline.padding import pad_token_id
    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.dataset import LogitCacheDataset, refuse_unaligned
    from logitcache.pipeline.student.follow import Follow, records_cached, wait_for_manifest
    from logitcache.storage import open_cache
    from logitcache.storage.parts import merge_command

    cfg.validate()
    fused_head.wanted(cfg, linear_loss_of(cfg), None)  # --fused-linear on: refuse a loss it cannot compute, before any write
    paths = cfg.caches()
    weights = cfg.resolved_teacher_weights()
    if cfg.follow:  # a teacher writes its manifest once its model is loaded: a student started with it waits
        wait_for_manifest(paths[0], cfg.follow_settings(), announce=os.environ.get("RANK", "0") == "0")
    caches = [open_cache(p, local_cache=cfg.local_cache) for p in paths]  # refuses non-caches, unknown versions and manifests that fail the schema
    cache = caches[0]
    out = Path(cfg.out)
    refuse_foreign_out(out)
    newest = get_last_checkpoint(str(out)) if out.is_dir() else None
    if newest and not cfg.resume:
        raise LogitCacheError(
            f"--out {out} already holds checkpoints ({Path(newest).name}); pass --resume to continue, "
            "or choose a new --out so nothing is overwritten."
        )
    if cfg.resume and (finished := _finished_run(cfg, out)) is not None:
        # Resuming would train one more step and overwrite the final model (weights move).
        _notify([f"--resume: {out} already holds this run, finished at step {finished.global_step}; nothing to do "
                 "(to train further, raise --max-steps or --num-epochs)."], True)
        return finished
    # Not transformers' get_last_checkpoint: it takes the highest number, even a save that a
    # kill cut short (weights without optimizer or trainer state: the resume fails or goes wrong).
    last, partial = DataStateCallback.last_complete_checkpoint(out) if cfg.resume else (None, [])
    tokenizer = load_tokenizer(cfg.student, "--student", trust_remote_code=cfg.trust_remote_code)
    for path, c in zip(paths, caches):  # each teacher's cache must suit the loss on its own
        try:
            check_compatibility(cfg, tokenizer, c)
        except LogitCacheError as e:
            if len(caches) == 1:
                raise
            raise LogitCacheError(f"--cache {path}: {e}") from None
    following = cfg.follow and cache.manifest.status != "complete"
    if following and cfg.max_steps <= 0:
        raise LogitCacheError(
            f"--follow on {paths[0]}, still being written ({records_cached(cache.manifest)}), needs --max-steps: how "
            "many examples the teacher will keep is unknown until it ends, and the learning-rate schedule needs its "
            "length now (or wait for the teacher and train without --follow)."
        )
    if cfg.eval_cache:  # its batches share the trainer's teacher_targets(): the same columns needed
        check_eval_targets(cfg, cache.manifest, open_cache(cfg.eval_cache, local_cache=cfg.local_cache).manifest)

    # transformers' tqdm bar only on a terminal: redrawn into a job's log file it is one endless line.
    bar = cfg.progress and progress_callback is None and is_terminal(sys.stderr)
    # Built before the model is loaded: under `accelerate launch` (or --deepspeed) it reads the
    # FSDP / DeepSpeed settings, so from_pretrained can load for them (ZeRO-3 init, rank-0 loading).
    args = _training_arguments(
        cfg,
        output_dir=str(out),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        **_warmup_kwargs(cfg.warmup_steps),
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if cfg.eval_cache and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        bf16=cfg.bf16,
        seed=cfg.seed,
        dataloader_num_workers=cfg.num_workers,
        remove_unused_columns=False,
        prediction_loss_only=True,
        report_to=[t.strip() for t in cfg.report_to.split(",")] if cfg.report_to != "none" else "none",
        run_name=cfg.run_name,
        disable_tqdm=not bar,
        ignore_data_skip=True,
        # accelerate sets up multi-process CPU training (gloo) under torchrun only when told "cpu".
        use_cpu=not torch.cuda.is_available(),
        fsdp=cfg.fsdp or None,
        fsdp_config=cfg.fsdp_config,
        deepspeed=cfg.deepspeed,
    )
    if cfg.fsdp and args.world_size < 2:  # (DeepSpeed in one process is fine: ZeRO-Offload)
        raise LogitCacheError(
            "--fsdp shards the model across processes: launch with `torchrun --nproc_per_node N -m logitcache "
            "train ...` (or accelerate launch with examples/accelerate/fsdp.yaml)."
        )

    def dataset(path: str, shuffle: bool, companions: list[str] = (), follow: Follow | None = None) -> LogitCacheDataset:
        return LogitCacheDataset(
            path, tokenizer, alignment=cfg.resolved_alignment(), max_length=cfg.max_length,
            alm_merge_threshold=cfg.alm_merge_threshold if cfg.alm_debiased() else None, kd_targets=cfg.kd_targets,
            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, shuffle=shuffle,
            rank=args.process_index, world_size=args.world_size, num_workers=cfg.num_workers,
            skip_bad_shards=cfg.skip_bad_shards, batch_size=cfg.batch_size,
            companions=companions, on_missing=cfg.on_missing, follow=follow, local_cache=cfg.local_cache,
        )

    # Every shard is checked here, before the model is loaded: a damaged cache stops the run now.
    # Several caches: the first drives the order, the others are read by id alongside it.
    follow = dataclasses.replace(cfg.follow_settings(), announce=args.process_index == 0) if cfg.follow else None
    train_ds = dataset(paths[0], shuffle=True, companions=paths[1:], follow=follow)
    eval_ds = dataset(cfg.eval_cache, shuffle=False) if cfg.eval_cache else None
    if cfg.loss != "sft" and cfg.kd_weight > 0 and cfg.resolved_alignment() in ("offset", "position"):
        # a student that aligns nothing would train on CE alone, silently: refuse it now.
        with warnings.catch_warnings():
            if following:  # its "cache not complete" warning: the notice below says what --follow does instead
                warnings.simplefilter("ignore")
            for path, w in zip(paths, weights):
                if w > 0:
                    refuse_unaligned(path, tokenizer, cfg.resolved_alignment(), skip_bad_shards=cfg.skip_bad_shards,
                                     local_cache=cfg.local_cache)
    notices = [f"--follow: {paths[0]} is still being written ({records_cached(cache.manifest)}); training starts on "
               "what is there and takes new shards as they come, until the teacher finishes."] if following else []
    notices += [ds.skipped_summary() for ds in (train_ds, *train_ds.companions, eval_ds) if ds is not None and ds.skipped_shards]
    if train_ds.missing:
        notices.append(train_ds.missing_summary())
    for path, c in zip(paths, caches):
        part = c.manifest.worker
        if part and int(part.get("count", 1)) > 1:
            n = int(part["count"])
            notices.append(
                f"{path} is part {int(part['index']) + 1} of {n} of a split teacher run, about 1/{n} of the data; "
                f"to train on all of it, join the parts first: {merge_command(Path(path).resolve().parent)}."
            )
    if partial:
        notices.append(
            f"--resume: passed over {', '.join(p.name for p in partial)}, incomplete (the job stopped while saving "
            "it); " + (f"resuming from {last.name}." if last else "no complete checkpoint is left, starting from step 0.")
        )
    _notify(notices, args.process_index == 0)
    if last is not None:
        # A rank without its own state (more ranks than saved it) gets rank 0's, which
        # load_state_dict refuses, naming the world size.
        own = last / DATA_STATE.format(rank=args.process_index)
        state_file = own if own.is_file() else last / DATA_STATE.format(rank=0)
        train_ds.load_state_dict(json.loads(state_file.read_text()))
    vocab_maps = [hybrid_vocab_map(cfg, tokenizer, c, out, show=args.process_index == 0) if cfg.loss == "hybrid" else None
                  for c in caches]
    model = load_causal_lm(cfg.student, "--student", trust_remote_code=cfg.trust_remote_code)
    pad = pad_token_id(tokenizer)
    trainer = KDTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=KDCollator(pad_token_id=pad),
        processing_class=tokenizer,
        callbacks=[DataStateCallback(train_ds, args.process_index), FiniteGradientsCallback(), SharedModesCallback(),
                   EpochCallback(train_ds, cfg.batch_size, cfg.gradient_accumulation_steps)],
        kd_config=cfg,
        cache_temperatures=list(getattr(cache.manifest, "temperatures", []) or []),
        vocab_map=vocab_maps[0],
        more_teachers=[(list(getattr(c.manifest, "temperatures", []) or []), vm) for c, vm in zip(caches[1:], vocab_maps[1:])],
        teacher_weights=weights,
    )
    if progress_callback is None and not bar and trainer.is_world_process_zero():
        # Beside the Trainer's printed metrics, a line that says how far the run is and how long is left.
        trainer.add_callback(trainer_progress(
            StepProgress("train", 0, bar=False, interval=cfg.log_every, stream=sys.stderr), owns=True))
    if progress_callback is not None:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress_callback)
    _notify(_sharding_notices(trainer), args.process_index == 0)
    t0 = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
        if trainer.is_fsdp_enabled:
            # Under SHARDED_STATE_DICT (fast checkpoints) save_model writes no weights at all; the
            # final model is gathered whole, so from_pretrained loads it. Checkpoints stay sharded.
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(out))
    except (OSError, RuntimeError) as e:
        message = _disk_full_message(e, out, trainer.state.global_step)
        if message is None:
            raise
        raise LogitCacheError(message) from e
    done = TrainResult(
        out=str(out), global_step=result.global_step, train_loss=float(result.training_loss),
        seconds=time.perf_counter() - t0, feature_stats=_trained_feature_stats(trainer, train_ds),
    )
    if trainer.is_world_process_zero():
        from logitcache.storage.fsutil import atomic_write_bytes, follow_umask

        (out / "logitcache_train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        # Last: its presence says the run finished (a --resume of it is then a no-op).
        atomic_write_bytes(out / FINISHED, json.dumps({"config": _run_defining(cfg), "result": asdict(done)}).encode())
        follow_umask(out)  # the final model's weights, written 0600 like each checkpoint's
    _leave_process_group()
    return done


def _training_arguments(cfg: TrainConfig, **kwargs: Any):  # noqa: ANN202
    """TrainingArguments(**kwargs); a bad --fsdp / --fsdp-config / --deepspeed in one line."""
    from transformers import TrainingArguments

    try:
        return TrainingArguments(**kwargs)
    except (ValueError, KeyError, TypeError) as e:
        if not (cfg.fsdp or cfg.deepspeed):
            raise
        given = " ".join(f"--{k.replace('_', '-')} {v}" for k in ("fsdp", "fsdp_config", "deepspeed")
                         if (v := getattr(cfg, k)))
        raise LogitCacheError(f"{given}: the Trainer refused it: {str(e).splitlines()[0]}") from e


def _sharding_notices(trainer: Trainer) -> list[str]:
    """A run that asked for FSDP but trains without it (accelerate runs FSDP only on accelerators:
    on CPU it silently falls back to DDP, each rank holding the whole model)."""
    asked = bool(trainer.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not trainer.is_fsdp_enabled and trainer.args.world_size > 1:
        return [f"FSDP was asked for but accelerate set up {trainer.accelerator.distributed_type.value} "
                "(it shards only on GPUs or other accelerators, not on CPU): every process holds the whole model."]
    return []


# What a training run leaves in --out besides the saved model: checkpoints, our JSON files and
# the hybrid loss's vocabulary map. A folder holding any of them is a run to resume or refuse.
_RUN_PREFIXES = ("checkpoint-", "logitcache_", "vocab-map-")


def refuse_foreign_out(out: Path) -> None:
    """Refuse an --out that holds files but no trace of a training run: saving there would mix
    the model's files into someone else's (config.json, model.safetensors overwritten)."""
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    if names and not any(n.startswith(_RUN_PREFIXES) for n in names):
        raise LogitCacheError(
            f"--out {out} is not empty and holds no training run ({len(names)} entries, e.g. {sorted(names)[0]!r}); "
            "choose a new or empty directory so nothing there is overwritten."
        )


def _disk_full_message(e: BaseException, out: Path, step: int) -> str | None:
    """One line for a full disk (or quota, or I/O error) while saving; None for other errors.
    torch.save reports a full disk as a RuntimeError ("file write failed"), not an OSError."""
    import errno

    code = getattr(e, "errno", None)
    text = str(e)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "file write failed" in text:
        problem, fix = "no space left on the device", "free some space"
    elif code == errno.EIO:
        problem, fix = "I/O error (EIO)", "check the disk"
    else:
        return None
    return (f"{problem} while saving in {out} (step {step}): {fix}, then rerun with --resume; it continues from "
            "the last complete checkpoint (one cut short by the disk is passed over).")


FINISHED = "logitcache_train_result.json"
# Options that do not change what a finished run trained: a --resume with only these changed is a no-op.
_NOT_DEFINING = ("resume", "progress", "log_every", "num_workers", "follow_poll", "follow_timeout")


def _run_defining(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_DEFINING}


def _finished_run(cfg: TrainConfig, out: Path) -> TrainResult | None:
    """The result of the finished run in ``out`` with these settings, if there is one."""
    try:
        saved = json.loads((out / FINISHED).read_text(encoding="utf-8"))
        if saved["config"] == json.loads(json.dumps(_run_defining(cfg))):
            return TrainResult(**saved["result"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _trained_feature_stats(trainer: "KDTrainer", train_ds) -> dict | None:  # noqa: ANN001
    """Alignment counts over the examples this run trained on (from the batches, so dataloader
    workers' counts are in); the dataset's own when no batch carried them."""
    if trainer.feature_counts is None:
        return train_ds.featurizer_stats()
    from logitcache.pipeline.student.features import FeatureStats

    return FeatureStats.from_counts(trainer.feature_counts).as_dict()


def hybrid_vocab_map(cfg: TrainConfig, student_tokenizer, cache, out: Path, show: bool = True):  # noqa: ANN001, ANN201
    """the teacher -> student vocabulary map of ``--loss hybrid`` (kept in ``out``), and a line
    on stderr with the share of the teacher's top-k mass that maps (first 64 examples)."""
    import sys

    import numpy as np

    from logitcache.pipeline.loading import load_tokenizer
    from logitcache.pipeline.student.vocab_map import build_vocab_map, mapped_mass

    teacher_tok = load_tokenizer(str(cache.verified_tokenizer_dir()), "the cache's tokenizer", trust_remote_code=False)
    vm = build_vocab_map(teacher_tok, student_tokenizer, cache_dir=out)
    mapped = total = 0.0
    for i, row in enumerate(cache.iter_rows()):
        if i >= 64:
            break
        a, b = mapped_mass(np.asarray(row["topk_logprobs"]), vm.lookup(np.asarray(row["topk_ids"])))
        mapped, total = mapped + a, total + b
    w_m, w_u = _extra_loss_configs(cfg, vm.matched_fraction)["hybrid"].weights(vm.matched_fraction)
    message = (
        f"hybrid: {vm.matched} of {vm.teacher_size} teacher tokens have a student token of the same bytes; "
        f"they hold {mapped / max(total, 1e-12):.1%} of the teacher's top-k mass (first 64 examples); "
        f"weights: matched {w_m:.3f}, unmatched {w_u:.3f}."
    )
    import logging

    logging.getLogger(__name__).info(message)
    if show:
        print(message, file=sys.stderr, flush=True)
    return vm


def _leave_process_group() -> None:
    """Under torchrun: all ranks meet, then close the group together.

    Otherwise the first rank to exit closes its gloo sockets while another is still tearing
    down its own, which can abort that rank (SIGABRT) after a successful run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
