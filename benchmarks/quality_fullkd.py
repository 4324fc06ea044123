"""KL from the teacher's full logits, computed on the fly: the reference for the top-k cost.

``LiveTeacherKDTrainer`` is the package's KDTrainer with one change: before the loss, the
teacher runs on the student's own input ids (the student has the teacher's tokenizer, so the
ids and positions are the teacher's) and the batch's cached top-k targets are replaced by the
teacher's full log-softmax, K = V, with ids 0..V-1; the optional per-position columns
(log-normalisers at the cache's temperatures, logit std) are recomputed from the same logits.
The alignment mask, the data order, the reduction and everything else are those of
``logitcache train --loss kl``. ``live_teacher`` swaps it into ``run_train`` for one call.

The loss with K = V: the package's fused KL handles any K, but at K = V = 32000 it costs
about 3x its K = 64 pass (it gathers and masks V columns per position), which alone would
take a third of the benchmark's budget. So while the block runs, ``train.batch_loss`` is
wrapped: for a full-vocabulary target it computes the same quantity directly, CE + w * sum_p
weight_p KL(t_p || s_p) with the package's ``kd_weights`` (one log-softmax over V). On the
first batch both are computed and must agree to 1e-4 (relative), so the shortcut is checked
against the package's loss on the real data, not assumed.

The first batch also checks that the live teacher is the cache's: its top-1 token must equal
the cached top-1 at >= 99% of the aligned positions (fp16 storage can flip near-ties).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from logitcache.pipeline.student import losses
from logitcache.pipeline.student import train as train_mod


def full_kl_batch_loss(cfg, logits: torch.Tensor, labels: torch.Tensor, t_lp: torch.Tensor, kd_mask: torch.Tensor):
    """(CE + kd_weight * KD, CE, KD) for forward KL at temperature 1 against full teacher log-probs [B, T, V]."""
    ce = train_mod.causal_ce(logits, labels)
    if not kd_mask.any():
        return ce, ce, ce.new_zeros(())
    s_logp = torch.log_softmax(logits[kd_mask].float(), -1)  # [N, V]
    t = t_lp[kd_mask].to(s_logp.dtype)  # [N, V]
    div = (t.exp() * (t - s_logp)).sum(-1)  # [N]
    w = losses.kd_weights(kd_mask, cfg.kd_reduction, dtype=s_logp.dtype)[kd_mask]
    kd = (w * div).sum()
    return ce + cfg.kd_weight * kd, ce, kd


class LiveTeacherKDTrainer(train_mod.KDTrainer):
    teacher: torch.nn.Module | None = None
    temperatures: tuple[float, ...] = ()
    checked: bool = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        teacher = self.teacher.to(inputs["input_ids"].device)
        with torch.no_grad():
            logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits.float()
        lse = torch.logsumexp(logits, -1)
        logprobs = logits - lse[..., None]
        B, T, V = logprobs.shape
        mask = inputs["kd_mask"].bool()
        if not type(self).checked and mask.any():
            cached_top1 = inputs["teacher_ids"][..., 0][mask]
            agree = float((logprobs.argmax(-1)[mask] == cached_top1).float().mean())
            if agree < 0.99:
                raise RuntimeError(f"the live teacher is not the cache's teacher: top-1 agrees at {agree:.1%} of positions")
        inputs["teacher_logprobs"] = logprobs
        inputs["teacher_ids"] = torch.arange(V, device=logprobs.device).expand(B, T, V)
        if "teacher_lse" in inputs:
            inputs["teacher_lse"] = lse
        if "teacher_lse_tau" in inputs:
            inputs["teacher_lse_tau"] = torch.stack([torch.logsumexp(logits / t, -1) for t in self.temperatures], -1)
        if "teacher_logit_std" in inputs:
            std = logits.std(-1)
            inputs["teacher_logit_std"] = std
            if "teacher_lse_std" in inputs:
                inputs["teacher_lse_std"] = torch.logsumexp(logits / (std[..., None] + 1e-4), -1)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


@contextlib.contextmanager
def live_teacher(teacher: torch.nn.Module, temperatures: list[float]) -> Iterator[None]:
    """Within the block, ``run_train`` trains with LiveTeacherKDTrainer and this teacher."""
    cls = type("LiveTeacher", (LiveTeacherKDTrainer,), {
        "teacher": teacher.eval(), "temperatures": tuple(temperatures), "checked": False,
    })
    package_loss = train_mod.batch_loss

    def batch_loss(cfg, logits, labels, teacher_logprobs, teacher_ids, kd_mask, fused, *args, **kwargs):
        full = teacher_logprobs.shape[-1] == logits.shape[-1]
        if not full or cfg.loss != "kl" or cfg.kl_kind != "forward" or float(cfg.kd_temperature) != 1.0:
            return package_loss(cfg, logits, labels, teacher_logprobs, teacher_ids, kd_mask, fused, *args, **kwargs)
        ours = full_kl_batch_loss(cfg, logits, labels, teacher_logprobs, kd_mask)
        if not cls.checked and kd_mask.any():
            with torch.no_grad():
                ref = package_loss(cfg, logits.detach(), labels, teacher_logprobs, teacher_ids, kd_mask, fused, *args, **kwargs)
            for name, a, b in zip(("total", "ce", "kd"), ours, ref):
                if not torch.allclose(a.detach().double(), b.detach().double(), rtol=1e-4, atol=1e-6):
                    raise RuntimeError(f"full-logit KL shortcut differs from the package's loss ({name}: {float(a)} vs {float(b)})")
            cls.checked = True
        return ours

    saved = train_mod.KDTrainer
    train_mod.KDTrainer = cls
    train_mod.batch_loss = batch_loss
    try:
        yield
    finally:
        train_mod.KDTrainer = saved
        train_mod.batch_loss = package_loss
