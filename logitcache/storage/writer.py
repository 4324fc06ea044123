"""CacheWriter: streams rows into zstd Parquet shards, resumable and crash-safe.

    with CacheWriter(out_dir, manifest, tokenizer_dir=tok_dir) as w:
        for row in rows:
            if row["id"] not in w.done_ids:
                w.write(row)
        w.mark_complete()

Rules (DESIGN.md §2): a shard is written under a temp name and becomes visible only when
complete (fsync, rename); manifest.json is rewritten atomically after each shard; opening
an existing cache with the same settings resumes it (``done_ids`` says what is there), with
different settings it refuses. Memory holds one row group, never the whole cache.

Crashes: a process killed at any moment leaves a cache that the rerun completes exactly
(tests/test_kill_anywhere.py kills it at each ``crash_point``). A new cache is created under
an ``.init`` marker, so a run killed while creating it starts afresh; a rerun drops what a
killed run left outside the manifest (temp files, a shard renamed but not yet listed).
Disk errors (ENOSPC, EIO, ...) stop the run with a ``CacheWriteError`` that names the file
and the fix; the unfinished shard is dropped, the listed ones stay valid.
Concurrency: the writer holds the directory's ``CacheLock`` (storage/lock.py) while open.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError
from logitcache.storage.card import render_card
from logitcache.storage.fsutil import atomic_write_bytes, copy_files, crash_point, fsync_dir, publish, sha256_file, temp_name
from logitcache.storage.lock import LOCK_NAME, CacheLock
from logitcache.storage.marker import clear_marked, write_marker
from logitcache.storage.manifest import CODECS, MANIFEST_NAME, Manifest, ShardInfo, load_manifest
from logitcache.storage.rows import V1_PARQUET_OPTIONS, Row, row_nbytes, rows_to_table
from logitcache.storage.samples import SAMPLE_COLUMNS, SAMPLE_COUNTS
from logitcache.storage.segments import shard_segments
from logitcache.storage.schema import POSITION_COLUMNS, STATS_COLUMNS, TAU_COLUMN, TOKEN_COLUMNS, WORD_START_COLUMN

DATA_DIR = "data"
TOKENIZER_DIR = "tokenizer"
CARD_NAME = "README.md"
TMP_PREFIX = ".tmp-"
INIT_MARKER = ".init"  # present while a new cache is being created (see _create)
SHARD_NAME = "shard-{index:05d}.parquet"

DEFAULT_SHARD_BYTES = 256 * 2**20
DEFAULT_ROW_GROUP_BYTES = 8 * 2**20  # in memory before compression: a few MB on disk


class CacheWriteError(LogitCacheError):
    """The disk refused a write (full, I/O error, read-only...). ``errno`` says which."""

    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.errno = errno_


class CacheWriter:
    """Writes (or resumes) a cache at ``cache_dir``. Use as a context manager.

    ``lock``: a ``CacheLock`` on ``cache_dir`` that the caller already holds; without one the
    writer takes its own and releases it when closed. ``on_commit``: called after each save of
    the manifest (a shard listed, the end), when everything it lists is durable: the upload of
    a remote cache (storage/sync.py) hangs here.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        manifest: Manifest,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
        lock: CacheLock | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        if shard_bytes <= 0 or row_group_bytes <= 0:
            raise LogitCacheError("shard and row-group sizes must be positive.")
        if manifest.codec not in CODECS:
            raise LogitCacheError(f"codec {manifest.codec!r}: use one of {', '.join(CODECS)}.")
        self.cache_dir = Path(cache_dir)
        self.shard_bytes = shard_bytes
        self.row_group_bytes = min(row_group_bytes, shard_bytes)
        self.on_commit = on_commit
        self._own_lock = None if lock is not None else CacheLock(self.cache_dir).acquire()
        self._broken = False  # a write failed: the open shard may be torn and must not be finished
        try:
            self.manifest = self._open(manifest, tokenizer_dir)
            self.done_ids: set[str] = self._read_done_ids()
        except BaseException:
            self._release_lock()
            raise
        self._buffer: list[Row] = []
        self._buffer_bytes = 0
        self._pq: pq.ParquetWriter | None = None
        self._tmp_path: Path | None = None
        self._id_table = None  # compact codec: this shard's id table so far
        self._shard_rows = self._shard_tokens = self._shard_truncated = 0

    # --- opening and resuming ----------------------------------------------------------
    def _open(self, wanted: Manifest, tokenizer_dir: str | os.PathLike | None) -> Manifest:
        d = self.cache_dir
        if d.exists() and not d.is_dir():
            raise LogitCacheError(f"--out {d} is a file; give a directory for the cache.")
        if (d / MANIFEST_NAME).exists():
            existing = load_manifest(d)
            # A cache begun in an older format resumes in it (every version listed is readable), so
            # an upgrade of logitcache mid-run does not orphan it; rows it cannot hold are refused.
            diffs = [key for key in existing.settings_differences(wanted)
                     if not (key == "format_version" and existing.format_version < wanted.format_version)]
            if diffs:
                detail = "; ".join(
                    f"{key}: cache has {getattr(existing, key)!r}, this run has {getattr(wanted, key)!r}"
                    for key in diffs
                )
                flags = _flags_for(existing, diffs)
                hint = f" (for this cache: {' '.join(flags)})" if flags else ""
                raise LogitCacheError(
                    f"{d} already holds a cache made with other settings ({detail}). "
                    f"Rerun with the original settings to resume it{hint}, or choose a new --out directory."
                )
            self._remove_leftovers(existing)
            return existing
        if (d / INIT_MARKER).exists():
            # A run died while creating this cache: remove what it made, and nothing else.
            clear_marked(d, INIT_MARKER, keep=(LOCK_NAME,))
        elif d.exists() and any(p.name != LOCK_NAME for p in d.iterdir()):
            raise LogitCacheError(
                f"--out {d} is not empty and holds no cache (no {MANIFEST_NAME}); "
                "choose a new or empty directory so nothing there is overwritten."
            )
        with self._disk_errors(f"creating the cache in {d}"):
            self._create(wanted, tokenizer_dir)
        return wanted

    def _create(self, wanted: Manifest, tokenizer_dir: str | os.PathLike | None) -> None:
        """Lay out a new cache. The manifest comes last: until it exists, the marker says that
        the directory holds a half-made cache, which the next run may clear."""
        d = self.cache_dir
        d.mkdir(parents=True, exist_ok=True)
        # The marker lists what this creation may leave behind, all a rerun will ever remove.
        write_marker(d, INIT_MARKER, layout_names())
        fsync_dir(d)
        (d / DATA_DIR).mkdir(exist_ok=True)
        crash_point("init.data_dir")
        if tokenizer_dir is not None:
            copy_files(Path(tokenizer_dir), d / TOKENIZER_DIR)
        crash_point("init.tokenizer")
        self._write_card(wanted)
        wanted.save(d)
        crash_point("init.manifest")
        (d / INIT_MARKER).unlink()

    def _remove_leftovers(self, manifest: Manifest) -> None:
        """Drop what a killed run left outside the manifest; its rows get redone."""
        data = self.cache_dir / DATA_DIR
        for p in data.glob(f"{TMP_PREFIX}*"):  # shards it was writing
            p.unlink()
        listed = {s.path for s in manifest.shards}
        # A shard renamed into place just before the kill, not yet in the manifest; the next
        # shard would overwrite it, but a reader or verify must not see it meanwhile.
        orphan = data / SHARD_NAME.format(index=len(manifest.shards))
        if orphan.relative_to(self.cache_dir).as_posix() not in listed:
            orphan.unlink(missing_ok=True)
        for name in (MANIFEST_NAME, CARD_NAME):  # staged by atomic_write_bytes
            temp_name(self.cache_dir / name).unlink(missing_ok=True)
        # Killed after the manifest, the last step of _create: the cache is whole.
        (self.cache_dir / INIT_MARKER).unlink(missing_ok=True)

    def _read_done_ids(self) -> set[str]:
        done: set[str] = set()
        for shard in self.manifest.shards:
            ids = pq.read_table(self.cache_dir / shard.path, columns=["id"]).column("id").to_pylist()
            done.update(ids)
        done.update(self.manifest.skipped)
        return done

    # --- writing -----------------------------------------------------------------------
    def write(self, row: Row) -> None:
        """Append one example. Raises if its id is already in the cache."""
        rid = row["id"]
        if rid in self.done_ids:
            raise LogitCacheError(f"example id {rid!r} is already in the cache; ids must be unique.")
        _check_row(row, self.manifest)
        self.done_ids.add(rid)
        self._buffer.append(row)
        self._buffer_bytes += row_nbytes(row)
        if self._buffer_bytes >= self.row_group_bytes:
            self._flush_row_group()

    def skip(self, example_id: str, reason: str) -> None:
        """Record an example that yields no row (e.g. empty text) so a rerun does not retry it."""
        self.done_ids.add(example_id)
        self.manifest.skipped[example_id] = reason

    def _encode(self, rows: list[Row]):
        """Rows -> an Arrow table in the cache's codec, and the ParquetWriter options for it."""
        if self.manifest.codec == "compact":
            from logitcache.storage import codec

            table = codec.encode_compact(rows, self.manifest.k, id_table=self._id_table,
                                         **self.manifest.column_options())
            self._id_table = codec.id_table_of(table.schema)
            # The id table grows with each row group; the shard's final one goes into its footer.
            meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != codec.META_IDS}
            return table.replace_schema_metadata(meta), codec.PARQUET_OPTIONS
        return rows_to_table(rows, self.manifest.k, **self.manifest.column_options()), V1_PARQUET_OPTIONS

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        self._check_usable()
        table, options = self._encode(self._buffer)
        index = len(self.manifest.shards)
        with self._disk_errors(f"writing shard {DATA_DIR}/{SHARD_NAME.format(index=index)}"):
            if self._pq is None:
                self._tmp_path = self.cache_dir / DATA_DIR / (TMP_PREFIX + SHARD_NAME.format(index=index))
                self._pq = pq.ParquetWriter(self._tmp_path, table.schema, **options)
            self._pq.write_table(table, row_group_size=len(self._buffer))
            crash_point("shard.row_group")
        self._shard_rows += len(self._buffer)
        self._shard_tokens += sum(len(r["input_ids"]) for r in self._buffer)
        self._shard_truncated += sum(bool(r["truncated"]) for r in self._buffer)
        self._buffer.clear()
        self._buffer_bytes = 0
        if self._tmp_path.stat().st_size >= self.shard_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._pq is None:
            return
        final = self._tmp_path.with_name(self._tmp_path.name[len(TMP_PREFIX) :])
        rel = final.relative_to(self.cache_dir).as_posix()
        with self._disk_errors(f"writing shard {rel}"):
            if self._id_table is not None:
                from logitcache.storage import codec

                self._pq.add_key_value_metadata({codec.META_IDS: codec.encode_id_table(self._id_table)})
            self._pq.close()
            crash_point("shard.closed")
            publish(self._tmp_path, final)
            crash_point("shard.published")
        self._pq = self._tmp_path = self._id_table = None
        try:
            with self._disk_errors(f"writing shard {rel}"):
                groups, footer = shard_segments(final)  # what a remote reader checks range by range
                info = ShardInfo(
                    path=rel,
                    rows=self._shard_rows,
                    tokens=self._shard_tokens,
                    bytes=final.stat().st_size,
                    sha256=sha256_file(final),
                    truncated=self._shard_truncated,
                    row_groups=[list(g) for g in groups],
                    footer=list(footer),
                )
            self.manifest.shards.append(info)
            self._save_manifest()
        except CacheWriteError:
            if self.manifest.shards and self.manifest.shards[-1].path == rel:
                self.manifest.shards.pop()
            self._unpublish(rel)
            raise
        self._shard_rows = self._shard_tokens = self._shard_truncated = 0
        crash_point("shard.listed")

    def _unpublish(self, rel: str) -> None:
        """The manifest could not list this shard: remove it, so what is left verifies."""
        try:
            listed = {s.path for s in load_manifest(self.cache_dir).shards}
            if rel not in listed:  # the manifest's rename may have happened before the error
                (self.cache_dir / rel).unlink()
        except Exception:  # the disk is failing: the rerun drops the shard (_remove_leftovers)
            pass

    def _save_manifest(self) -> None:
        with self._disk_errors(f"updating {MANIFEST_NAME}"):
            self.manifest.save(self.cache_dir)
        if self.on_commit is not None:
            self.on_commit()

    @contextlib.contextmanager
    def _disk_errors(self, what: str) -> Iterator[None]:
        """Turn an OSError of the disk into a one-line CacheWriteError; the writer stops."""
        try:
            yield
        except OSError as e:
            self._broken = True
            manifest = getattr(self, "manifest", None)  # None while the cache is being created
            kept = None if manifest is None else len(manifest.shards)
            raise CacheWriteError(_disk_message(e, what, self.cache_dir, kept), e.errno) from e

    def _check_usable(self) -> None:
        if self._broken:
            raise LogitCacheError("the cache writer stopped after a failed write; rerun the same command to resume.")

    def flush(self) -> None:
        """Close the current shard so everything written so far is durable and listed."""
        self._check_usable()
        self._flush_row_group()
        self._finish_shard()
        self._save_manifest()

    def mark_complete(self) -> None:
        """Every input record has been processed: the cache is complete."""
        self.manifest.status = "complete"

    def close(self) -> None:
        """Finish the last shard, the manifest and the card; then release the lock."""
        try:
            self.flush()
            crash_point("close.flushed")
            with self._disk_errors(f"writing {CARD_NAME}"):
                self._write_card(self.manifest)
        except BaseException:
            self.abort()
            raise
        finally:
            self._release_lock()

    def abort(self) -> None:
        """Drop the unfinished shard (its rows are redone by the next run)."""
        if self._pq is not None:
            try:
                self._pq.close()
            except Exception:  # a failed disk fails again here; the shard is dropped anyway
                pass
            finally:
                self._pq = None
        if self._tmp_path is not None:
            try:
                self._tmp_path.unlink(missing_ok=True)
            except OSError:  # the rerun removes it
                pass
        self._tmp_path = None
        self._id_table = None
        self._buffer.clear()
        self._buffer_bytes = 0

    def _write_card(self, manifest: Manifest) -> None:
        atomic_write_bytes(self.cache_dir / CARD_NAME, render_card(manifest).encode())

    def _release_lock(self) -> None:
        if self._own_lock is not None:
            self._own_lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            if not self._broken:
                # Interrupted (Ctrl-C, an error in the engine): the finished rows are valid,
                # keep them; if even that fails (disk full), drop the partial shard.
                self.flush()
            else:  # after a failed write the open shard may be torn: never finish it
                self.abort()
        except BaseException:
            self.abort()
        finally:
            self._release_lock()


def _disk_message(e: OSError, what: str, cache_dir: Path, kept: int | None) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        problem = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        fix = "free some space"
    elif e.errno == errno.EIO:
        problem = "I/O error (EIO)"
        fix = "check the disk and its filesystem"
    else:
        problem = e.strerror or str(e)
        fix = "fix the cause"
    if kept is None:
        return f"{problem} while {what}: {fix}, then rerun the same command."
    return (
        f"{problem} while {what} in {cache_dir}: {fix}, then rerun the same command to resume "
        f"({kept} finished shard{'s' if kept != 1 else ''} kept, the unfinished one is redone)."
    )


def _flags_for(m: Manifest, keys: list[str]) -> list[str]:
    """The `logitcache teacher` flags that repeat ``m``'s optional settings among ``keys`` (a cache
    made before they existed resumes only with --no-eos --temperatures none)."""
    flags = []
    if "eos_id" in keys:
        flags.append("--no-eos" if m.eos_id is None else "--eos")
    if "temperatures" in keys:
        flags.append("--temperatures " + (",".join(f"{t:g}" for t in m.temperatures) or "none"))
    if "logit_stats" in keys:
        flags.append("--logit-stats" if m.logit_stats else "--no-logit-stats")
    if "word_start" in keys:
        flags.append("--word-start" if m.word_start else "--no-word-start")
    if "sample" in keys:
        flags.append(f"--sample {m.sample}" if m.sample else "--sample 0")
    if "max_chars" in keys and m.max_chars is not None:
        flags.append(f"--max-chars {m.max_chars}")
    return flags


def layout_names() -> tuple[str, ...]:
    """Every name that laying out a cache may make in its directory, the atomic writes' temp files
    too: what a creation (the writer's) or a merge killed half-way may leave, and all a rerun removes."""
    return (DATA_DIR, TOKENIZER_DIR, CARD_NAME, temp_name(Path(CARD_NAME)).name, MANIFEST_NAME,
            temp_name(Path(MANIFEST_NAME)).name)


def _check_row(row: Row, m: Manifest) -> None:
    k = m.k
    n = len(row["input_ids"])
    for name in TOKEN_COLUMNS:
        if len(row[name]) != n:
            raise ValueError(f"row {row['id']!r}: {name} has {len(row[name])} entries, input_ids has {n}")
    extra = (((TAU_COLUMN,) if m.temperatures else ()) + (STATS_COLUMNS if m.logit_stats else ())
             + ((WORD_START_COLUMN,) if m.word_start else ()) + (SAMPLE_COLUMNS if m.sample else ()))
    for name in extra:
        if name not in row:
            raise ValueError(f"row {row['id']!r}: no {name} column, which this cache's manifest promises")
    if m.temperatures and n > 1 and np.shape(row[TAU_COLUMN])[-1] != len(m.temperatures):
        raise ValueError(f"row {row['id']!r}: lse_tau has {np.shape(row[TAU_COLUMN])[-1]} temperatures, the cache {len(m.temperatures)}")
    for name in POSITION_COLUMNS + extra:
        if len(row[name]) != max(n - 1, 0):
            raise ValueError(f"row {row['id']!r}: {name} has {len(row[name])} positions, expected {n - 1}")
    if m.sample and n > 1 and np.any(np.asarray(row[SAMPLE_COUNTS], np.int64).sum(axis=1) != m.sample):
        raise ValueError(f"row {row['id']!r}: sample_counts do not sum to the cache's sample={m.sample} at every position")
    if n > 1 and row["topk_ids"].shape[1] != k:
        raise ValueError(f"row {row['id']!r}: topk has width {row['topk_ids'].shape[1]}, cache k is {k}")
