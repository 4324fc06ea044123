"""A reimplementation, for comparison only, of the best-known offline KD toolkit's top-k storage.

Written from the published description of arcee-ai's DistillKit ("polynomial approximation
of the logit distribution curve, quantisation of residuals, bit-level packing with
arbitrary bit widths"; its README's ``logprob_compressor`` settings), not from its code:

* per position, the top-k log-probs sorted descending; the first ``exact_k`` stored as
  floats (``exact_dtype``: float16 or bfloat16);
* the remaining ``k - exact_k`` approximated by a least-squares fit over the rank ``t``
  (normalised to [0, 1]) with the terms ``1, t, t², t³, t⁴, √t`` (the README's recommended
  ``polynomial_terms: [0, 1, 2, 3, 4, "sqrt"]``), coefficients stored as float32;
* optionally one residual bin: a float32 scale and ``bits``-bit signed residuals
  ``round((lp - fit) / scale)`` for every approximated entry (scale = max |residual| /
  (2^(bits-1) - 1), so the error is at most scale / 2);
* ids as ``ceil(log2 V)``-bit integers; all fields of a position bit-packed into one
  record padded to whole bytes (no entropy coding: every position costs the same).

Error diffusion (an option its README recommends against) and delta encoding are left out.
Pure numpy; the decode speed measured is this implementation's, not DistillKit's (torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PolyConfig:
    k: int
    vocab: int
    exact_k: int
    exact_dtype: str = "float16"  # or "bfloat16"
    residual_bits: int = 0  # 0: no residual bin (the README's recommended setting)

    @property
    def id_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.vocab)))

    @property
    def n_terms(self) -> int:
        return len(TERMS) if self.k > self.exact_k else 0

    def record_bits(self) -> int:
        tail = self.k - self.exact_k
        bits = 16 * self.exact_k + 32 * self.n_terms + self.k * self.id_bits
        if tail and self.residual_bits:
            bits += 32 + tail * self.residual_bits
        return bits

    def record_bytes(self) -> int:
        return (self.record_bits() + 7) // 8


TERMS = ("1", "t", "t2", "t3", "t4", "sqrt")


def _design(cfg: PolyConfig) -> np.ndarray:
    t = np.linspace(0.0, 1.0, cfg.k - cfg.exact_k) if cfg.k - cfg.exact_k > 1 else np.zeros(cfg.k - cfg.exact_k)
    return np.stack([np.ones_like(t), t, t**2, t**3, t**4, np.sqrt(t)], axis=1)


def _to_bits(values: np.ndarray, width: int) -> np.ndarray:
    """[m, c] unsigned ints -> [m, c * width] bits, most significant first."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    return ((values.astype(np.uint64)[..., None] >> shifts) & 1).astype(np.uint8).reshape(len(values), -1)


def _from_bits(bits: np.ndarray, width: int) -> np.ndarray:
    m = len(bits)
    weights = (np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64))
    return (bits.reshape(m, -1, width).astype(np.uint64) * weights).sum(axis=2)


def _exact_bits(lp: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return lp.astype(np.float16).view(np.uint16)
    return (lp.astype(np.float32).view(np.uint32) + 0x8000 >> 16).astype(np.uint16)  # bfloat16, round to nearest


def _exact_values(u16: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return u16.astype(np.uint16).view(np.float16).astype(np.float32)
    return (u16.astype(np.uint32) << 16).view(np.float32)


def encode(ids: np.ndarray, lp: np.ndarray, cfg: PolyConfig) -> bytes:
    """[m, k] ids and descending log-probs -> m fixed-size records."""
    m, k = lp.shape
    fields = [_to_bits(_exact_bits(lp[:, : cfg.exact_k], cfg.exact_dtype), 16)]
    tail = k - cfg.exact_k
    if tail:
        a = _design(cfg)
        coef = (np.linalg.pinv(a) @ lp[:, cfg.exact_k :].astype(np.float64).T).T.astype(np.float32)
        fields.append(_to_bits(coef.view(np.uint32), 32))
        if cfg.residual_bits:
            resid = lp[:, cfg.exact_k :].astype(np.float64) - coef.astype(np.float64) @ a.T
            levels = (1 << (cfg.residual_bits - 1)) - 1
            scale = (np.abs(resid).max(axis=1) / max(levels, 1)).astype(np.float32)
            safe = np.where(scale > 0, scale, 1).astype(np.float64)[:, None]
            q = np.clip(np.rint(resid / safe), -levels, levels).astype(np.int64) + levels
            fields += [_to_bits(scale.view(np.uint32)[:, None], 32), _to_bits(q, cfg.residual_bits)]
    fields.append(_to_bits(ids.astype(np.uint64), cfg.id_bits))
    return np.packbits(np.concatenate(fields, axis=1), axis=1).tobytes()


def decode(blob: bytes, cfg: PolyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode`: ([m, k] int32 ids, [m, k] float32 log-probs)."""
    k, rb = cfg.k, cfg.record_bytes()
    recs = np.frombuffer(blob, np.uint8).reshape(-1, rb)
    bits = np.unpackbits(recs, axis=1)
    at = 16 * cfg.exact_k
    out = np.empty((len(recs), k), np.float32)
    out[:, : cfg.exact_k] = _exact_values(_from_bits(bits[:, :at], 16), cfg.exact_dtype)
    tail = k - cfg.exact_k
    if tail:
        n = cfg.n_terms
        coef = _from_bits(bits[:, at : at + 32 * n], 32).astype(np.uint32).view(np.float32)
        at += 32 * n
        approx = coef.astype(np.float64) @ _design(cfg).T
        if cfg.residual_bits:
            scale = _from_bits(bits[:, at : at + 32], 32).astype(np.uint32).view(np.float32)
            at += 32
            levels = (1 << (cfg.residual_bits - 1)) - 1
            q = _from_bits(bits[:, at : at + tail * cfg.residual_bits], cfg.residual_bits).astype(np.int64) - levels
            at += tail * cfg.residual_bits
            approx = approx + q * scale.astype(np.float64)
        out[:, cfg.exact_k :] = approx
    ids = _from_bits(bits[:, at : at + k * cfg.id_bits], cfg.id_bits).astype(np.int32)
    return ids, out
