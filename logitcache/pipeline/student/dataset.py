"""LogitCacheDataset: stream a cache into student training (DDP ranks, dataloader workers,
shuffle buffer, mid-epoch resume, shard integrity).

    ds = LogitCacheDataset("out/cache", student_tokenizer, max_length=1024)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=KDCollator())
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            ...train...
            ds.mark_consumed(batch["stream_worker"], batch["stream_index"])
        torch.save(ds.state_dict(), ...)   # at any step: resume mid-epoch

The unit of work is one Parquet row group (a few MB), planned from the shards' footers.
Memory holds the row group being read plus the shuffle buffer, whatever the cache's size.

Before the first example, the dataset checks every shard it lists (size, sha256, footer,
row count, schema): a damaged cache is refused at construction, not in the middle of an
epoch, unless ``skip_bad_shards`` drops the bad shards from the plan (and says so).

With ``follow=Follow(...)`` it reads a cache that its teacher is still writing, taking new
shards as the manifest lists them (``train --follow``; see the class docstring).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.utils.data

from logitcache.errors import LogitCacheError
from logitcache.pipeline.student.features import FeatureStats, StudentFeaturizer, featurizer_for_cache
from logitcache.pipeline.student.follow import Follow, records_cached, teacher_resume_hint
from logitcache.storage.reader import CacheReader
from logitcache.storage.decode import decode_rows, shard_id_table
from logitcache.storage.rows import Row
from logitcache.storage.spans import SPAN_COLUMNS, decode_spans
from logitcache.storage.integrity import id_bound_for, value_problems
from logitcache.storage.manifest import Manifest
from logitcache.storage.segments import SegmentMismatch

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())  # the caller decides where warnings go (run_train: stderr)

STATE_VERSION = 1

# (shard index, row group index, rows): one unit of work, from Parquet metadata only.
Unit = tuple[int, int, int]
# (unit index, first row, end row) within that unit's row group: what one worker reads.
Piece = tuple[int, int, int]

_HASH_THREADS = 4  # hashlib releases the GIL: a few threads keep a fast disk busy


@dataclass(frozen=True)
class BadShard:
    """A shard the dataset will not read: its manifest path, its examples, what is wrong."""

    path: str
    rows: int
    reason: str


class LogitCacheDataset(torch.utils.data.IterableDataset):
    """A torch ``IterableDataset`` over a logit cache (DESIGN.md §4).

    Args:
        cache_dir: a cache written by ``logitcache teacher``: a directory or an fsspec URL
            (``s3://bucket/cache``, ...; row groups streamed by ranged GETs, each checked
            against its sha256 as it is read: storage/remote_cache.py).
        student_tokenizer: a fast tokenizer. Given, every row goes through a
            :class:`StudentFeaturizer` (made once per process, i.e. per dataloader worker)
            and comes out as ``id, input_ids, labels, teacher_logprobs, teacher_ids,
            kd_mask``; ``None`` yields the raw cache rows (``storage/rows.py``).
        alignment, max_length, alm_merge_threshold: passed to the featurizer (the last: ALM's
            debiased chunks, alignment "chunk" on a cache with ``word_start``).
        shuffle: permute the row groups per epoch, then shuffle rows through a buffer.
        shuffle_buffer: rows in each worker's shuffle buffer.
        seed: the whole order of every epoch follows from ``seed`` and the epoch.
        rank, world_size: the DDP split; default: ``torch.distributed`` if initialised,
            else 0 / 1. Give both or neither. (With accelerate's ``dispatch_batches``, where
            rank 0 reads for everyone, pass ``rank=0, world_size=1``.)
        verify_shards: hash every shard (sha256 against the manifest) at construction,
            and again if a file changes before it is read. Sizes, footers, row counts and
            schemas are checked either way.
        skip_bad_shards: drop shards that are missing, resized, altered or unreadable from
            the plan (``skipped_shards`` lists them) instead of refusing the cache. The
            epoch order and ``len`` then cover the remaining shards only. Values are checked
            as each row group is read (finite, at most 0, sorted: storage.integrity); a bad
            row group is refused, or with this flag passed over (``bad_row_groups``, warned).
        num_workers: the number of dataloader workers (0: none) you will use. Optional;
            given, every worker checks it and a resume state must match it exactly.
        companions: other caches over the same records (several teachers): this cache drives
            the order, and each row carries ``_teachers``, the companions' rows of its id (read
            by id through an index of their id columns, built once); featurized, each example
            carries ``_more``, each companion's teacher columns by its own featurizer. A record
            with another text or other target spans is refused (naming the id and cache).
        local_cache: for a URL, a directory of verified whole-shard copies to read instead of
            streaming (downloaded once, reused by later runs, fetched again if damaged).
        on_missing: with companions, a record not in every cache is refused ("refuse") or
            left out of the plan ("skip": ``missing`` lists them; ``len`` counts the rest).
        follow: a :class:`Follow` to train while the teacher writes (see "Following" below);
            None reads the shards listed now, warning when the cache is partial.

    Every example also carries ``_worker`` (dataloader worker id, 0 without workers) and
    ``_index`` (its position in that worker's stream this epoch, from 0).

    **Epoch order.** Units are the row groups of all shards, in cache order. With
    ``shuffle``, the units are permuted by an RNG seeded from ``(seed, epoch)``, and each
    worker passes its rows through a buffer of ``shuffle_buffer`` rows with an RNG seeded
    from ``(seed, epoch, rank, worker)``. Without it, rows come in cache order. The order
    depends on ``world_size`` and on the number of dataloader workers.

    **DDP: every rank gets the same number of examples.** A rank that runs out early leaves
    the others waiting in a collective, so the epoch's global order (units in epoch order,
    rows within a unit) is cut by example index into ``world_size`` contiguous blocks of
    ``ceil(N / world_size)`` examples. Rank r reads only block r (a row group on a boundary
    is read by both ranks, each keeping its rows). The last block(s), which would be short,
    are filled by wrapping around to the start of the global order, as torch's
    ``DistributedSampler`` pads: at most ``world_size - 1`` examples are seen twice per
    epoch, none when ``N % world_size == 0``. ``len(dataset)`` is that per-rank count.

    **Dataloader workers.** With ``batch_size`` (what the DataLoader batches by), a rank's
    stream is cut into batches and batch j goes to worker j % workers: the DataLoader, which
    takes batches from its workers in turn, then yields the rank's stream in order, every
    batch full but the epoch's last, ``ceil(len / batch_size)`` batches per epoch whatever
    the number of workers. (Each worker decodes the row groups its batches touch.) Without
    ``batch_size``, whole units are dealt round-robin and each worker's last batch may be
    partial. Either way no example is lost or repeated.

    **Resume mid-epoch.** Report what the training loop consumed with
    :meth:`mark_consumed` (the main process keeps, per worker, the number of examples
    consumed). :meth:`state_dict` returns::

        {"version": 1, "epoch": e, "seed": s, "world_size": w, "consumed": {worker: count},
         "num_workers": n, "num_workers_exact": bool, "shuffle": bool, "shuffle_buffer": b,
         "num_examples": N}

    After :meth:`load_state_dict`, each worker's next ``__iter__`` replays its epoch stream
    (unit order and shuffle buffer, on row positions only: no featurizing, and no reading
    of row groups whose rows were all consumed) and skips its first ``count`` examples.
    A state made with another seed, world size, shuffle setting or cache is refused. The
    number of workers must be the same at resume: ``num_workers`` in the state is the
    constructor's value when given (checked exactly), else ``1 + the highest worker id
    marked`` (a lower bound, checked as such). Call :meth:`set_epoch` at every epoch
    (Trainer/accelerate do): a new epoch clears the consumed counts; without it, a second
    pass repeats the same epoch and skips what was marked consumed. Workers see the
    dataset as it was when the DataLoader iterator started (``persistent_workers=False``).

    **Following a cache being written.** With ``follow`` and a partial cache, epoch 0 starts on
    the shards listed so far and re-reads manifest.json (:meth:`_reload_manifest`) whenever it
    has used up what is listed, waiting ``follow.poll`` seconds between reads, until the
    manifest says complete. Its order is the shards' order of arrival, each shard's row groups
    permuted (seed, epoch, shard) and the rows passed through the shuffle buffer: a function of
    the shard list alone, which the writer only appends to, so every rank and worker computes
    the same order whenever it reads the manifest, and a resume replays it. The rank split
    deals blocks of ``batch_size`` rows (1 without it) round-robin to the ranks while whole
    rounds of ``world_size`` blocks exist; once the cache is complete the last round is cut into
    ``world_size`` equal parts, wrapping around as above. So epoch 0 holds every example of the
    complete cache once (repeats as above), ``ceil(N / world_size)`` per rank. Its length is
    unknown until then (``len`` raises TypeError); epochs after it are planned over the complete
    cache as without ``follow``. On a cache already complete, ``follow`` changes nothing.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        student_tokenizer: Any = None,
        *,
        alignment: str = "offset",
        max_length: int | None = None,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        verify_shards: bool = True,
        num_workers: int | None = None,
        skip_bad_shards: bool = False,
        batch_size: int | None = None,
        alm_merge_threshold: float | None = None,
        kd_targets: str = "topk",
        companions: Sequence[str | os.PathLike] = (),
        on_missing: str = "refuse",
        local_cache: str | os.PathLike | None = None,
        follow: Follow | None = None,
    ) -> None:
        super().__init__()
        self.cache = CacheReader(cache_dir, local_cache=local_cache)
        self.manifest = self.cache.manifest
        self.follow = follow
        # Whether epoch 0 follows the writer: the cache was partial when we started (or a resume
        # state says so). _final: the plan will not grow (the cache is complete, or not followed).
        self.followed = follow is not None and self.manifest.status != "complete"
        self._final = not self.followed
        if follow is not None and companions:
            raise LogitCacheError("--follow reads one cache as it grows; several --cache are read by id from complete "
                                  "caches: train on them once their teachers have finished, or follow one of them.")
        if self.manifest.status != "complete" and follow is None:
            warnings.warn(
                f"{self.cache.path}: the cache is not complete (status {self.manifest.status!r}); "
                f"reading the {self.manifest.num_examples} examples written so far.",
                stacklevel=2,
            )
        if shuffle and shuffle_buffer < 1:
            raise LogitCacheError(f"shuffle_buffer must be at least 1 row (got {shuffle_buffer}).")
        if not isinstance(seed, int) or seed < 0:
            raise LogitCacheError(f"seed must be a non-negative integer (got {seed!r}).")
        if (rank is None) != (world_size is None):
            raise LogitCacheError("give both rank and world_size, or neither (then torch.distributed decides).")
        if world_size is not None and not (world_size >= 1 and 0 <= rank < world_size):
            raise LogitCacheError(
                f"rank {rank} of world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size."
            )
        if num_workers is not None and num_workers < 0:
            raise LogitCacheError(f"num_workers must be 0 or more (got {num_workers}).")
        self.student_tokenizer = student_tokenizer
        self.alignment = alignment
        self.max_length = max_length
        self.alm_merge_threshold = alm_merge_threshold
        self.kd_targets = kd_targets
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.verify_shards = verify_shards
        self.num_workers = num_workers
        self._rank, self._world_size = rank, world_size
        self.epoch = 0
        self._consumed: dict[int, int] = {}
        self._state_workers: tuple[int, bool] | None = None  # (num_workers, exact) of a loaded state
        self.skip_bad_shards = skip_bad_shards
        if batch_size is not None and batch_size < 1:
            raise LogitCacheError(f"batch_size must be positive (got {batch_size}).")
        self.batch_size = batch_size
        self._compact = self.manifest.codec == "compact"  # the manifest decides, not a shard's metadata
        # ids beyond the teacher's vocabulary would index past a student's logits (same vocabulary)
        # or make MultiLevelOT allocate batch x max id: bounded by the hashed tokenizer files.
        self._max_id = id_bound_for(self.manifest, self.cache.tokenizer_check().size)
        self._group: tuple[int, int, pa.Table] | None = None  # the last row group read (shard, group, table)
        self.skipped_shards: list[BadShard] = []
        self.bad_row_groups: set[tuple[int, int]] = set()  # (shard, row group) skipped for bad values
        self._planned_shards = len(self.manifest.shards)  # the manifest's shards that _units covers
        self._units: list[Unit] = self._plan_units()
        # Several teachers: this cache drives the order; the companions' rows of the same ids ride
        # along (row["_teachers"]), each featurized by its own cache's featurizer.
        self.companions: list[LogitCacheDataset] = [
            LogitCacheDataset(p, None, shuffle=False, rank=0, world_size=1, verify_shards=verify_shards,
                              skip_bad_shards=skip_bad_shards, local_cache=local_cache) for p in companions
        ]
        self._keep: dict[int, np.ndarray] = {}  # unit -> the rows of its row group read (ids in every cache)
        self._where: list[dict[str, tuple[int, int]]] = []  # per companion: id -> (its unit, row)
        self.missing: list[str] = []  # ids skipped by on_missing="skip" (not in every cache)
        if self.companions:
            self._match_companions(on_missing)
        self._companion_featurizers: list[StudentFeaturizer] | None = None
        self._num_examples = sum(n for _, _, n in self._units)
        self._featurizer: StudentFeaturizer | None = None
        self._featurizer_pid: int | None = None
        self._open: tuple[int, pq.ParquetFile] | None = None  # the shard being read
        self._open_ids = None  # its id table (compact codec), None for v1
        if student_tokenizer is not None:
            self._get_featurizer()  # bad tokenizer or alignment: fail here, not in a worker

    # --- planning -------------------------------------------------------------------
    def _plan_units(self, first: int = 0) -> list[Unit]:
        """Every row group of every sound shard from shard ``first`` on, in cache order, from the
        footers alone."""
        indices = range(first, len(self.manifest.shards))
        for i in indices:
            self.cache.shard_path(i)  # refuses path escapes
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            byte_problems = list(pool.map(self._bytes_problem, indices))
        units: list[Unit] = []
        bad: list[BadShard] = []
        for j, i in enumerate(indices):
            shard = self.manifest.shards[i]
            problem = byte_problems[j]
            rows: list[int] = []
            if problem is None:
                rows, problem = self.cache.footer_problem(i)
            if problem is not None:
                bad.append(BadShard(shard.path, shard.rows, problem))
                continue
            units.extend((i, g, n) for g, n in enumerate(rows) if n)
        if bad:
            self._refuse_or_skip(bad)
        return units

    def _refuse_or_skip(self, bad: list[BadShard]) -> None:
        first = bad[0]
        if not self.skip_bad_shards:
            more = f" (and {len(bad) - 1} more bad shard(s))" if len(bad) > 1 else ""
            raise LogitCacheError(
                f"{self.cache.path / first.path}: {first.reason}{more}; refusing to read a damaged cache. "
                f"Run `logitcache verify {self.cache.path}` to see every problem, or pass --skip-bad-shards "
                "to train without the bad shards."
            )
        if len(bad) == len(self.manifest.shards):
            raise LogitCacheError(
                f"{self.cache.path}: all {len(bad)} shards are bad (first: {first.path}: {first.reason}), nothing is "
                f"left to read; run `logitcache verify {self.cache.path}`."
            )
        for b in bad:
            logger.warning("%s: skipped (%s)", self.cache.path / b.path, b.reason)
        self.skipped_shards = [*self.skipped_shards, *bad]  # following a writer, more may come later
        logger.warning("%s", self.skipped_summary())

    def _match_companions(self, on_missing: str) -> None:
        """Pair this cache's records with the companions' by id, once, from the id / text / span
        columns only. A record with another text or other spans is refused; one not in every
        cache is refused, or with ``on_missing="skip"`` left out of the plan (``self.missing``)."""
        if on_missing not in ("refuse", "skip"):
            raise LogitCacheError(f"--on-missing {on_missing!r}: use refuse or skip.")
        mine = _record_keys(self)
        others = [_record_keys(c) for c in self.companions]
        for c, theirs in zip(self.companions, others):
            for rid, (_, _, digest) in mine.items():
                if rid in theirs and theirs[rid][2] != digest:
                    raise LogitCacheError(
                        f"{c.cache.path}: record {rid!r} has another text or other target spans than in "
                        f"{self.cache.path}; several teachers' caches must be written over the same records "
                        "(same ids, same texts): rerun the teacher on the same data."
                    )
        everywhere = [rid for rid in mine if all(rid in theirs for theirs in others)]
        missing = [rid for rid in mine if not all(rid in theirs for theirs in others)]
        seen = set(mine)
        for theirs in others:  # records of a companion that this cache lacks
            extra = [rid for rid in theirs if rid not in seen]
            missing += extra
            seen.update(extra)
        if missing and on_missing == "refuse":
            rid = missing[0]
            holders = [str(d.cache.path) for d, keys in zip([self, *self.companions], [mine, *others]) if rid in keys]
            lacking = [str(d.cache.path) for d, keys in zip([self, *self.companions], [mine, *others]) if rid not in keys]
            raise LogitCacheError(
                f"record {rid!r} is in {', '.join(holders)} but not in {', '.join(lacking)} ({len(missing)} records "
                f"are not in every cache); pass --on-missing skip to train on the {len(everywhere)} records all "
                "caches hold."
            )
        if not everywhere:
            raise LogitCacheError(f"no record is in every cache ({', '.join(str(d.cache.path) for d in [self, *self.companions])}); "
                                  "the caches must be written over the same records.")
        self.missing = missing
        keep: dict[int, list[int]] = {}
        for rid in everywhere:
            unit, row, _ = mine[rid]
            keep.setdefault(unit, []).append(row)
        units: list[Unit] = []
        self._keep = {}
        for u, (shard, group, n) in enumerate(self._units):
            rows = sorted(keep.get(u, []))
            if rows:
                if len(rows) < n:
                    self._keep[len(units)] = np.asarray(rows, dtype=np.int64)
                units.append((shard, group, len(rows)))
        self._units = units
        self._where = [{rid: (unit, row) for rid, (unit, row, _) in theirs.items()} for theirs in others]

    def missing_summary(self) -> str | None:
        """One line on the records ``on_missing="skip"`` left out; None when none was."""
        if not self.missing:
            return None
        names = ", ".join(repr(r) for r in self.missing[:3]) + (", ..." if len(self.missing) > 3 else "")
        return (f"--on-missing skip: {len(self.missing)} records are not in every cache and were left out ({names}); "
                f"training on the {self.num_examples} records all caches hold.")

    def skipped_summary(self) -> str | None:
        """One line on the shards ``skip_bad_shards`` dropped; None when none was."""
        if not self.skipped_shards:
            return None
        rows = sum(b.rows for b in self.skipped_shards)
        names = ", ".join(b.path for b in self.skipped_shards)
        return f"{self.cache.path}: skipped {len(self.skipped_shards)} bad shard(s) ({rows} examples): {names}"

    def _bytes_problem(self, i: int) -> str | None:
        """What is wrong with shard ``i``'s file (storage.integrity: missing, size, sha256 if verifying)."""
        problem = self.cache.shard_problem(i, hash_bytes=self.verify_shards)
        return None if problem is None else f"shard {problem}"

    @property
    def num_examples(self) -> int:
        """Examples per epoch over all ranks: the cache's, less those of skipped bad shards."""
        return self._num_examples

    def rank_and_world(self) -> tuple[int, int]:
        if self._world_size is not None:
            return self._rank, self._world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        """Examples per rank per epoch: ``ceil(N / world_size)``."""
        if not self._final:
            # TypeError is what len() of an unsized object raises: the Trainer then counts --max-steps.
            raise TypeError(f"{self.cache.path} is still being written (followed): the epoch's length is unknown until "
                            "the teacher finishes")
        return math.ceil(self.num_examples / self.rank_and_world()[1])

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order; a different epoch forgets the consumed counts."""
        if epoch != self.epoch:
            self._consumed.clear()
            self._state_workers = None
        self.epoch = epoch
        if not self._following(epoch):
            self._plan_complete_cache()

    # --- following a cache being written ------------------------------------------------
    def _following(self, epoch: int) -> bool:
        return self.followed and epoch == 0

    def _reload_manifest(self) -> Manifest:
        """manifest.json as it is now. The writer renames a whole new manifest into place, so a
        read sees the old one or the new one, never half of one."""
        return self.cache.reload_manifest()

    def _take_manifest(self, manifest: Manifest) -> None:
        """Plan the shards ``manifest`` lists beyond those planned, refusing a manifest that is not
        the same cache grown (other settings, or the shards already planned changed)."""
        changed = self.manifest.settings_differences(manifest)
        old = [(s.path, s.sha256) for s in self.manifest.shards[: self._planned_shards]]
        if changed or [(s.path, s.sha256) for s in manifest.shards[: len(old)]] != old:
            what = f"its settings changed ({', '.join(changed)})" if changed else "shards already read were replaced"
            raise LogitCacheError(f"{self.cache.path}: the cache was rewritten while training followed it ({what}); "
                                  "train on it afresh once its teacher has finished.")
        first = self._planned_shards
        self.manifest = self.cache.manifest = manifest
        self._planned_shards = len(manifest.shards)
        self._units.extend(self._plan_units(first))
        self._num_examples = sum(n for _, _, n in self._units)
        self._final = manifest.status == "complete"

    def _plan_complete_cache(self) -> None:
        """Epochs after a followed one are planned over the complete cache (waiting for it if need be)."""
        while not self._final:
            self._take_manifest(self._wait_for_the_teacher(self.follow.announce))

    def _wait_for_the_teacher(self, announce: bool) -> Manifest:
        """The manifest once it lists more shards than planned or says complete, re-read every
        ``follow.poll`` seconds; one line per wait, and a stop after ``follow.timeout``."""

        def look() -> tuple[Manifest, bool]:
            manifest = self._reload_manifest()
            return manifest, len(manifest.shards) > self._planned_shards or manifest.status == "complete"

        def stopped(manifest: Manifest, waited: float) -> str:
            return (f"{self.cache.path}: no new shard after waiting {waited:.0f} s (--follow-timeout), "
                    f"{records_cached(manifest)}, last written {manifest.updated_at}; "
                    f"{teacher_resume_hint(self.cache.path, manifest)}.")

        return self.follow.wait(look, lambda m: f"waiting for the teacher: {records_cached(m)}", stopped, announce)

    def _followed_pieces(self, rank: int, world: int, announce: bool) -> Iterator[Piece]:
        """Rank ``rank``'s pieces of a followed epoch (class docstring), yielded as shards arrive."""
        block = self.batch_size or 1
        round_ = block * world
        order: list[int] = []  # units in epoch order, as far as planned
        starts = [0]  # starts[j]: the epoch position of order[j]'s first row
        ordered = 0  # units of self._units already in ``order``
        r = 0  # the next round of blocks
        while True:
            while ordered < len(self._units):  # a shard's units were planned together: take them in turn
                shard, end = self._units[ordered][0], ordered
                while end < len(self._units) and self._units[end][0] == shard:
                    end += 1
                units = list(range(ordered, end))
                if self.shuffle:
                    units = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, shard])).permutation(units).tolist()
                for u in units:
                    order.append(u)
                    starts.append(starts[-1] + self._units[u][2])
                ordered = end
            if starts[-1] >= (r + 1) * round_:
                a = r * round_ + rank * block
                yield from _pieces_between(order, starts, a, a + block, starts[-1])
                r += 1
            elif self._final:  # the last round: world_size equal parts, wrapping around
                n = starts[-1]
                if n:
                    per = math.ceil(n / world) - r * block
                    a = r * round_ + rank * per
                    yield from _pieces_between(order, starts, a, a + per, n)
                return
            else:
                self._take_manifest(self._wait_for_the_teacher(announce))

    def _unit_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self._units)))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        return rng.permutation(len(self._units)).tolist()

    def _rank_pieces(self, rank: int, world: int) -> list[Piece]:
        """Rank ``rank``'s block of the epoch's global order, as row ranges of units."""
        n = self.num_examples
        if n == 0:
            return []
        order = self._unit_order()
        starts = [0]
        for u in order:
            starts.append(starts[-1] + self._units[u][2])
        per = math.ceil(n / world)
        return _pieces_between(order, starts, rank * per, (rank + 1) * per, n)

    def _worker_pieces(self, pieces: Iterable[Piece], worker: int, workers: int) -> Iterator[Piece]:
        """Worker ``worker``'s share of a rank's pieces: every ``workers``-th batch of ``batch_size``
        rows (see the class docstring), or without a batch size every ``workers``-th piece.
        Lazy: a followed epoch's pieces arrive as the teacher writes."""
        if workers == 1:
            yield from pieces
            return
        if self.batch_size is None:
            yield from itertools.islice(pieces, worker, None, workers)
            return
        out: list[Piece] = []  # the pieces not yielded yet (the last may still grow)
        pos = 0  # stream position of the piece's first row
        for unit, a, b in pieces:
            row = a
            while row < b:
                batch = (pos + row - a) // self.batch_size
                end = min(b, row + (batch + 1) * self.batch_size - (pos + row - a))
                if batch % workers == worker:
                    if out and out[-1][0] == unit and out[-1][2] == row:
                        out[-1] = (unit, out[-1][1], end)  # consecutive rows of one unit: one piece
                    else:
                        out.append((unit, row, end))
                row = end
            pos += b - a
            yield from out[:-1]
            del out[:-1]
        yield from out

    # --- reading --------------------------------------------------------------------
    def _verify(self, i: int) -> None:
        """Check shard ``i`` again before reading it: a file may change after construction."""
        problem = self._bytes_problem(i)
        if problem is not None:
            raise LogitCacheError(
                f"{self.cache.shard_path(i)}: {problem}; run `logitcache verify {self.cache.path}`."
            )

    def _read_piece(self, piece: Piece) -> pa.Table | None:
        """The rows ``piece`` names: one row group read, sliced, its values checked (storage.integrity).

        None for rows whose values are bad when ``skip_bad_shards`` passes over them.
        """
        shard, group, _ = self._units[piece[0]]
        try:
            table = self._row_group(shard, group)
        except SegmentMismatch as e:  # a remote object replaced after the manifest: its bytes fail their sha256
            return self._bad_row_group(shard, group, [e.reason], e.where)
        keep = self._keep.get(piece[0])
        if keep is None:
            table = table.slice(piece[1], piece[2] - piece[1])
        else:  # only the records every cache holds (on_missing="skip")
            table = table.take(pa.array(keep[piece[1]:piece[2]]))
        problems = value_problems(table, compact=self._compact, max_id=self._max_id)
        if not problems:
            return table
        return self._bad_row_group(shard, group, problems)

    def _bad_row_group(self, shard: int, group: int, problems: list[str], where: str | None = None) -> None:
        """Refuse a row group (bad values, or bytes that fail their sha256), or with
        ``skip_bad_shards`` pass over it, warned once."""
        where = where or f"{self.cache.shard_path(shard)} row group {group}"
        if not self.skip_bad_shards:
            raise LogitCacheError(
                f"{where}: {problems[0]}; refusing to train on it. Run `logitcache verify {self.cache.path}` to see "
                "every problem, or pass --skip-bad-shards to train without the bad rows."
            )
        if (shard, group) not in self.bad_row_groups:
            self.bad_row_groups.add((shard, group))
            logger.warning("%s: skipped (%s)", where, "; ".join(problems))
        return None

    def _row_group(self, shard: int, group: int) -> pa.Table:
        """Row group ``group`` of shard ``shard``, whole (the last one read is kept)."""
        if self._open is None or self._open[0] != shard:
            self._close()
            if self.verify_shards:
                self._verify(shard)
            self._open = (shard, self.cache.open_shard(shard))
            try:
                ids = shard_id_table(self._open[1]) if self._compact else None
                if ids is not None and len(ids) and self._max_id and int(ids.max()) >= self._max_id:
                    raise ValueError(f"its id table holds ids at or above the vocabulary's {self._max_id}")
                self._open_ids = ids
            except ValueError as e:  # a missing, damaged or bomb-sized footer id table
                raise LogitCacheError(
                    f"{self.cache.shard_path(shard)}: {e}; run `logitcache verify {self.cache.path}`."
                ) from e
        try:
            if self._group is not None and self._group[:2] == (shard, group):
                table = self._group[2]  # a worker reads one row group for several of its batches
            else:
                table = self._open[1].read_row_group(group)
                self._group = (shard, group, table)
        except (OSError, pa.ArrowException) as e:
            raise LogitCacheError(
                f"{self.cache.shard_path(shard)}: cannot read row group {group} ({e}); "
                f"run `logitcache verify {self.cache.path}`."
            ) from e
        return table

    def _decode(self, table: pa.Table, unit: int) -> list[Row]:
        """The rows of a checked slice, in the manifest's codec; a slice that does not decode (ids
        out of the id table, a missing footer table) is refused in one line, as verify does."""
        try:
            rows: list[Row | None] = list(decode_rows(table, self._open_ids, compact=self._compact))
        except (ValueError, IndexError, KeyError, TypeError, pa.ArrowException) as e:
            shard, group, _ = self._units[unit]
            raise LogitCacheError(
                f"{self.cache.shard_path(shard)} row group {group}: rows cannot be decoded ({e}); "
                f"run `logitcache verify {self.cache.path}`."
            ) from e
        if self.companions:
            theirs = [c._rows_by_id([r["id"] for r in rows], where) for c, where in zip(self.companions, self._where)]
            for i, row in enumerate(rows):
                mates = [t[i] for t in theirs]
                # a companion's row in a row group skipped for bad values: the record is passed over
                rows[i] = None if any(m is None for m in mates) else {**row, "_teachers": mates}
        return rows

    def _rows_by_id(self, ids: Sequence[str], where: Mapping[str, tuple[int, int]]) -> list[Row | None]:
        """This (companion) cache's rows of ``ids``, reading each row group they lie in once
        (the rows of one driving row group often come from one of ours)."""
        wanted: dict[int, list[tuple[int, int]]] = {}
        for i, rid in enumerate(ids):
            unit, row = where[rid]
            wanted.setdefault(unit, []).append((row, i))
        out: list[Row | None] = [None] * len(ids)
        for unit, rows in sorted(wanted.items()):
            lo, hi = min(r for r, _ in rows), max(r for r, _ in rows) + 1
            table = self._read_piece((unit, lo, hi))
            if table is None:
                continue  # bad values, skipped (skip_bad_shards)
            decoded = self._decode(table.take(pa.array([r - lo for r, _ in rows])), unit)
            for (_, i), row in zip(rows, decoded):
                out[i] = _copy_row(row)
        return out

    def _close(self) -> None:
        self._group = None
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def _rows(self, pieces: Sequence[Piece], start: int) -> Iterator[Row]:
        """Rows of ``pieces`` in order, from stream position ``start`` (earlier pieces unread)."""
        copy = self.shuffle  # buffered rows must not pin their whole row group in memory
        pos = 0
        for piece in pieces:
            n = piece[2] - piece[1]
            if pos + n <= start:
                pos += n
                continue
            skip = max(0, start - pos)
            pos += n
            table = self._read_piece((piece[0], piece[1] + skip, piece[2]))
            if table is None:  # bad values, skipped: the positions stay, so a resume lines up
                yield from [None] * (n - skip)
                continue
            for row in self._decode(table, piece[0]):
                yield _copy_row(row) if copy and row is not None else row
            del table

    def _fetch(self, pieces: Sequence[Piece], starts: Sequence[int], keys: Sequence[int]) -> dict[int, Row]:
        """Rows at stream positions ``keys`` (a resumed shuffle buffer), row group by row group."""
        by_piece: dict[int, list[int]] = {}
        for key in keys:
            by_piece.setdefault(bisect.bisect_right(starts, key) - 1, []).append(key)
        out: dict[int, Row] = {}
        for p, ks in sorted(by_piece.items()):
            unit, a, _ = pieces[p]
            lo, hi = min(ks) - starts[p], max(ks) - starts[p] + 1
            table = self._read_piece((unit, a + lo, a + hi))
            rows = self._decode(table, unit) if table is not None else None
            for key in ks:
                row = None if rows is None else rows[key - starts[p] - lo]
                out[key] = None if row is None else _copy_row(row)
        return out

    def _ordered(self, pieces: Iterable[Piece], skip: int) -> Iterator[tuple[int, Row]]:
        return enumerate(self._rows(pieces, skip), start=skip)

    def _shuffled(self, pieces: Iterable[Piece], rng: random.Random, skip: int) -> Iterator[tuple[int, Row]]:
        """The shuffle buffer, run on stream positions; rows are read only after ``skip`` outputs.

        For each incoming position: while the buffer is not full, add it; else swap it with
        a random slot and emit what was there. At the end, shuffle the buffer and emit it
        all. The positions (and the RNG) follow the same path whether or not rows are
        attached, which makes a resumed stream identical to an uninterrupted one.
        ``pieces`` is consumed lazily (a followed epoch's arrive as the teacher writes).
        """
        size = self.shuffle_buffer
        seen: list[Piece] = []  # the pieces so far: _rows walks this list while it grows
        starts = [0]
        buf: list[int] = []
        held: dict[int, Row] = {}
        rows: Iterator[Row] | None = None
        out = 0
        for piece in pieces:
            seen.append(piece)
            starts.append(starts[-1] + piece[2] - piece[1])
            for pos in range(starts[-2], starts[-1]):
                if rows is None and out >= skip:  # done skipping: attach rows from here on
                    held.update(self._fetch(seen, starts, buf))
                    rows = self._rows(seen, pos)
                if rows is not None:
                    # never past the pieces in ``seen``: its list iterator picks up the ones appended later
                    held[pos] = next(rows)
                if len(buf) < size:
                    buf.append(pos)
                    continue
                j = rng.randrange(size)
                key, buf[j] = buf[j], pos
                if out >= skip:
                    yield out, held.pop(key)
                out += 1
        rng.shuffle(buf)
        rest = buf[max(0, skip - out) :]
        out = max(out, skip)
        held.update(self._fetch(seen, starts, [k for k in rest if k not in held]))
        for key in rest:
            yield out, held.pop(key)
            out += 1

    # --- iteration ------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _get_featurizer(self) -> StudentFeaturizer:
        if self._featurizer is None or self._featurizer_pid != os.getpid():
            # the cache's EOS id and its tokenizer's byte lengths come with it: features.py
            self._featurizer = featurizer_for_cache(self.cache, self.student_tokenizer, self.alignment, self.max_length,
                                                    alm_merge_threshold=self.alm_merge_threshold,
                                                    kd_targets=self.kd_targets)
            self._featurizer_pid = os.getpid()
        return self._featurizer

    def _companion_features(self, row: Row, example: dict[str, Any]) -> list[dict[str, Any]]:
        """The other teachers' targets for ``example``: each cache's row featurized by its own
        featurizer (its tokenizer, its alignment), the student's side checked to be the same."""
        if self._companion_featurizers is None or self._featurizer_pid != os.getpid():
            self._get_featurizer()
            self._companion_featurizers = [
                featurizer_for_cache(c.cache, self.student_tokenizer, self.alignment, self.max_length,
                                     alm_merge_threshold=self.alm_merge_threshold, kd_targets=self.kd_targets)
                for c in self.companions
            ]
        out = []
        for c, featurize, mate in zip(self.companions, self._companion_featurizers, row["_teachers"]):
            f = featurize(mate)
            if not (np.array_equal(f["input_ids"], example["input_ids"]) and np.array_equal(f["labels"], example["labels"])):
                raise LogitCacheError(
                    f"{c.cache.path}: record {row['id']!r} gives the student other tokens or targets than in "
                    f"{self.cache.path}; several teachers' caches must be written over the same texts and spans."
                )
            out.append({k: v for k, v in f.items() if k not in ("id", "input_ids", "labels")})
        return out

    def _check_workers(self) -> None:
        info = torch.utils.data.get_worker_info()
        actual = 0 if info is None else info.num_workers
        if self.num_workers is not None and self.num_workers != actual:
            raise LogitCacheError(
                f"LogitCacheDataset(num_workers={self.num_workers}) is read by {actual} dataloader workers; "
                "make them the same (a resume needs the same number of workers)."
            )
        if self._state_workers is not None and self._consumed:
            saved, exact = self._state_workers
            if (saved != actual) if exact else (saved > max(actual, 1)):
                raise LogitCacheError(
                    f"the resume state was saved with {'' if exact else 'at least '}{saved} dataloader workers, "
                    f"this run has {actual}; resume with the same number of workers."
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._check_workers()
        worker, workers = self._worker()
        rank, world = self.rank_and_world()
        if self._following(self.epoch):
            announce = self.follow is not None and self.follow.announce and rank == 0 and worker == 0
            pieces = self._worker_pieces(self._followed_pieces(rank, world, announce), worker, workers)
        else:
            self._plan_complete_cache()  # (set_epoch did it, unless the epoch came from a resume state)
            pieces = self._worker_pieces(self._rank_pieces(rank, world), worker, workers)
        skip = self._consumed.get(worker, 0)
        if self.shuffle:
            seq = np.random.SeedSequence([self.seed, self.epoch, rank, worker])
            stream = self._shuffled(pieces, random.Random(int(seq.generate_state(1, np.uint64)[0])), skip)
        else:
            stream = self._ordered(pieces, skip)
        featurize = self._get_featurizer() if self.student_tokenizer is not None else None
        try:
            for index, row in stream:
                if row is None:  # in a row group skipped for bad values
                    continue
                if featurize is None:
                    example = row
                else:  # with this example's share of the counts, summed where it is trained
                    before = featurize.stats.counts()
                    example = featurize(row)
                    example["_counts"] = featurize.stats.counts() - before
                    if self.companions:
                        example["_more"] = self._companion_features(row, example)
                example["_worker"] = worker
                example["_index"] = index
                yield example
        finally:
            self._close()

    # --- resume ---------------------------------------------------------------------
    def mark_consumed(self, workers: Sequence[int] | int, indices: Sequence[int] | int) -> None:
        """Record that the training loop consumed these examples (a collated batch's
        ``stream_worker`` and ``stream_index``, each example's ``_worker`` and ``_index``: lists,
        tensors or single ints)."""
        w, i = _flat_ints(workers), _flat_ints(indices)
        if w.shape != i.shape:
            raise LogitCacheError(f"mark_consumed: {w.size} workers but {i.size} indices; pass one of each per example.")
        for wid, idx in zip(w.tolist(), i.tolist()):
            self._consumed[int(wid)] = max(self._consumed.get(int(wid), 0), int(idx) + 1)

    def state_dict(self) -> dict[str, Any]:
        if self.num_workers is not None:
            num_workers, exact = self.num_workers, True
        elif self._state_workers is not None and self._state_workers[1]:
            num_workers, exact = self._state_workers
        else:  # a lower bound: the workers seen so far
            seen = max(self._consumed, default=-1) + 1
            num_workers, exact = max(seen, self._state_workers[0] if self._state_workers else 0) or None, False
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "world_size": self.rank_and_world()[1],
            "num_workers": num_workers,
            "num_workers_exact": exact,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "num_caches": 1 + len(self.companions),
            "followed": self.followed,
            "consumed": dict(self._consumed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise LogitCacheError(
                f"resume state version {state.get('version')!r} is not supported (this logitcache reads {STATE_VERSION})."
            )
        mine = self.state_dict()
        followed = bool(state.get("followed", False))
        if followed != self.followed and (self.follow is None or not followed):
            raise LogitCacheError(
                "the resume state was saved by a run " + ("with" if followed else "without") + " --follow, whose first "
                "epoch has another example order; resume " + ("with --follow." if followed else "without --follow, or "
                                                              "start afresh in a new --out.")
            )
        # A followed epoch 0 counted the examples listed when each process last read the manifest.
        counted = not (followed and int(state.get("epoch", 0)) == 0)
        checks = ["seed", "world_size", "shuffle", "num_caches"] + (["num_examples"] if counted else [])
        checks += ["shuffle_buffer"] if self.shuffle else []
        # the workers' split follows it, and a followed epoch's rank split
        checks += ["batch_size"] if (self.num_workers or 0) > 1 or followed else []
        for key in checks:
            if key in state and state[key] != mine[key]:
                raise LogitCacheError(
                    f"resume state has {key}={state[key]!r}, this dataset has {key}={mine[key]!r}; the example "
                    f"order would differ. Resume with the same {key}, or start the epoch afresh."
                )
        saved_workers, exact = state.get("num_workers"), bool(state.get("num_workers_exact"))
        if exact and self.num_workers is not None and saved_workers != self.num_workers:
            raise LogitCacheError(
                f"resume state was saved with num_workers={saved_workers}, this dataset has "
                f"num_workers={self.num_workers}; resume with the same number of dataloader workers."
            )
        self.epoch = int(state["epoch"])
        self._consumed = {int(w): int(n) for w, n in state.get("consumed", {}).items()}
        self._state_workers = None if saved_workers is None else (int(saved_workers), exact)
        self.followed = followed
        if not self._following(self.epoch):
            self._plan_complete_cache()

    def featurizer_stats(self) -> dict[str, Any] | None:
        """This process's featurizer counts (per dataloader worker in a worker); None for raw rows."""
        if self.student_tokenizer is None:
            return None
        if self._featurizer is None or self._featurizer_pid != os.getpid():
            return FeatureStats().as_dict()
        return self._featurizer.stats.as_dict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = state["_group"] = None
        state["_featurizer"] = state["_featurizer_pid"] = None  # each process makes its own
        state["_companion_featurizers"] = None
        return state


def _pieces_between(order: Sequence[int], starts: Sequence[int], pos: int, end: int, n: int) -> list[Piece]:
    """The pieces of epoch positions [pos, end) over units ``order`` (``starts``: each one's first
    position); a position p >= n is example p % n, the wrap-around that pads the last ranks."""
    pieces: list[Piece] = []
    while pos < end:
        a = pos % n
        b = min(n, a + end - pos)
        j = bisect.bisect_right(starts, a) - 1
        while a < b:
            lo, hi = starts[j], starts[j + 1]
            pieces.append((order[j], a - lo, min(b, hi) - lo))
            a = min(b, hi)
            j += 1
        pos += b - (pos % n)
    return pieces


def _flat_ints(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.atleast_1d(np.asarray(x)).reshape(-1)


def _copy_row(row: Row) -> Row:
    out = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in row.items()}
    if "_teachers" in out:
        out["_teachers"] = [_copy_row(r) for r in out["_teachers"]]
    return out


def _record_keys(ds: LogitCacheDataset) -> dict[str, tuple[int, int, bytes]]:
    """id -> (unit, row in its row group, digest of its text and target spans) over ``ds``'s plan,
    reading those columns only."""
    import hashlib

    out: dict[str, tuple[int, int, bytes]] = {}
    opened: tuple[int, pq.ParquetFile] | None = None
    try:
        for u, (shard, group, _) in enumerate(ds._units):
            if opened is None or opened[0] != shard:
                if opened is not None:
                    opened[1].close()
                opened = (shard, ds.cache.open_shard(shard))
            names = set(opened[1].schema_arrow.names)
            columns = [c for c in ("id", "text", "prompt_chars", *SPAN_COLUMNS) if c in names]
            row = 0
            for batch in opened[1].read_row_group(group, columns=columns).to_batches():
                texts = batch.column(columns.index("text")).to_pylist()
                spans = decode_spans(batch, texts) or [np.zeros((0, 2), np.int32)] * len(texts)
                for rid, text, sp in zip(batch.column(0).to_pylist(), texts, spans):
                    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
                    digest.update(np.asarray(sp, dtype=np.int64).tobytes())
                    out[rid] = (u, row, digest.digest())
                    row += 1
    except (OSError, pa.ArrowException) as e:
        raise LogitCacheError(f"{ds.cache.path}: cannot read its ids and texts ({e}); run `logitcache verify {ds.cache.path}`.") from e
    finally:
        if opened is not None:
            opened[1].close()
    return out


# --- a student that aligns nothing with the cache is refused before training ---------------------


def aligned_fraction(cache_dir, tokenizer, alignment: str = "offset", rows: int = 48, *, skip_bad_shards: bool = False,
                     local_cache: str | os.PathLike | None = None) -> float:
    """The fraction of the student's text targets (ends left out: they always pair) that align
    with a teacher position, over the first ``rows`` examples of the cache; 1.0 for a cache
    without response text. Rows are read as training reads them (shards checked, bad ones
    refused or, with ``skip_bad_shards``, passed over)."""
    raw = LogitCacheDataset(cache_dir, None, shuffle=False, rank=0, world_size=1, skip_bad_shards=skip_bad_shards,
                            local_cache=local_cache)
    featurizer = featurizer_for_cache(raw.cache, tokenizer, alignment)
    for row in itertools.islice(iter(raw), rows):
        featurizer(row)
    stats = featurizer.stats
    return stats.fraction_text_matched if stats.targets > stats.end_targets else 1.0


def refuse_unaligned(cache_dir, tokenizer, alignment: str = "offset", rows: int = 48, *, skip_bad_shards: bool = False,
                     local_cache: str | os.PathLike | None = None) -> None:
    """Refuse, before training, a student tokenizer that aligns nothing with the cache."""
    fraction = aligned_fraction(cache_dir, tokenizer, alignment, rows, skip_bad_shards=skip_bad_shards,
                                local_cache=local_cache)
    if fraction == 0.0:
        name = getattr(tokenizer, "name_or_path", "") or "the student"
        raise LogitCacheError(
            f"the student's tokenizer {name!r} aligns {fraction:.1%} of the cache's target positions "
            f"(alignment {alignment}, first {rows} examples): KD would teach it nothing; check that it is the "
            "student's own tokenizer and that it keeps the text's characters (offsets), or use --alignment position."
        )
