"""`logitcache inspect CACHE --plot out.png`: the distributions of ``cache_stats`` drawn.

matplotlib is an optional extra (``pip install 'logitcache[plot]'``), imported only here and
only when a plot is asked for; :func:`require_matplotlib` refuses before any work is done.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.pipeline.cache_stats import CacheStats, ValueHistogram

PLOT_SUFFIXES = (".png", ".pdf", ".svg")
SHOWN_BINS = 50  # the histograms' 1000 bins, merged for the eye


def require_matplotlib():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), or a one-line refusal."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LogitCacheError("--plot needs matplotlib: pip install 'logitcache[plot]'") from None
    return plt


def check_plot_path(path: Path) -> None:
    """Refuse, before any work, a plot file that could not be written."""
    if path.is_dir():
        raise LogitCacheError(f"--plot {path} is a directory; give a file name such as {path / 'stats.png'}.")
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise LogitCacheError(f"--plot {path}: give a file name ending in {', '.join(PLOT_SUFFIXES)}.")
    if not path.parent.is_dir():
        raise LogitCacheError(f"--plot {path}: the directory {path.parent} does not exist; create it or choose another.")


def _stairs(ax, h: ValueHistogram, title: str, xlabel: str) -> None:
    counts = h.counts.reshape(SHOWN_BINS, -1).sum(axis=1)
    ax.stairs(counts, np.linspace(h.lo, h.hi, SHOWN_BINS + 1), fill=True)
    ax.set(title=f"{title} (mean {h.mean:.3f})", xlabel=xlabel, ylabel="target positions")


def _alignment_bars(ax, stats: CacheStats) -> None:
    names = list(stats.alignment)
    fractions = [stats.alignment[a].fraction_matched for a in names]
    ax.bar(names, fractions)
    for i, f in enumerate(fractions):
        ax.text(i, f, f"{f:.1%}", ha="center", va="bottom")
    ax.set(title="student targets aligned", ylim=(0, 1.1), ylabel="fraction")


def plot_cache_stats(stats: CacheStats, path: Path, title: str = "") -> None:
    """Histograms of lengths, top-1 probability, tail mass and top-k entropy, and with a student,
    a panel of the aligned fractions; written to ``path`` (its suffix picks the format)."""
    plt = require_matplotlib()
    fig, grid = plt.subplots(2, 3, figsize=(13, 7), layout="constrained")
    axes = grid.ravel()
    low, high = (int(stats.lengths.low), int(stats.lengths.high)) if stats.lengths.n else (0, 0)
    ax = axes[0]
    counts = stats.lengths.counts[low : high + 1] if stats.lengths.n else np.zeros(1)
    ax.hist(np.arange(low, high + 1), bins=min(SHOWN_BINS, high - low + 1), weights=counts)
    ax.set(title=f"tokens per example (mean {stats.lengths.mean:.1f})", xlabel="tokens", ylabel="examples")
    _stairs(axes[1], stats.top1, "teacher top-1 probability", "p(top-1)")
    _stairs(axes[2], stats.tail, "tail mass beyond top-k", "1 - sum p(top-k)")
    _stairs(axes[3], stats.entropy, "entropy of top-k, renormalised", "nats")
    if stats.alignment:
        _alignment_bars(axes[4], stats)
    else:
        axes[4].set_axis_off()
    axes[5].set_axis_off()
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)
