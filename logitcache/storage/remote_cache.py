"""Reading a cache on an fsspec filesystem (s3://, gs://, az://, hf://): manifest, tokenizer, shards.

- The manifest is fetched (bounded in size, retried on transient errors: storage/remote.py).
- The tokenizer's files are downloaded into a private local directory and checked against the
  manifest's sha256 there, by the same check as a local cache's (storage/integrity.py).
- Shards are streamed, not downloaded: each row group is one ranged GET, checked against the
  manifest's sha256 of its bytes before pyarrow parses it, and so is the footer
  (storage/segments.py). A cache written before those digests has only the shard's sha256: its
  shards are then fetched whole (one GET into memory), checked, and parsed from memory.
- With ``local_cache`` (``--local-cache DIR``), whole shards are downloaded once into
  ``DIR/shards/<sha256>.parquet``, checked on download, reused by later epochs and runs (and by
  any cache holding the same shard), and fetched again if the copy is damaged.

An object replaced after the manifest was written fails its sha256: :class:`SegmentMismatch`
names the shard and the row group (or footer).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError
from logitcache.storage.integrity import shard_file_problem
from logitcache.storage.manifest import MANIFEST_NAME, Manifest, ShardInfo, check_manifest_size, parse_manifest
from logitcache.storage.remote import BUCKET_PROTOCOLS, url_fs, with_retries
from logitcache.storage.segments import SegmentFile, SegmentMismatch, covers
from logitcache.storage.writer import DATA_DIR, TOKENIZER_DIR



class UrlPath(str):
    """A URL that joins like a path (``url / "data/x.parquet"``), for messages naming a remote file."""

    def __truediv__(self, rel: str) -> "UrlPath":
        return UrlPath(f"{self.rstrip('/')}/{rel}")


class RemoteCache:
    """The remote side of a :class:`~logitcache.storage.reader.CacheReader` opened on a URL."""

    def __init__(self, url: str, local_cache: str | os.PathLike | None = None) -> None:
        if local_cache is not None and Path(local_cache).exists() and not Path(local_cache).is_dir():
            raise LogitCacheError(f"--local-cache {local_cache}: not a directory; give a directory for the shard copies.")
        self.url = UrlPath(url.rstrip("/"))
        self._fs, self.root = url_fs(self.url)
        self._pid = os.getpid()
        self.local_cache = Path(local_cache) if local_cache is not None else None
        self._tokenizer_root: Path | None = None
        self._footers: dict[tuple[str, str], pq.FileMetaData] = {}  # (path, sha256) -> footer, checked once

    @property
    def fs(self):  # -> fsspec.AbstractFileSystem
        """This process's filesystem: an async one (s3fs, gcsfs) is not fork-safe, so a dataloader
        worker makes its own instead of using its parent's."""
        if self._fs is None or self._pid != os.getpid():
            self._fs, _ = url_fs(self.url)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_footers": {}}  # made again where it is unpickled

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _info(self, rel: str) -> dict | None:
        """The object's info (size, ...), None if there is none; network errors retried."""
        def info() -> dict | None:
            try:
                return self.fs.info(self._path(rel))
            except FileNotFoundError:
                return None

        return with_retries(f"{self.url / rel}", info)

    def has(self, rel: str) -> bool:
        """Whether the object ``rel`` exists (network errors retried)."""
        return self._info(rel) is not None

    def fetch(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes [start, end) (all of it by default): one GET, retried."""
        return with_retries(f"{self.url / rel}", lambda: self.fs.cat_file(self._path(rel), start=start, end=end))

    # --- the manifest ---------------------------------------------------------------
    def read_manifest(self) -> Manifest:
        info = self._info(MANIFEST_NAME)
        if info is None:
            bucket = self.root.split("/")[0]
            if self.url.split("://")[0] in BUCKET_PROTOCOLS and not with_retries(self.url, lambda: self.fs.exists(bucket)):
                raise LogitCacheError(f"{self.url}: the bucket {bucket!r} does not exist; check the URL (and the endpoint).")
            raise LogitCacheError(
                f"{self.url}: no {MANIFEST_NAME} there, so this is not a logitcache cache; "
                "check the URL (it names the directory written by `logitcache teacher --out`)."
            )
        check_manifest_size(self.url / MANIFEST_NAME, int(info.get("size") or 0))
        return parse_manifest(self.fetch(MANIFEST_NAME), self.url / MANIFEST_NAME)

    # --- the tokenizer --------------------------------------------------------------
    def tokenizer_root(self, m: Manifest, *, fresh: bool = False) -> Path:
        """A local directory whose ``tokenizer/`` holds the remote ``tokenizer/`` files: a shared copy,
        reused while it still matches the manifest, or with ``fresh`` (verify) the files as they
        are now, in a directory of this reader's own. The caller checks them
        (integrity.tokenizer_check) before loading anything."""
        from logitcache.storage.integrity import tokenizer_check

        if self._tokenizer_root is not None and not fresh:
            return self._tokenizer_root
        files = json.dumps(m.tokenizer.get("files"), sort_keys=True)
        key = hashlib.sha256(f"{self.url}\n{files}".encode()).hexdigest()[:24]
        root = _private_dir(self.local_cache) / "tokenizers" / key
        if fresh:
            staged = self._download_tokenizer(root.parent)
            weakref.finalize(self, shutil.rmtree, staged, True)
            return staged
        if not (root / TOKENIZER_DIR).is_dir() or tokenizer_check(root, m).problems:
            staged = self._download_tokenizer(root.parent)
            if (root / TOKENIZER_DIR).is_dir():  # damaged (a sound one is never replaced: a DDP rank may be loading it)
                shutil.rmtree(root, ignore_errors=True)
            try:
                os.rename(staged, root)
            except OSError:  # another process (a DDP rank) put its copy there first: checked all the same
                shutil.rmtree(staged, ignore_errors=True)
        self._tokenizer_root = root
        return root

    def _download_tokenizer(self, parent: Path) -> Path:
        """A new directory under ``parent`` holding ``tokenizer/`` as fetched now."""
        prefix = self._path(TOKENIZER_DIR)
        names = with_retries(f"{self.url / TOKENIZER_DIR}", lambda: self.fs.find(prefix)) if self._info(TOKENIZER_DIR) else []
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=_mkdirs(parent)))
        try:
            for full in names:
                rel = full[len(prefix):].lstrip("/")
                dest = staging / TOKENIZER_DIR / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self.fetch(f"{TOKENIZER_DIR}/{rel}"))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    # --- shards ---------------------------------------------------------------------
    def data_files(self) -> list[str]:
        """Paths (relative to the cache) of the objects under data/ (verify: shards not listed)."""
        if self._info(DATA_DIR) is None:
            return []
        prefix = self._path(DATA_DIR)
        found = with_retries(f"{self.url / DATA_DIR}", lambda: self.fs.find(prefix))
        return sorted(f"{DATA_DIR}/{p[len(prefix):].lstrip('/')}" for p in found)

    def shard_problem(self, info: ShardInfo, *, remember: bool = True) -> str | None:
        """What is wrong with a shard's object before reading it: missing or another size (its bytes
        are checked as they are read). With a local cache: its verified local copy (downloaded now
        if need be), as integrity.shard_file_problem says."""
        if self.local_cache is not None:
            try:
                self.local_copy(info, remember=remember)
            except SegmentMismatch as e:
                return e.reason
            return None
        found = self._info(info.path)
        if found is None:
            return "missing"
        size = int(found.get("size") or 0)
        return None if size == info.bytes else f"{size} bytes, the manifest says {info.bytes} (truncated or replaced)"

    def _segment_file(self, info: ShardInfo) -> SegmentFile:
        segments = [tuple(s) for s in [*(info.row_groups or []), info.footer or (0, 0, "")]]
        if info.row_groups and covers(segments, info.bytes):
            names = [f"row group {g}" for g in range(len(info.row_groups))] + ["footer"]
        else:
            segments, names = [(0, info.bytes, info.sha256)], [""]  # read whole, against the shard's sha256
        return SegmentFile(self.url / info.path, info.bytes, segments, names,
                           lambda offset, length: self.fetch(info.path, offset, offset + length))

    def metadata(self, info: ShardInfo) -> pq.FileMetaData:
        """The shard's footer, from checked bytes only (raises SegmentMismatch)."""
        if self.local_cache is not None:
            return pq.read_metadata(self.local_copy(info))
        key = (info.path, info.sha256)
        if key not in self._footers:
            f = self._segment_file(info)
            self._footers[key] = f.metadata() if len(f.segments) > 1 else pq.read_metadata(pa.BufferReader(f.segment(0)))
        return self._footers[key]

    def open_shard(self, info: ShardInfo) -> pq.ParquetFile:
        """The shard for reading: every byte pyarrow reads is checked first (raises SegmentMismatch)."""
        if self.local_cache is not None:
            return pq.ParquetFile(self.local_copy(info))
        f = self._segment_file(info)
        if len(f.segments) > 1:
            return pq.ParquetFile(f, metadata=self.metadata(info))
        return pq.ParquetFile(pa.BufferReader(f.segment(0)))

    def local_copy(self, info: ShardInfo, *, remember: bool = True) -> Path:
        """The shard's verified copy in the local cache, downloaded (and checked) if it is absent or
        damaged; keyed by its sha256, so reruns and other caches holding it reuse it."""
        assert self.local_cache is not None
        dest = _mkdirs(self.local_cache / "shards") / f"{info.sha256}.parquet"
        if shard_file_problem(dest, info.bytes, info.sha256, remember=remember) is None:
            return dest
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
        os.close(fd)
        try:
            with_retries(f"{self.url / info.path}", lambda: self.fs.get_file(self._path(info.path), tmp))
            problem = shard_file_problem(Path(tmp), info.bytes, info.sha256, remember=False)
            if problem is not None:
                raise SegmentMismatch(self.url / info.path, "", problem + " (downloaded for --local-cache)")
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dest


def _mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _private_dir(local_cache: Path | None) -> Path:
    """Where downloaded tokenizer files go: the local cache, else a directory of this user's own
    (the files are loaded: no one else may write there)."""
    if local_cache is not None:
        return _mkdirs(local_cache)
    base = Path(tempfile.gettempdir()) / f"logitcache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    _mkdirs(base)
    if hasattr(os, "getuid") and (base.stat().st_uid != os.getuid() or base.stat().st_mode & 0o022):
        raise LogitCacheError(f"{base}: owned or writable by another user; remove it (remote caches put their tokenizer files there).")
    return base
