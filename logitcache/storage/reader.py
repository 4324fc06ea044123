"""CacheReader: open a cache, stream its examples, fetch one by id."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError
from logitcache.storage.integrity import footer_problem, shard_file_problem
from logitcache.storage.manifest import Manifest, load_manifest, resolve_inside
from logitcache.storage.segments import SegmentMismatch
from logitcache.storage.decode import decode_rows, shard_id_table
from logitcache.storage.rows import Row, batch_to_rows
from logitcache.storage.samples import SAMPLE_COLUMNS
from logitcache.storage.schema import EXTRA_COLUMNS
from logitcache.storage.spans import CHAT_COLUMN, SPAN_COLUMNS
from logitcache.storage.writer import TOKENIZER_DIR

if TYPE_CHECKING:
    from logitcache.storage.remote_cache import RemoteCache


# Columns stored as they are in both codecs (reading only these needs no decoding).
_PLAIN_COLUMNS = {"id", "text", "prompt_chars", "truncated", *SPAN_COLUMNS, "input_ids", "char_start", "char_end",
                  "label_logprob", "logsumexp", *EXTRA_COLUMNS, *SAMPLE_COLUMNS, CHAT_COLUMN}


class CacheReader:
    """Read-only view of a cache. Streams one record batch at a time; memory stays flat.

    >>> cache = CacheReader("out/cache")
    >>> for row in cache: ...            # dicts of numpy arrays, see storage/rows.py
    >>> cache["a1b2c3"]                  # random access by example id
    >>> CacheReader("s3://bucket/cache")  # any fsspec URL: row groups streamed, their sha256 checked
    """

    def __init__(self, cache_dir: str | os.PathLike, *, local_cache: str | os.PathLike | None = None) -> None:
        from logitcache.storage.remote import is_url, local_path

        # A URL (s3://, gs://, az://, hf://) is read through fsspec: storage/remote_cache.py.
        # ``local_cache``: a directory of verified whole-shard copies (URLs only; a local cache is read in place).
        self.remote: RemoteCache | None = None
        if is_url(cache_dir):
            from logitcache.storage.remote_cache import RemoteCache

            self.remote = RemoteCache(os.fspath(cache_dir), local_cache)
            self.path = self.remote.url
            self.manifest: Manifest = self.remote.read_manifest()
        else:
            self.path = Path(local_path(cache_dir))
            if not self.path.is_dir():
                raise LogitCacheError(f"{self.path}: no such cache directory; check the path.")
            self.manifest = load_manifest(self.path)
        self._index: dict[str, tuple[int, int]] | None = None

    @property
    def k(self) -> int:
        return self.manifest.k

    def reload_manifest(self) -> Manifest:
        """manifest.json as it is now (from disk, or fetched again from the URL); ``self.manifest`` is unchanged."""
        return load_manifest(self.path) if self.remote is None else self.remote.read_manifest()

    def tokenizer_root(self, *, fresh: bool = False) -> Path:
        """A local directory holding the cache's ``tokenizer/``: the cache itself, or for a URL a
        private copy of the remote files (``fresh``: fetched again), checked before any load."""
        return self.path if self.remote is None else self.remote.tokenizer_root(self.manifest, fresh=fresh)

    @property
    def tokenizer_dir(self) -> Path:
        """Where the teacher tokenizer's files are; use :meth:`verified_tokenizer_dir` to load them."""
        return self.tokenizer_root() / TOKENIZER_DIR

    def tokenizer_check(self):  # -> integrity.TokenizerCheck
        """The tokenizer files hashed against the manifest (once per process while unchanged)."""
        from logitcache.storage.integrity import tokenizer_check

        return tokenizer_check(self.tokenizer_root(), self.manifest)

    def verified_tokenizer_dir(self) -> Path:
        """The tokenizer directory, once every file in it matches the manifest's sha256.

        Call this right before loading the teacher tokenizer from a cache: a tokenizer file
        that was altered, added, or linked from outside the cache is refused, naming it.
        """
        if not self.tokenizer_dir.is_dir():
            raise LogitCacheError(f"{self.path}: this cache holds no teacher tokenizer ({TOKENIZER_DIR}/ is missing).")
        problems = self.tokenizer_check().problems  # hashed once per process while unchanged
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise LogitCacheError(
                f"{self.path}: refusing to load the cache's tokenizer: {problems[0]}{more}; "
                f"run `logitcache verify {self.path}`."
            )
        return self.tokenizer_dir

    def shard_path(self, i: int) -> Path:
        """Shard ``i``'s file (its URL for a remote cache); refused if its path or a symlink leads outside the cache."""
        if self.remote is not None:  # the manifest's schema keeps shard paths plain names in data/
            return self.path / self.manifest.shards[i].path
        return resolve_inside(self.path, self.manifest.shards[i].path)

    def shard_problem(self, i: int, *, hash_bytes: bool = True, remember: bool = True) -> str | None:
        """What is wrong with shard ``i``'s bytes before it is read (integrity.shard_file_problem for a
        local cache; for a URL: missing or resized, its bytes being checked as they are read)."""
        info = self.manifest.shards[i]
        if self.remote is not None:
            return self.remote.shard_problem(info, remember=remember)
        return shard_file_problem(self.shard_path(i), info.bytes, info.sha256, hash_bytes=hash_bytes, remember=remember)

    def footer_problem(self, i: int) -> tuple[list[int], str | None]:
        """Shard ``i``'s row counts from its footer, or what is wrong with it (integrity.footer_problem)."""
        info = self.manifest.shards[i]
        if self.remote is None:
            return footer_problem(self.shard_path(i), info.rows, self.manifest)
        try:
            meta = self.remote.metadata(info)
        except SegmentMismatch as e:
            return [], f"{e.segment + ': ' if e.segment else ''}{e.reason}"
        except pa.ArrowException as e:
            return [], f"cannot read the shard's Parquet footer ({e})"
        return footer_problem(meta, info.rows, self.manifest)

    def open_shard(self, i: int) -> pq.ParquetFile:
        """Shard ``i`` for reading. For a URL, every byte read is checked against the manifest first
        (a mismatch raises segments.SegmentMismatch, naming the row group)."""
        if self.remote is not None:
            return self.remote.open_shard(self.manifest.shards[i])
        return pq.ParquetFile(self.shard_path(i))

    def data_files(self) -> list[str]:
        """The files under data/, relative to the cache (verify: shards the manifest does not list)."""
        if self.remote is not None:
            return self.remote.data_files()
        return [p.relative_to(self.path).as_posix() for p in sorted((self.path / "data").glob("*"))]

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
            f = self.open_shard(i)
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
            ids = self.open_shard(i).read(columns=["id"]).column("id").to_pylist()
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
        f = self.open_shard(shard)
        # Read only the row group that holds row j.
        start = 0
        for g in range(f.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            if j < start + n:
                table = f.read_row_group(g).slice(j - start, 1)
                return next(decode_rows(table, shard_id_table(f)))
            start += n
        raise LogitCacheError(f"{self.shard_path(shard)}: row {j} missing; run `logitcache verify`.")


def open_cache(cache_dir: str | os.PathLike, *, local_cache: str | os.PathLike | None = None) -> CacheReader:
    """A :class:`CacheReader` on a local directory or an fsspec URL (``s3://bucket/cache``, ...)."""
    return CacheReader(cache_dir, local_cache=local_cache)
