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
    cache: str = typer.Argument(..., help="Cache directory, or an fsspec URL (s3://bucket/cache, gs://, az://, hf://datasets/me/cache; the protocol's extra installed, e.g. pip install 'logitcache[s3]')."),
    example: Optional[str] = typer.Option(None, "--example", "-e", help="Example id to show (default: the first)."),
    tokens: int = typer.Option(32, "--tokens", "-n", help="How many positions of the example to show."),
    alternatives: int = typer.Option(3, "--alternatives", "-a", help="Top alternatives shown per position."),
    stats: bool = typer.Option(False, "--stats", help="Scan the whole cache: lengths, teacher top-1 probability, top-k entropy, tail mass beyond k."),
    student: Optional[str] = typer.Option(None, "--student", help="A student tokenizer (directory or hub name); implies --stats: the fraction of its targets that align with the cache, as training aligns them."),
    limit: Optional[int] = typer.Option(None, "--limit", help="With --stats, scan only the first N examples (default: all)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Implies --stats: draw the distributions into this .png/.pdf/.svg (needs `pip install 'logitcache[plot]'`)."),
    ids: bool = typer.Option(False, "--ids", help="List the example ids, one per line, and nothing else."),
    local_cache: Optional[Path] = typer.Option(None, "--local-cache", help="With a URL: keep verified local copies of whole shards in this directory (sha256 checked on download, reused by later runs, fetched again if damaged) instead of streaming row groups."),
) -> None:
    """Summarise a cache and show one example token by token with the teacher's top alternatives.

    --stats (implied by --student and --plot) shows distributions over the cache instead of an example;
    --ids lists the ids (`| head` works).
    """
    from logitcache.errors import LogitCacheError
    from logitcache.storage import open_cache

    if tokens < 1:
        raise LogitCacheError(f"--tokens must be positive (got {tokens}).")
    if alternatives < 0:
        raise LogitCacheError(f"--alternatives must be 0 or more (got {alternatives}).")
    _check_ids_alone(ids, stats=stats, student=student, limit=limit, plot=plot, example=example)
    stats = stats or student is not None or plot is not None
    if limit is not None and not stats:
        raise LogitCacheError("--limit counts the examples that --stats scans; add --stats.")
    if limit is not None and limit < 1:
        raise LogitCacheError(f"--limit must be 1 or more (got {limit}); leave it out to scan every example.")
    if plot is not None:
        from logitcache.pipeline.cache_plot import check_plot_path, require_matplotlib

        check_plot_path(plot)
        require_matplotlib()

    c = open_cache(cache, local_cache=local_cache)
    if ids:
        _print_ids(c)
        return
    row = c[example] if example is not None else None  # an unknown id is refused before anything is printed
    student_tok = _load_student(student) if student is not None else None
    console = Console()
    show_summary(c, cache, console)
    if stats:
        _show_stats(console, c, limit, student_tok, plot)
        if example is None:
            return
    show_example(c, row, tokens, alternatives, console)


def show_example(c, row: dict | None = None, tokens: int = 32, alternatives: int = 3,  # noqa: ANN001
                 console: Console | None = None) -> None:
    """Print one example of the open cache ``c`` (``row``; None: the first) token by token, with
    the teacher's top alternatives; nothing for an empty cache."""
    if c.manifest.num_examples == 0:
        return
    _show_example(console or Console(), c, row if row is not None else next(iter(c)), tokens, alternatives)


def show_summary(c, path: str | Path, console: Console | None = None) -> None:  # noqa: ANN001
    """Print the summary table of the open cache ``c`` (what `inspect` prints first)."""
    m = c.manifest
    summary = Table(title=f"cache {path}", show_header=False)
    bpt = m.num_bytes / m.num_tokens if m.num_tokens else 0.0
    for key, value in [
        ("status", m.status),
        ("teacher", f"{m.teacher.get('name')} ({m.teacher.get('dtype')}, {m.teacher.get('engine', '?')})"),
        ("tokenizer", f"{m.tokenizer.get('name')} (vocab {m.tokenizer.get('vocab_size')})"),
        ("mode / k", f"{m.mode} / " + (f"top-{m.k}" if m.k else "no top-k")
         + (f", {m.sample} draws per position" if m.sample else "")),
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
    (console or Console()).print(summary)


def _check_ids_alone(ids: bool, **others) -> None:
    """--ids prints ids and nothing else, for pipes: any option that prints more is refused."""
    from logitcache.errors import LogitCacheError

    given = [f"--{name}" for name, value in others.items() if value not in (None, False)]
    if ids and given:
        raise LogitCacheError(
            f"--ids lists the ids and nothing else; drop {', '.join(given)}, or run it as a second command."
        )


def _print_ids(c) -> None:
    # Plain writes, not rich: ids go to a pipe (`| head`, `| wc -l`), one per line, as they are.
    try:
        for example_id in c.ids():
            sys.stdout.write(example_id + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader has what it wanted (`| head`). Python would flush stdout again at exit and
        # complain on stderr: point stdout at /dev/null so that it stays quiet.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _load_student(name: str):
    from logitcache.pipeline.loading import load_tokenizer
    from logitcache.pipeline.offsets import require_fast_tokenizer

    # Like the cache's tokenizer in training, a name on the command line never runs code.
    tok = load_tokenizer(name, "--student", trust_remote_code=False)
    require_fast_tokenizer(tok, "student tokenizer")
    return tok


def _show_stats(console: Console, c, limit: Optional[int], student_tok, plot: Optional[Path]) -> None:
    from logitcache.pipeline.cache_stats import QUANTILES, cache_stats

    s = cache_stats(c, limit, student_tok)
    scope = "every example" if limit is None or limit >= len(c) else f"the first {s.examples:,} examples"
    table = Table(title=f"distributions over {scope}: {s.targets:,} of {s.positions:,} positions are targets")
    table.add_column("")
    for name in ("mean", "min", *(f"p{round(100 * q)}" for q in QUANTILES), "max"):
        table.add_column(name, justify="right")
    rows = [("tokens per example", s.lengths, "{:.1f}")]
    if c.k:  # a cache of draws alone (k = 0) has no top-k to describe
        rows += [("teacher top-1 probability", s.top1, "{:.3f}"),
                 (f"entropy of the top-{c.k}, renormalised (nats)", s.entropy, "{:.3f}"),
                 (f"tail mass beyond top-{c.k}", s.tail, "{:.4f}")]
    for label, dist, fmt in rows:
        values = [dist.mean, dist.low, *(dist.quantile(q) for q in QUANTILES), dist.high]
        table.add_row(label, *(fmt.format(v) for v in values))
    console.print(table)
    if not c.k:
        console.print(f"no top-k in this cache (k = 0): its teacher targets are {c.manifest.sample} draws per position")
    if s.alignment:
        _show_alignment(console, s.alignment, getattr(student_tok, "name_or_path", "") or "the student")
    if plot is not None:
        from logitcache.pipeline.cache_plot import plot_cache_stats

        plot_cache_stats(s, plot, title=str(c.path))
        console.print(f"plot written to {plot}")


def _show_alignment(console: Console, alignment: dict, name: str) -> None:
    table = Table(title=f"student tokenizer {name}: its target positions aligned with the cache")
    for column in ("alignment", "student targets", "aligned", "fraction", "text only", "examples without KD"):
        table.add_column(column, justify="left" if column == "alignment" else "right")
    for how, st in alignment.items():
        table.add_row(how, f"{st.targets:,}", f"{st.matched:,}", f"{st.fraction_matched:.1%}",
                      f"{st.fraction_text_matched:.1%}", f"{st.no_kd:,}")
    console.print(table)


def _skipped(skipped: dict[str, str]) -> str:
    """'3 (2 empty text, 1 text over --max-chars)': the count, and the count per reason."""
    if not skipped:
        return "0"
    by_reason = Counter(skipped.values())
    return f"{len(skipped)} (" + ", ".join(f"{n} {why}" for why, n in by_reason.most_common()) + ")"


def _show_example(console: Console, c, row: dict, n_show: int, n_alt: int) -> None:
    from logitcache.pipeline.student.align import target_positions
    from logitcache.storage.spans import row_spans

    tok = _load_tokenizer(c, console)
    text, starts, ends = row["text"], row["char_start"], row["char_end"]
    n_pos = len(row["label_logprob"])
    # Start where the first target starts: that is where students learn from the teacher.
    spans = row_spans(row)
    targets = target_positions(starts, ends, spans)
    first = int(targets[0]) if len(targets) else 0
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
    shown = ", ".join(f"[{int(a)}, {int(b)})" for a, b in spans) or "none"
    console.print(f"[bold]text[/bold] (target spans: {shown}): {text!r}", soft_wrap=True)
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
    cache: str = typer.Argument(..., help="Cache directory, or an fsspec URL (s3://bucket/cache, gs://, az://, hf://datasets/me/cache; the protocol's extra installed, e.g. pip install 'logitcache[s3]')."),
    fast: bool = typer.Option(False, "--fast", help="Check hashes and counts only, not every value."),
    log_every: float = typer.Option(30.0, "--log-every", help="On a big cache, a progress line (shards checked, time left) on stderr every this many seconds; a bar on a terminal."),
    local_cache: Optional[Path] = typer.Option(None, "--local-cache", help="With a URL: keep verified local copies of whole shards in this directory (sha256 checked on download, reused by later runs, fetched again if damaged) instead of streaming row groups."),
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
        report = verify_cache(cache, check_values=not fast, local_cache=local_cache,
                              on_shard=lambda done, total: bar.update(done, total=total))
    if report.ok:
        typer.echo(report.summary())
        if report.partial is not None:
            raise typer.Exit(PARTIAL_EXIT)
        return
    typer.echo(report.summary(), err=True)
    for problem in report.problems:
        typer.echo(f"  {problem}", err=True)
    raise typer.Exit(1)
