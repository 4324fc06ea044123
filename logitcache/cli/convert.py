"""`logitcache convert`: rewrite a cache with another codec (v1 <-> compact)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from logitcache.cli.common import RESUME_CONVERT, Stages, shard_bytes, user_errors

# What each stage of storage.convert counts.
_UNITS = {"checking": "shards", "converting": "examples", "verifying": "shards", "comparing": "examples"}


@user_errors(interrupted=RESUME_CONVERT)
def convert(
    cache: str = typer.Argument(..., help="The complete cache to convert, a directory or a URL (downloaded and checked first); it is only read."),
    out: str = typer.Argument(..., help="Where to write the converted cache: a new or empty directory (or an interrupted convert of CACHE to --codec, which is resumed), or a URL (written in --local-cache, then uploaded, manifest last)."),
    codec: str = typer.Option(..., "--codec", help="v1: plain Parquet for datasets/pandas/DuckDB; compact: about half the disk, read by logitcache only."),
    shard_size_mb: float = typer.Option(256.0, "--shard-size-mb", help="Target size of one Parquet shard of OUT."),
    log_every: float = typer.Option(30.0, "--log-every", help="On a big cache, a progress line per stage (done, time left) on stderr every this many seconds; a bar on a terminal."),
    local_cache: Optional[Path] = typer.Option(None, "--local-cache", help="With URLs: the local directory where a remote CACHE is downloaded and OUT is written before upload (it holds full local copies). Default: $LOGITCACHE_STAGING/<slug of the URL>, else ~/.cache/logitcache/staging/<slug of the URL>."),
) -> None:
    """Rewrite a complete cache into OUT with another codec, carrying over every column and the manifest.

    When to use it: to share a cache with people who read it with `datasets`, pandas or DuckDB,
    convert it to v1 (plain Parquet; a compact cache shows them opaque byte columns). To save disk
    for logitcache's own readers (training, verify, inspect), convert it to compact (about half
    the bytes; log-probs within 0.008 nats).

    OUT is written like a teacher run's cache (shards appear only when complete, each hashed in
    the manifest) and checked both ways before it is marked complete: it passes `logitcache verify`,
    and its rows decode to the source's (to v1: exactly the float16 of the source's log-probs; to
    compact: within the codec's bound). The last line says so.

    Interrupted (Ctrl-C, SIGTERM, a crash): OUT is left partial, and rerunning the same command
    resumes it, keeping the finished shards. Any other non-empty OUT is refused.

    Example:

        logitcache convert cache/ cache-v1/ --codec v1
    """
    import logitcache
    from logitcache.pipeline.progress import check_log_every
    from logitcache.storage.convert import convert_cache
    from logitcache.storage.remote import is_url
    from logitcache.storage.sync import staged_inputs, staging_dir, written_through

    check_log_every(log_every)
    size = shard_bytes(shard_size_mb)
    urls = [p for p in (out, cache) if is_url(p)]
    staging = staging_dir(urls[0], local_cache) if urls else Path()
    with Stages("convert", log_every) as stages:
        source = staged_inputs([cache], staging)[0]
        with written_through(out, staging, purpose="converting into") as local_out:
            report = convert_cache(
                source, local_out, codec, shard_bytes=size, tool_version=logitcache.__version__,
                on_progress=lambda stage, done, total: stages.update(stage, done, total, unit=_UNITS.get(stage, "steps")),
            )
        report.source, report.out = cache, out  # as typed: a URL, not its staging copy
    typer.echo(report.summary())
