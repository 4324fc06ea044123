"""`logitcache copy`, `push` and `pull`: move a cache between local disks, object storage and the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from logitcache.cli.common import Stages, user_errors
from logitcache.errors import LogitCacheError
from logitcache.storage.remote import is_url

_LOCAL_CACHE_HELP = ("Remote to remote: the local directory the cache passes through (it holds a full local copy). "
                     "Default: $LOGITCACHE_STAGING/<slug of SRC>, else ~/.cache/logitcache/staging/<slug of SRC>.")
_LOG_EVERY_HELP = "On a big cache, a progress line (files done, time left) on stderr every this many seconds; a bar on a terminal."


def _copy(src: str, dst: str, local_cache: Optional[Path], log_every: float) -> None:
    from logitcache.pipeline.progress import check_log_every
    from logitcache.storage.sync import copy_cache

    check_log_every(log_every)
    with Stages("copy", log_every) as stages:
        report = copy_cache(src, dst, staging=local_cache,
                            on_file=lambda stage, done, total: stages.update(stage, done, total, unit="files"))
    typer.echo(report.summary())


@user_errors
def copy(
    src: str = typer.Argument(..., help="The cache to copy: a directory or a URL (s3://bucket/cache, gs://, az://, hf://datasets/ORG/NAME)."),
    dst: str = typer.Argument(..., help="Where to copy it: a new or empty directory or location, an interrupted copy of SRC (resumed), or an older copy of it (updated)."),
    local_cache: Optional[Path] = typer.Option(None, "--local-cache", help=_LOCAL_CACHE_HELP),
    log_every: float = typer.Option(30.0, "--log-every", help=_LOG_EVERY_HELP),
) -> None:
    """Copy a cache between any two of a local directory, object storage (s3://, gs://, az://) and the Hub (hf://).

    Verified: every shard and tokenizer file is checked against the manifest's sha256 (on the
    bytes downloaded, or before they are uploaded). Resumable: rerun the same command after an
    interruption; objects already at DST with the right size (a local DST: the right sha256) are
    skipped. The manifest is written last, so a reader of DST never sees a shard it does not list.
    A remote DST is held by a lease object while the copy runs (DST/.lease.json).

    Examples:

        logitcache copy cache/ s3://my-bucket/caches/run1

        logitcache copy s3://my-bucket/caches/run1 gs://other/run1
    """
    _copy(src, dst, local_cache, log_every)


@user_errors
def push(
    cache: str = typer.Argument(..., help="The local cache to upload."),
    repo: str = typer.Argument(..., help="Where to: hf://datasets/ORG/NAME (an existing dataset repository), or any URL copy takes."),
    log_every: float = typer.Option(30.0, "--log-every", help=_LOG_EVERY_HELP),
) -> None:
    """Upload a local cache to the Hub: `logitcache copy CACHE hf://datasets/ORG/NAME`, checked and resumable.

    Needs pip install 'logitcache\\[hub]' and a token (`hf auth login` or HF_TOKEN); the dataset repository must exist (`hf repos create ORG/NAME --type dataset`).

    Example:

        logitcache push cache/ hf://datasets/me/my-logits
    """
    if is_url(cache):
        raise LogitCacheError(f"{cache}: push uploads a local cache; for a remote source use `logitcache copy SRC DST`.")
    _copy(cache, repo, None, log_every)


@user_errors
def pull(
    repo: str = typer.Argument(..., help="The cache to download: hf://datasets/ORG/NAME, or any URL copy takes."),
    out: Path = typer.Argument(..., help="The local directory to download it into: new or empty, an interrupted pull (resumed) or an older copy (updated)."),
    log_every: float = typer.Option(30.0, "--log-every", help=_LOG_EVERY_HELP),
) -> None:
    """Download a cache from the Hub: `logitcache copy hf://datasets/ORG/NAME DIR`, checked and resumable.

    Example:

        logitcache pull hf://datasets/me/my-logits cache/
    """
    _copy(repo, str(out), None, log_every)
