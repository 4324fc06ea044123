"""Forward KL to sampled teacher targets: Random Sampling KD (issue 15 §3).

Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (ACL 2025,
arXiv 2503.16870): N tokens drawn per position from a proposal q, each weighted by p/q, give an
estimate p̂ of the teacher's p with E[p̂] = p. Stage 1 draws from q = p itself (storage/samples.py),
so the weights are ``count / N``. The loss ``sum_x p̂(x) (log p̂(x) - log s(x))`` is linear in p̂
except for its constant entropy term, so its gradient in the student's logits,
``softmax(z) - p̂`` per position, has expectation ``softmax(z) - p``: the full-vocabulary forward
KL's gradient, unbiased. A top-k target renormalised (or with a lumped tail) is not.

Reverse KL and JSD need the teacher's log-probability wherever the student has mass, which draws
cannot estimate without bias (log of an estimate, and zero outside the drawn ids): not offered.
"""

from __future__ import annotations

import torch

from logitcache.pipeline.student.losses.chunking import logsumexp_last


def sampled_kl_loss(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p̂ || s) per position, averaged over the masked-in positions.

    Args:
        student_logits: [N, V] the student's logits at N positions.
        sample_ids: [N, S] ids drawn from the teacher (distinct per position; padding anywhere).
        sample_weights: [N, S] p̂ of each id, ``count / draws`` (>= 0, summing to 1 per position;
            padding has weight 0 and adds nothing).
        mask: [N] bool, the positions that count.
        weights: [N] per-position weights, the loss being ``sum_n weights[n] * KL_n`` over the
            masked-in n (as kl_loss; see ``kd_weights``). None: the mean over masked-in positions.

    Returns:
        A scalar: ``KL_n = sum_j p̂_nj (log p̂_nj - log_softmax(student_logits_n)[id_nj])``, reduced
        as above; 0 (with a gradient path) when no position is masked in.
    """
    m = mask.bool()
    if not m.any():
        return student_logits.sum() * 0.0
    z = student_logits[m].float()
    ids = sample_ids[m].long()
    p = sample_weights[m].float()
    log_s = z.gather(-1, ids) - logsumexp_last(z)
    log_p = torch.where(p > 0, p, torch.ones_like(p)).log()  # 0 * log 0 = 0
    per_pos = (p * (log_p - log_s)).sum(-1)
    if weights is None:
        return per_pos.mean()
    return (per_pos * weights[m].to(per_pos.dtype)).sum()
