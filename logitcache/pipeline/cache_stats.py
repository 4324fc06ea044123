"""What a cache holds, as distributions: `logitcache inspect CACHE --stats`.

Streamed: rows come from the reader one record batch at a time and each leaves only counts
behind, so a cache of any size is scanned in flat memory. Bounded quantities (a probability, a
mass, an entropy in [0, log k]) go into fixed-bin histograms of ``BINS`` bins: their means are
exact, their quantiles within one bin width. Sequence lengths are integers, counted exactly.

The teacher's figures count only target positions (the ones a student learns from), decided by
``align.target_positions`` as training decides them: position p predicts token p+1 and is a
target when that token ends after the prompt. numpy only.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from logitcache.pipeline.student.align import ALIGNMENTS, target_positions
from logitcache.storage.spans import row_spans
from logitcache.storage.rows import Row

if TYPE_CHECKING:
    from logitcache.pipeline.student.features import FeatureStats

BINS = 1000
QUANTILES = (0.1, 0.5, 0.9)


@dataclass
class ValueHistogram:
    """Values in [lo, hi] (clipped into it), kept as ``BINS`` counts, an exact sum, min and max."""

    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        values = np.clip(np.asarray(values, dtype=np.float64), self.lo, self.hi)
        width = (self.hi - self.lo) / len(self.counts)
        # hi itself falls in the last bin; a zero-width range (k = 1: entropy is always 0) in the first
        at = np.minimum(((values - self.lo) / width).astype(np.int64), len(self.counts) - 1) if width > 0 else 0
        self.counts += np.bincount(np.atleast_1d(at), minlength=len(self.counts))[: len(self.counts)]
        self.total += float(values.sum())
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))

    def quantile(self, q: float) -> float:
        """The q-quantile, interpolated inside its bin (so within one bin width of the exact one)."""
        n = self.n
        if not n:
            return math.nan
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, q * n))
        before = cum[i - 1] if i else 0
        inside = (q * n - before) / self.counts[i] if self.counts[i] else 0.0
        width = (self.hi - self.lo) / len(self.counts)
        return float(np.clip(self.lo + (i + inside) * width, self.low, self.high))


@dataclass
class LengthCounts:
    """Integers (tokens per example), counted exactly: ``counts[v]`` examples have length v."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def mean(self) -> float:
        return float((np.arange(len(self.counts)) * self.counts).sum() / self.n) if self.n else math.nan

    @property
    def low(self) -> float:
        return float(np.flatnonzero(self.counts)[0]) if self.n else math.nan

    @property
    def high(self) -> float:
        return float(np.flatnonzero(self.counts)[-1]) if self.n else math.nan

    def add(self, value: int) -> None:
        if value >= len(self.counts):
            grown = np.zeros(max(value + 1, 2 * len(self.counts)), dtype=np.int64)
            grown[: len(self.counts)] = self.counts
            self.counts = grown
        self.counts[value] += 1

    def quantile(self, q: float) -> float:
        """The smallest length that at least a fraction q of the examples do not exceed
        (numpy's ``method="inverted_cdf"``): always a length some example has."""
        if not self.n:
            return math.nan
        return float(np.searchsorted(np.cumsum(self.counts), q * self.n))


@dataclass
class CacheStats:
    """The distributions of a scan of a cache (see the module), and with a student tokenizer, its
    alignment counts per alignment (``FeatureStats``, as training counts them)."""

    k: int
    examples: int = 0
    positions: int = 0  # all positions (each predicts the next token)
    targets: int = 0  # of which targets: the teacher figures count these
    lengths: LengthCounts = field(default_factory=LengthCounts)
    top1: ValueHistogram = field(default_factory=lambda: ValueHistogram(0.0, 1.0))
    tail: ValueHistogram = field(default_factory=lambda: ValueHistogram(0.0, 1.0))
    entropy: ValueHistogram = field(init=False)
    alignment: dict[str, "FeatureStats"] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.entropy = ValueHistogram(0.0, math.log(max(self.k, 1)))

    def add(self, row: Row) -> None:
        n = len(row["input_ids"])
        self.examples += 1
        self.lengths.add(n)
        self.positions += max(n - 1, 0)
        targets = target_positions(row["char_start"], row["char_end"], row_spans(row))
        self.targets += len(targets)
        if not len(targets) or self.k == 0:  # a cache of draws alone has no top-k to describe
            return
        top1, tail, entropy = topk_figures(np.asarray(row["topk_logprobs"])[targets])
        self.top1.add(top1)
        self.tail.add(tail)
        self.entropy.add(entropy)


def topk_figures(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position, from its stored top-k log-probabilities ([n, k]):

    * the top-1 probability;
    * the tail mass, ``1 - sum(exp(top-k))``: what the cache leaves out (float16 rounding can
      push it a little below 0: clipped to 0);
    * the entropy in nats of the top-k renormalised to sum to 1 (the distribution a top-k KD
      loss sees), in [0, log k]; not the full-vocabulary entropy, which the cache cannot give.
    """
    p = np.exp(logprobs.astype(np.float64))
    mass = p.sum(axis=1)
    q = p / np.where(mass > 0, mass, 1.0)[:, None]
    entropy = -(q * np.log(np.where(q > 0, q, 1.0))).sum(axis=1)
    return p.max(axis=1), np.clip(1.0 - mass, 0.0, 1.0), entropy


def cache_stats(cache, limit: int | None = None, student_tokenizer=None) -> CacheStats:
    """Scan the first ``limit`` examples (None: all) of ``cache`` (a CacheReader) once.

    With ``student_tokenizer``, every row also goes through training's featurizer once per
    alignment (``featurizer_for_cache``), so the matched fractions are training's own.
    """
    stats = CacheStats(k=cache.k)
    featurizers = {}
    if student_tokenizer is not None:
        from logitcache.pipeline.student.features import featurizer_for_cache

        featurizers = {a: featurizer_for_cache(cache, student_tokenizer, a) for a in ALIGNMENTS}
    for row in itertools.islice(cache, limit):
        stats.add(row)
        for featurize in featurizers.values():
            featurize(row)
    stats.alignment = {a: f.stats for a, f in featurizers.items()}
    return stats
