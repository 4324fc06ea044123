"""`logitcache merge`: join the parts written by the workers of a cluster run into one cache."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from logitcache.cli.common import Stages, user_errors


@user_errors
def merge(
    out: str = typer.Argument(..., help="The merged cache to write: a new or empty directory, or a URL (s3://bucket/merged, hf://datasets/ORG/NAME; written in --local-cache, then uploaded, manifest last)."),
    parts: list[str] = typer.Argument(..., help="The workers' part directories, or the directory holding their part-* directories (what the cluster run gave `logitcache teacher --out`); URLs too (each is downloaded and checked first)."),
    copy: bool = typer.Option(False, "--copy", help="Copy the shards instead of hard-linking them (hard links need OUT on the parts' filesystem and take no extra space; across filesystems merge copies anyway)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every shard's size and sha256 against its part's manifest before merging."),
    log_every: float = typer.Option(30.0, "--log-every", help="On big parts, a progress line per stage (shards done, time left) on stderr every this many seconds; a bar on a terminal."),
    local_cache: Optional[Path] = typer.Option(None, "--local-cache", help="With URLs: the local directory where remote parts are downloaded and the merged cache is written before upload (it holds full local copies). Default: $LOGITCACHE_STAGING/<slug of the URL>, else ~/.cache/logitcache/staging/<slug of the URL>."),
) -> None:
    """Join the parts of a cluster run (`logitcache teacher --num-parts N`) into one cache.

    Checks that the parts are every worker of one run, complete, made with the same settings,
    with every example exactly once; then links their shards into OUT/data/ (no Parquet is
    rewritten) and writes OUT/manifest.json last.

    Example:

        logitcache merge cache/ cache-parts/
    """
    from logitcache.pipeline.progress import check_log_every
    from logitcache.storage.sync import merge_through

    check_log_every(log_every)
    with warnings.catch_warnings(), Stages("merge", log_every) as stages:
        warnings.simplefilter("ignore")  # the report carries them; printed below as one line each
        report = merge_through(out, parts, local_cache, link=not copy, verify=verify, on_shard=stages.update)
    if report is None:
        typer.echo(f"the merged cache staged before was complete; uploaded it to {out}")
        return
    for message in report.warnings:
        typer.echo(f"warning: {message}", err=True)
    typer.echo(report.summary())
