"""Exact teacher targets at other temperatures, and std-normalised, from a top-k cache.

A cache stores per position the top-k log-probabilities at temperature 1 and the raw
logits' log-normaliser ``lse``, so a stored entry's raw logit is ``logprob + lse``. With
the log-normaliser at temperature tau (``lse_tau``, stage 1's ``--temperatures``) or of the
std-normalised logits (``lse_std``, ``--logit-stats``), the same entries are exact over the
full vocabulary at tau, or after dividing by std + 1e-4: renormalising the k entries is not
needed, and the mass outside them is ``1 - sum(exp(...))``, exactly.

Pure functions on tensors; torch only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from logitcache.errors import LogitCacheError

STD_EPS = 1e-4  # MultiLevelOT's code: logits / (std + 1e-4); stage 1 stores lse_std with it


def tempered_logprobs(logprobs: torch.Tensor, lse: torch.Tensor, lse_tau: torch.Tensor, tau: float) -> torch.Tensor:
    """Full-vocabulary log-probabilities at temperature ``tau`` of the cached entries.

    Args:
        logprobs: [..., K] the cached top-k log-probabilities at temperature 1.
        lse: [...] the raw logits' log-normaliser (the cache's ``logsumexp``).
        lse_tau: [...] ``logsumexp(logits / tau)`` (the cache's ``lse_tau`` column for ``tau``).
        tau: the temperature.

    Returns:
        [..., K] ``log_softmax(logits / tau)`` at the cached ids: ``(logprobs + lse) / tau - lse_tau``.
    """
    return (logprobs + lse.unsqueeze(-1)) / tau - lse_tau.unsqueeze(-1)


def std_normalised_logprobs(
    logprobs: torch.Tensor, lse: torch.Tensor, std: torch.Tensor, lse_std: torch.Tensor, eps: float = STD_EPS
) -> torch.Tensor:
    """Full-vocabulary log-probabilities of the std-normalised logits at the cached entries.

    Args:
        logprobs: [..., K] the cached top-k log-probabilities at temperature 1.
        lse: [...] the raw logits' log-normaliser.
        std: [...] the logits' standard deviation over the vocabulary (``logit_std``).
        lse_std: [...] ``logsumexp(logits / (std + eps))`` (``lse_std``).
        eps: added to ``std``; must be the one stage 1 used (1e-4).

    Returns:
        [..., K] ``log_softmax(logits / (std + eps))`` at the cached ids.
    """
    return (logprobs + lse.unsqueeze(-1)) / (std.unsqueeze(-1) + eps) - lse_std.unsqueeze(-1)


def tau_column(temperatures: Sequence[float], tau: float, *, has_logsumexp: bool = True) -> int:
    """Index of ``tau`` in a cache's ``temperatures`` (the ``lse_tau`` column to use).

    Raises LogitCacheError naming the teacher flag that adds it when the cache lacks it, or
    naming ``--engine hf`` when the cache's engine gave no log-normaliser (vllm).
    """
    for j, t in enumerate(temperatures):
        if abs(float(t) - float(tau)) <= 1e-9 * max(1.0, abs(float(tau))):
            return j
    if not has_logsumexp:
        raise LogitCacheError(
            f"temperature {tau:g} needs the teacher's log-normaliser, which this cache lacks (its engine, vllm, "
            f"gives none); rewrite it with `logitcache teacher --engine hf --temperatures {tau:g}`."
        )
    have = ", ".join(f"{t:g}" for t in temperatures) or "none"
    raise LogitCacheError(
        f"temperature {tau:g} is not in this cache (extra temperatures: {have}); rewrite it with "
        f"`logitcache teacher --temperatures {tau:g}`, or use one it has."
    )


def manifest_tau_column(manifest: Any, tau: float) -> int:
    """:func:`tau_column` for a cache's manifest (``temperatures``, and its engine's log-normaliser)."""
    return tau_column(
        list(getattr(manifest, "temperatures", []) or []), tau,
        has_logsumexp=manifest.teacher.get("logsumexp", True) is not False,
    )


def require_logit_stats(manifest: Any, what: str = "this loss") -> None:
    """Refuse, naming ``--logit-stats``, a cache without the logit statistics."""
    if getattr(manifest, "logit_stats", False):
        return
    if manifest.teacher.get("logsumexp", True) is False:
        raise LogitCacheError(
            f"{what} needs the teacher's logit statistics, which a vllm cache cannot hold; rewrite the cache "
            "with `logitcache teacher --engine hf --logit-stats`."
        )
    raise LogitCacheError(
        f"{what} needs the teacher's logit statistics, which this cache lacks; rewrite it with "
        "`logitcache teacher --logit-stats`."
    )
