"""``train --fused-linear``: whether the loss can run from the student's last hidden states and
LM head (losses.fused_linear) instead of its logits, and the first step's check of that.

The logits must be exactly ``head(last hidden state)`` with ``head`` a plain ``nn.Linear``: a
soft-capped or scaled head (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``,
Granite's ``logits_scaling``) or any other module would make the hidden-state loss a different
loss. The model is called as usual (so DDP's hooks run) with ``logits_to_keep=1`` and
``output_hidden_states=True``; sharded heads (FSDP, DeepSpeed ZeRO) are left to the plain path.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from logitcache.errors import LogitCacheError
from logitcache.pipeline.student.losses.fused_linear import COUPLED_LOSSES

MODES = ("auto", "on", "off")
# transformers config attributes that transform the logits after the head's matmul.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# The first step's check: relative difference of the loss, and of the gradients (h, W) to their norm.
TOLERANCE = {"full": (1e-4, 1e-3), "half": (1e-3, 5e-2)}


def config_problem(cfg, spec) -> str | None:  # noqa: ANN001 (TrainConfig, losses.FusedLoss | None)
    """Why ``cfg`` takes the logits path whatever the model, or None.

    ``spec``: the hidden-state loss of ``cfg`` (``train.linear_loss_of``), None where there is none.
    """
    from logitcache.pipeline.student.losses import fused_linear_supports

    if len(cfg.caches()) > 1:
        return "several --cache teachers: the other teachers' KD reads the logits"
    if cfg.fsdp or cfg.deepspeed:
        return "--fsdp / --deepspeed shard the head's weight"
    if spec is None or not fused_linear_supports(spec):
        return f"--loss {cfg.loss} with these options (--kd-chunk-size, --kd-targets sample, a hybrid temperature) reads the logits"
    return None


def model_problem(model: torch.nn.Module) -> str | None:
    """Why ``model``'s logits are not ``F.linear(last hidden state, head)``, or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear:
        return f"the model's output head is {type(head).__name__}, not a plain torch.nn.Linear"
    config = getattr(model, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"the model's config sets {name}={value}: its logits are not the head's output"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "the model's forward takes no logits_to_keep (it would compute every logit anyway)"
    return None


def wanted(cfg, spec, model: torch.nn.Module | None, sharded: bool = False, device: str | None = None) -> bool:  # noqa: ANN001
    """Whether to train with the hidden-state loss: ``--fused-linear on`` refuses what cannot, in one line.

    ``model`` None: the options alone (before the model is loaded). ``sharded``: the Trainer
    shards the model (FSDP or DeepSpeed, also from an accelerate config). ``device``: the
    training device's type ("cpu", "cuda", ...), where known.
    """
    if cfg.fused_linear == "off":
        return False
    problem = config_problem(cfg, spec) or ("FSDP / DeepSpeed shard the head's weight" if sharded else None)
    problem = problem or (model_problem(model) if model is not None else None)
    if problem and cfg.fused_linear == "on":
        raise LogitCacheError(f"--fused-linear on: {problem}; use --fused-linear auto (or off) to train from the logits.")
    if cfg.fused_linear == "auto" and device == "cpu" and spec is not None and spec.loss in COUPLED_LOSSES:
        # Not a "cannot": their hidden-state path runs the head's matmul a fourth time, which a CPU
        # pays in full (1.8-3.6x the logits path's loss time, benchmarks/fused_linear.py --coupled),
        # while the memory it saves matters most on an accelerator. `on` still takes it.
        return False
    return problem is None


def self_check(hidden: torch.Tensor, head: torch.nn.Linear, plain: Callable[[torch.Tensor], torch.Tensor],
               fused: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> str | None:
    """Compare the two paths on ``hidden`` [B, T, d]: None when they agree, else what differs.

    ``plain(logits)`` and ``fused(hidden, weight, bias)`` return the loss of the same batch.
    Compares the loss and the gradients of hidden and weight (``torch.autograd.grad``: the
    parameters' ``.grad`` is untouched).
    """
    h = hidden.detach().requires_grad_()
    w = head.weight
    expected = plain(head(h))
    want = torch.autograd.grad(expected, [h, w])
    got_loss = fused(h, w, head.bias)
    got = torch.autograd.grad(got_loss, [h, w])
    # Half precision, or autocast (--bf16): the logits path rounds its logits to bf16, ours does not.
    full = hidden.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(hidden.device.type)
    tol_loss, tol_grad = TOLERANCE["full" if full else "half"]
    a, b = float(got_loss.detach()), float(expected.detach())
    if not abs(a - b) <= tol_loss * max(1.0, abs(b)):
        return f"loss {a:.6g} vs {b:.6g} from the logits"
    for name, g, r in zip(("hidden states", "head weight"), got, want):
        rel = float((g.float() - r.float()).norm()) / max(float(r.float().norm()), 1e-30)
        if not rel <= tol_grad:
            return f"the gradient of the {name} differs by {rel:.2g} of its norm from the logits path's"
    return None
