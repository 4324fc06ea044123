"""KL from the teacher's full logits, computed on the fly: the reference for the top-k cost.

``LiveTeacherKDTrainer`` is the package's KDTrainer with one change: before the loss, the
teacher runs on the student's own input ids (the student has the teacher's tokenizer, so the
ids and positions are the teacher's) and the batch's cached top-k targets are replaced by the
teacher's full log-softmax, K = V, with ids 0..V-1; the optional per-position columns
(log-normalisers at the cache's temperatures, logit std) are recomputed from the same logits.
The loss code, the alignment mask, the data order and everything else are those of
``logitcache train --loss kl``. ``live_teacher`` swaps it into ``run_train`` for one call.

The first batch checks that the live teacher is the cache's: its top-1 token must equal the
cached top-1 at >= 99% of the aligned positions (fp16 storage can flip near-ties).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from logitcache.pipeline.student import train as train_mod


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
            type(self).checked = True
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
    saved = train_mod.KDTrainer
    train_mod.KDTrainer = cls
    try:
        yield
    finally:
        train_mod.KDTrainer = saved
