"""`logitcache inspect` and `logitcache verify`: look into a cache."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from logitcache.cli.common import user_errors

PARTIAL_EXIT = 3  # `verify`: sound, but the teacher run is unfinished (1: damaged, 2: usage)


@user_errors
def inspect(
    cache: Path = typer.Argument(..., help="Cache directory."),
    example: Optional[str] = typer.Option(None, "--example", "-e", help="Example id to show (default: the first)."),
    tokens: int = typer.Option(32, "--tokens", "-n", help="How many positions of the example to show."),
    alternatives: int = typer.Option(3, "--alternatives", "-a", help="Top alternatives shown per position."),
) -> None:
    """Summarise a cache and show one example token by token with the teacher's top alternatives."""
    from logitcache.errors import LogitCacheError
    from logitcache.storage import open_cache

    if tokens < 1:
        raise LogitCacheError(f"--tokens must be positive (got {tokens}).")
    if alternatives < 0:
        raise LogitCacheError(f"--alternatives must be 0 or more (got {alternatives}).")

    c = open_cache(cache)
    m = c.manifest
    console = Console()
    summary = Table(title=f"cache {cache}", show_header=False)
    bpt = m.num_bytes / m.num_tokens if m.num_tokens else 0.0
    for key, value in [
        ("status", m.status),
        ("teacher", f"{m.teacher.get('name')} ({m.teacher.get('dtype')}, {m.teacher.get('engine', '?')})"),
        ("tokenizer", f"{m.tokenizer.get('name')} (vocab {m.tokenizer.get('vocab_size')})"),
        ("mode / k", f"{m.mode} / top-{m.k}"),
        ("examples", f"{m.num_examples:,}"),
        ("tokens", f"{m.num_tokens:,}"),
        ("bytes", f"{m.num_bytes:,} in {len(m.shards)} shards"),
        ("bytes/token", f"{bpt:.1f}"),
        ("skipped", _skipped(m.skipped)),
        ("truncated", f"{m.num_truncated} (max_length {m.max_length})"),
        ("template", ", ".join(f"{k}={v!r}" for k, v in m.template.items() if k != "chat_template_sha256")),
        ("created", m.created_at),
    ]:
        summary.add_row(key, str(value))
    console.print(summary)
    if m.num_examples == 0:
        return
    row = c[example] if example is not None else next(iter(c))
    _show_example(console, c, row, tokens, alternatives)


def _skipped(skipped: dict[str, str]) -> str:
    """'3 (2 empty text, 1 text over --max-chars)': the count, and the count per reason."""
    if not skipped:
        return "0"
    by_reason = Counter(skipped.values())
    return f"{len(skipped)} (" + ", ".join(f"{n} {why}" for why, n in by_reason.most_common()) + ")"


def _show_example(console: Console, c, row: dict, n_show: int, n_alt: int) -> None:
    tok = _load_tokenizer(c, console)
    text, starts, ends = row["text"], row["char_start"], row["char_end"]
    n_pos = len(row["label_logprob"])
    # Start where the response starts: that is where students learn from the teacher.
    first = next((p for p in range(n_pos) if ends[p + 1] > row["prompt_chars"]), 0)
    table = Table(title=f"example {row['id']!r}: position p predicts token p+1")
    table.add_column("p", justify="right")
    table.add_column("next token")
    table.add_column("p(token)", justify="right")
    table.add_column(f"teacher's top {n_alt}")
    for p in range(first, min(n_pos, first + n_show)):
        surface = text[starts[p + 1] : ends[p + 1]]
        alts = []
        for j in range(min(n_alt, row["topk_ids"].shape[1])):
            tid = int(row["topk_ids"][p, j])
            piece = tok.decode([tid]) if tok is not None else str(tid)
            alts.append(f"{piece!r} {np.exp(float(row['topk_logprobs'][p, j])):.3f}")
        table.add_row(str(p), repr(surface), f"{np.exp(float(row['label_logprob'][p])):.3f}", "  ".join(alts))
    console.print(f"[bold]text[/bold] ({row['prompt_chars']} prompt chars): {text!r}", soft_wrap=True)
    console.print(table)


def _load_tokenizer(c, console: Console):
    """The cache's tokenizer, only once its files match the manifest; else ids are shown."""
    from logitcache.errors import LogitCacheError

    if not c.tokenizer_dir.is_dir():
        return None
    try:
        path = c.verified_tokenizer_dir()
    except LogitCacheError as e:
        console.print(f"[yellow]showing token ids, not pieces:[/yellow] {e}", soft_wrap=True)
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception:  # showing ids instead of pieces is fine for inspection
        return None


@user_errors
def verify(
    cache: Path = typer.Argument(..., help="Cache directory."),
    fast: bool = typer.Option(False, "--fast", help="Check hashes and counts only, not every value."),
    log_every: float = typer.Option(30.0, "--log-every", help="On a big cache, a progress line (shards checked, time left) on stderr every this many seconds; a bar on a terminal."),
) -> None:
    """Check a cache: every shard's sha256, row/token counts, sortedness, ranges, offsets, no NaN/inf.

    Exit codes:
    0: sound and complete (one OK line).
    3: sound so far, but the teacher run has not finished: the OK line ends `partial: N of M records`; rerun the teacher to continue.
    1: damaged: each problem listed, naming the shard.
    2: not a cache, or bad usage.
    """
    from logitcache.pipeline.progress import StepProgress, check_log_every
    from logitcache.storage import verify_cache

    check_log_every(log_every)
    # No opening or closing line: the result is one line, and only a long check logs more.
    with StepProgress("verify", 0, unit="shards", interval=log_every, stream=sys.stderr, ends=False) as bar:
        report = verify_cache(cache, check_values=not fast, on_shard=lambda done, total: bar.update(done, total=total))
    if report.ok:
        typer.echo(report.summary())
        if report.partial is not None:
            raise typer.Exit(PARTIAL_EXIT)
        return
    typer.echo(report.summary(), err=True)
    for problem in report.problems:
        typer.echo(f"  {problem}", err=True)
    raise typer.Exit(1)
