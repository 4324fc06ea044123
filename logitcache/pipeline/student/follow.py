"""Following a cache that its teacher is still writing (`train --follow`): the settings, and
what the waiting reader says. No torch here: TrainConfig checks --follow-poll with it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from logitcache.errors import LogitCacheError
from logitcache.storage.manifest import Manifest


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


def records_cached(manifest: Manifest) -> str:
    """"N of M records cached" (M: the dataset's records, when the manifest knows them)."""
    total = manifest.dataset.get("num_records")
    skipped = f" ({len(manifest.skipped)} skipped)" if manifest.skipped else ""
    return f"{manifest.num_examples} of {total if total is not None else '?'} records cached{skipped}"
