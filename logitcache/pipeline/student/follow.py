"""Following a cache that its teacher is still writing (`train --follow`): the settings, and
what the waiting reader says. No torch here: TrainConfig checks --follow-poll with it."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from logitcache.errors import LogitCacheError
from logitcache.storage.manifest import MANIFEST_NAME, Manifest
from logitcache.storage.parts import part_dirs

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())  # the waiting lines go to stderr through ``announce``

T = TypeVar("T")


@dataclass(frozen=True)
class Follow:
    """How a dataset follows a cache that the teacher is still writing (``train --follow``).

    poll: seconds between re-reads of manifest.json once everything it lists is consumed.
    timeout: stop (one line naming the teacher's resume command) after this many seconds
        without a new shard; None waits as long as it takes, saying so at every check.
    announce: print the waiting line on stderr (only rank 0's first reader prints it).
    """

    poll: float = 30.0
    timeout: float | None = None
    announce: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.poll, (int, float)) and math.isfinite(self.poll) and self.poll > 0):
            raise LogitCacheError(f"--follow-poll must be a positive number of seconds (got {self.poll}).")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise LogitCacheError(f"--follow-timeout must be a positive number of seconds (got {self.timeout}); "
                                  "leave it out to wait as long as the teacher takes.")

    def wait(self, look: Callable[[], tuple[T, bool]], waiting: Callable[[T], str], stopped: Callable[[T, float], str],
             announce: bool) -> T:
        """What ``look()`` sees once it says done, looking every ``poll`` seconds: one line per wait
        (``waiting(seen)``, on stderr if ``announce``), a LogitCacheError (``stopped(seen, seconds)``)
        once ``timeout`` seconds have passed."""
        began = time.monotonic()
        while True:
            seen, done = look()
            if done:
                return seen
            waited = time.monotonic() - began
            if self.timeout is not None and waited >= self.timeout:
                raise LogitCacheError(stopped(seen, waited))
            pause = self.poll if self.timeout is None else min(self.poll, self.timeout - waited)
            line = f"{waiting(seen)}, next check in {pause:.3g} s"
            logger.info("%s", line)
            if announce:
                print(line, file=sys.stderr, flush=True)
            time.sleep(pause)


def records_cached(manifest: Manifest) -> str:
    """"N of M records cached" (M: the dataset's records, when the manifest knows them)."""
    total = manifest.dataset.get("num_records")
    skipped = f" ({len(manifest.skipped)} skipped)" if manifest.skipped else ""
    return f"{manifest.num_examples} of {total if total is not None else '?'} records cached{skipped}"


def teacher_resume_hint(cache_dir: str | os.PathLike, manifest: Manifest | None) -> str:
    """How to get a stopped teacher going again: its own command, with the same --out."""
    model = manifest.teacher.get("name", "TEACHER") if manifest else "TEACHER"
    data = manifest.dataset.get("source", "DATA") if manifest else "DATA"
    return (f"if its teacher stopped, resume it with its own command and the same --out (`logitcache teacher --model "
            f"{model} --data {data} --out {cache_dir} ...`), then rerun this training with --resume")


def wait_for_manifest(cache_dir: str | os.PathLike, follow: Follow, announce: bool) -> None:
    """Wait until the teacher has written ``cache_dir``'s manifest: it does once its model is loaded,
    which takes minutes for a large one, so a student started beside it would otherwise be refused.
    The directory of a split teacher run is not waited on (loading it says what to do instead)."""
    from logitcache.storage.remote import is_url

    if is_url(cache_dir):  # a teacher writing to object storage: its manifest object
        from logitcache.storage.remote_cache import RemoteCache

        remote = RemoteCache(os.fspath(cache_dir))
        path = remote.url

        def look() -> tuple[None, bool]:
            return None, remote.has(MANIFEST_NAME)
    else:
        path = Path(cache_dir)

        def look() -> tuple[None, bool]:
            return None, (path / MANIFEST_NAME).is_file() or bool(part_dirs(path))

    follow.wait(look, lambda _: f"waiting for the teacher to start {path} (no {MANIFEST_NAME} yet)",
                lambda _, waited: f"{path}: no {MANIFEST_NAME} after waiting {waited:.0f} s (--follow-timeout); check "
                                  f"the path, and that the teacher writing it runs; "
                                  + teacher_resume_hint(path, None) + ".",
                announce)
