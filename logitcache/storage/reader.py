"""CacheReader: open a cache, stream its examples, fetch one by id."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError
from logitcache.storage.manifest import Manifest, load_manifest, resolve_inside
from logitcache.storage.decode import decode_rows, shard_id_table
from logitcache.storage.rows import Row, batch_to_rows
from logitcache.storage.samples import SAMPLE_COLUMNS
from logitcache.storage.schema import EXTRA_COLUMNS
from logitcache.storage.spans import CHAT_COLUMN, SPAN_COLUMNS
from logitcache.storage.writer import TOKENIZER_DIR


# Columns stored as they are in both codecs (reading only these needs no decoding).
_PLAIN_COLUMNS = {"id", "text", "prompt_chars", "truncated", *SPAN_COLUMNS, "input_ids", "char_start", "char_end",
                  "label_logprob", "logsumexp", *EXTRA_COLUMNS, *SAMPLE_COLUMNS, CHAT_COLUMN}


class CacheReader:
    """Read-only view of a cache. Streams one record batch at a time; memory stays flat.

    >>> cache = CacheReader("out/cache")
    >>> for row in cache: ...            # dicts of numpy arrays, see storage/rows.py
    >>> cache["a1b2c3"]                  # random access by example id
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.path = Path(cache_dir)
        if not self.path.is_dir():
            raise LogitCacheError(f"{self.path}: no such cache directory; check the path.")
        self.manifest: Manifest = load_manifest(self.path)
        self._index: dict[str, tuple[int, int]] | None = None

    @property
    def k(self) -> int:
        return self.manifest.k

    @property
    def tokenizer_dir(self) -> Path:
        """Where the teacher tokenizer's files are; use :meth:`verified_tokenizer_dir` to load them."""
        return self.path / TOKENIZER_DIR

    def verified_tokenizer_dir(self) -> Path:
        """The tokenizer directory, once every file in it matches the manifest's sha256.

        Call this right before loading the teacher tokenizer from a cache: a tokenizer file
        that was altered, added, or linked from outside the cache is refused, naming it.
        """
        from logitcache.storage.integrity import tokenizer_check

        if not self.tokenizer_dir.is_dir():
            raise LogitCacheError(f"{self.path}: this cache holds no teacher tokenizer ({TOKENIZER_DIR}/ is missing).")
        problems = tokenizer_check(self.path, self.manifest).problems  # hashed once per process while unchanged
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise LogitCacheError(
                f"{self.path}: refusing to load the cache's tokenizer: {problems[0]}{more}; "
                f"run `logitcache verify {self.path}`."
            )
        return self.tokenizer_dir

    def shard_path(self, i: int) -> Path:
        """Shard ``i``'s file; refused if its path or a symlink leads outside the cache."""
        return resolve_inside(self.path, self.manifest.shards[i].path)

    def __len__(self) -> int:
        return self.manifest.num_examples

    def iter_rows(self, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[Row]:
        """Rows in cache order; ``columns`` (e.g. ``["id"]``) reads only those (v1 names, or
        ``target_spans``: asked for, or with ``prompt_chars``, rows get their spans in either format)."""
        compact = self.manifest.codec == "compact"
        if columns is not None:
            columns = self._with_span_columns(columns)
        if compact and columns is not None and not set(columns) <= _PLAIN_COLUMNS:
            columns = None  # top-k data lives in the codec's own columns: decode whole rows
        for i in range(len(self.manifest.shards)):
            f = pq.ParquetFile(self.shard_path(i))
            id_table = shard_id_table(f) if compact and columns is None else None
            for batch in f.iter_batches(batch_size=batch_size, columns=columns):
                yield from (batch_to_rows(batch) if columns is not None else decode_rows(batch, id_table))

    def _with_span_columns(self, columns: list[str]) -> list[str]:
        # A v2 row's prompt_chars says only where its first span starts: the spans come with it.
        if "target_spans" not in columns and "prompt_chars" not in columns:
            return columns
        wanted = ["text", "prompt_chars", *(SPAN_COLUMNS if self.manifest.has_spans else ())]
        return [c for c in columns if c != "target_spans"] + [c for c in wanted if c not in columns]

    def __iter__(self) -> Iterator[Row]:
        return self.iter_rows()

    def ids(self) -> Iterator[str]:
        for row in self.iter_rows(columns=["id"], batch_size=65536):
            yield row["id"]

    def _build_index(self) -> dict[str, tuple[int, int]]:
        index: dict[str, tuple[int, int]] = {}
        for i in range(len(self.manifest.shards)):
            ids = pq.read_table(self.shard_path(i), columns=["id"]).column("id").to_pylist()
            for j, rid in enumerate(ids):
                index[rid] = (i, j)
        return index

    def __contains__(self, example_id: str) -> bool:
        if self._index is None:
            self._index = self._build_index()
        return example_id in self._index

    def _some_ids(self, n: int = 3) -> str:
        """A few real ids to copy from, cut short: an id can be any string, and the error one line."""
        ids = list(itertools.islice(self._index, n))
        if not ids:
            return "it holds no examples"
        shown = ", ".join(repr(i if len(i) <= 40 else i[:40] + "...") for i in ids)
        return f"its ids include {shown} ({len(self._index)} in all)"

    def __getitem__(self, example_id: str) -> Row:
        if self._index is None:
            self._index = self._build_index()
        try:
            shard, j = self._index[example_id]
        except KeyError:
            raise LogitCacheError(
                f"no example with id {example_id!r} in {self.path}; {self._some_ids()}; "
                f"list them all with `logitcache inspect {self.path} --ids`."
            ) from None
        f = pq.ParquetFile(self.shard_path(shard))
        # Read only the row group that holds row j.
        start = 0
        for g in range(f.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            if j < start + n:
                table = f.read_row_group(g).slice(j - start, 1)
                return next(decode_rows(table, shard_id_table(f)))
            start += n
        raise LogitCacheError(f"{self.shard_path(shard)}: row {j} missing; run `logitcache verify`.")


def open_cache(cache_dir: str | os.PathLike) -> CacheReader:
    return CacheReader(cache_dir)
