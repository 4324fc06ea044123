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
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError
from logitcache.storage.card import render_card
from logitcache.storage.fsutil import atomic_write_bytes, publish, sha256_file
from logitcache.storage.manifest import CODECS, MANIFEST_NAME, Manifest, ShardInfo, load_manifest
from logitcache.storage.rows import Row, row_nbytes, rows_to_table
from logitcache.storage.schema import POSITION_COLUMNS, TOKEN_COLUMNS

DATA_DIR = "data"
TOKENIZER_DIR = "tokenizer"
CARD_NAME = "README.md"
TMP_PREFIX = ".tmp-"

DEFAULT_SHARD_BYTES = 256 * 2**20
DEFAULT_ROW_GROUP_BYTES = 8 * 2**20  # in memory before compression: a few MB on disk
ZSTD_LEVEL = 3


class CacheWriter:
    """Writes (or resumes) a cache at ``cache_dir``. Use as a context manager."""

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        manifest: Manifest,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    ) -> None:
        if shard_bytes <= 0 or row_group_bytes <= 0:
            raise LogitCacheError("shard and row-group sizes must be positive.")
        if manifest.codec not in CODECS:
            raise LogitCacheError(f"codec {manifest.codec!r}: use one of {', '.join(CODECS)}.")
        self.cache_dir = Path(cache_dir)
        self.shard_bytes = shard_bytes
        self.row_group_bytes = min(row_group_bytes, shard_bytes)
        self.manifest = self._open(manifest, tokenizer_dir)
        self.done_ids: set[str] = self._read_done_ids()
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
            diffs = existing.settings_differences(wanted)
            if diffs:
                detail = "; ".join(
                    f"{key}: cache has {getattr(existing, key)!r}, this run has {getattr(wanted, key)!r}"
                    for key in diffs
                )
                raise LogitCacheError(
                    f"{d} already holds a cache made with other settings ({detail}). "
                    "Rerun with the original settings to resume it, or choose a new --out directory."
                )
            self._remove_stale_temp_files()
            return existing
        if d.exists() and any(d.iterdir()):
            raise LogitCacheError(
                f"--out {d} is not empty and holds no cache (no {MANIFEST_NAME}); "
                "choose a new or empty directory so nothing there is overwritten."
            )
        (d / DATA_DIR).mkdir(parents=True, exist_ok=True)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, d / TOKENIZER_DIR)
        wanted.save(d)
        self._write_card(wanted)
        return wanted

    def _remove_stale_temp_files(self) -> None:
        # Left by a run that died mid-shard; their rows are not in the manifest and get redone.
        for p in (self.cache_dir / DATA_DIR).glob(f"{TMP_PREFIX}*"):
            p.unlink()

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
        _check_row(row, self.manifest.k)
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

            table = codec.encode_compact(rows, self.manifest.k, id_table=self._id_table)
            self._id_table = codec.id_table_of(table.schema)
            # The id table grows with each row group; the shard's final one goes into its footer.
            meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != codec.META_IDS}
            return table.replace_schema_metadata(meta), codec.PARQUET_OPTIONS
        return rows_to_table(rows, self.manifest.k), {"compression": "zstd", "compression_level": ZSTD_LEVEL}

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        table, options = self._encode(self._buffer)
        if self._pq is None:
            index = len(self.manifest.shards)
            self._tmp_path = self.cache_dir / DATA_DIR / f"{TMP_PREFIX}shard-{index:05d}.parquet"
            self._pq = pq.ParquetWriter(self._tmp_path, table.schema, **options)
        self._pq.write_table(table, row_group_size=len(self._buffer))
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
        if self._id_table is not None:
            from logitcache.storage import codec

            self._pq.add_key_value_metadata({codec.META_IDS: codec.encode_id_table(self._id_table)})
            self._id_table = None
        self._pq.close()
        self._pq = None
        tmp, self._tmp_path = self._tmp_path, None
        final = tmp.with_name(tmp.name[len(TMP_PREFIX) :])
        publish(tmp, final)
        self.manifest.shards.append(
            ShardInfo(
                path=final.relative_to(self.cache_dir).as_posix(),
                rows=self._shard_rows,
                tokens=self._shard_tokens,
                bytes=final.stat().st_size,
                sha256=sha256_file(final),
                truncated=self._shard_truncated,
            )
        )
        self._shard_rows = self._shard_tokens = self._shard_truncated = 0
        self.manifest.save(self.cache_dir)

    def flush(self) -> None:
        """Close the current shard so everything written so far is durable and listed."""
        self._flush_row_group()
        self._finish_shard()
        self.manifest.save(self.cache_dir)

    def mark_complete(self) -> None:
        """Every input record has been processed: the cache is complete."""
        self.manifest.status = "complete"

    def close(self) -> None:
        self.flush()
        self._write_card(self.manifest)

    def abort(self) -> None:
        """Drop the unfinished shard (its rows are redone by the next run)."""
        if self._pq is not None:
            try:
                self._pq.close()
            finally:
                self._pq = None
        if self._tmp_path is not None and self._tmp_path.exists():
            self._tmp_path.unlink()
        self._tmp_path = None
        self._id_table = None

    def _write_card(self, manifest: Manifest) -> None:
        atomic_write_bytes(self.cache_dir / CARD_NAME, render_card(manifest).encode())

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # Interrupted (Ctrl-C, an error in the engine): keep the finished rows, they are
        # valid; if even that fails (disk full), drop the partial shard and keep the rest.
        try:
            self.flush()
        except BaseException:
            self.abort()


def _check_row(row: Row, k: int) -> None:
    n = len(row["input_ids"])
    for name in TOKEN_COLUMNS:
        if len(row[name]) != n:
            raise ValueError(f"row {row['id']!r}: {name} has {len(row[name])} entries, input_ids has {n}")
    for name in POSITION_COLUMNS:
        if len(row[name]) != max(n - 1, 0):
            raise ValueError(f"row {row['id']!r}: {name} has {len(row[name])} positions, expected {n - 1}")
    if n > 1 and row["topk_ids"].shape[1] != k:
        raise ValueError(f"row {row['id']!r}: topk has width {row['topk_ids'].shape[1]}, cache k is {k}")
