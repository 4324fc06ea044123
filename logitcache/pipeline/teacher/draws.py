"""Keys and uniforms of stage 1's sampled targets (--sample): torch-free, so run.py can key the draws.

Draw j at position p of an example is a function of (seed, example id, p, j) alone: a SplitMix64
stream keyed by a hash of the seed and id. Batching, chunking, resuming and the worker split never
change a draw (up to the teacher's own numerics, which batch composition can move by an ulp: a
uniform that falls within that of a CDF boundary may pick the neighbour).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (uint64 arithmetic wraps, as the algorithm wants)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sequence_key(seed: int, example_id: str) -> int:
    """The 64-bit key of one example's draws: the same seed and id give the same key on any machine."""
    digest = hashlib.blake2b(f"{int(seed)}\0{example_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def draw_uniforms(keys: Sequence[int], positions: Sequence[int], n_draws: int) -> np.ndarray:
    """Uniforms in [0, 1), float64 [sum(positions), n_draws]: draw j of position p of sequence i is
    a function of (keys[i], p, j) alone (a SplitMix64 stream), so batching never changes a draw."""
    if not keys:
        return np.zeros((0, n_draws))
    key = np.repeat(np.asarray(keys, dtype=np.uint64), np.asarray(positions, dtype=np.int64))
    pos = np.concatenate([np.arange(c, dtype=np.uint64) for c in positions]) if sum(positions) else np.zeros(0, np.uint64)
    counter = pos[:, None] * np.uint64(n_draws) + np.arange(n_draws, dtype=np.uint64)[None, :] + np.uint64(1)
    with np.errstate(over="ignore"):
        bits = _splitmix64(key[:, None] + counter * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
