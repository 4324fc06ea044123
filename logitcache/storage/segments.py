"""A shard's byte segments, each with its sha256: what lets a remote reader check the bytes it reads.

A Parquet file is its row groups one after another (a row group's column chunks are
contiguous), then the footer. Segment ``g`` runs from row group ``g``'s first byte to row
group ``g + 1``'s (the first also holds the leading ``PAR1``); the footer segment runs from the
end of the last row group to the end of the file (page indexes, if any, and the metadata). So
the segments cover every byte exactly once, and a reader that fetches one row group with one
ranged GET can check it against the manifest before pyarrow parses a byte of it.

The writer records them in the manifest's shard entry (``row_groups: [[offset, length,
sha256], ...]`` and ``footer: [offset, length, sha256]``), computed from the finished local
file. A cache written before them has neither: its shards are read whole and checked against
the shard's sha256 instead (storage/remote_cache.py).
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError

# (offset, length, sha256)
Segment = tuple[int, int, str]


def row_group_starts(meta: pq.FileMetaData) -> list[tuple[int, int]]:
    """(first byte, end) of each row group's column chunks, from the footer."""
    out = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        starts, ends = [], []
        for c in (rg.column(i) for i in range(rg.num_columns)):
            first = c.dictionary_page_offset if c.has_dictionary_page and c.dictionary_page_offset else c.data_page_offset
            starts.append(first)
            ends.append(first + c.total_compressed_size)
        out.append((min(starts), max(ends)))
    return out


def segment_bounds(meta: pq.FileMetaData, size: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """([(offset, length)] per row group, (offset, length) of the footer): a partition of the file."""
    ranges = row_group_starts(meta)
    cuts = [0] + [start for start, _ in ranges[1:]] + [ranges[-1][1] if ranges else 4]
    groups = [(a, b - a) for a, b in zip(cuts, cuts[1:])] if ranges else []
    return groups, (cuts[-1], size - cuts[-1])


def shard_segments(path: str | os.PathLike) -> tuple[list[Segment], Segment]:
    """The row-group and footer segments of a finished local shard, each with its sha256."""
    size = os.path.getsize(path)
    groups, footer = segment_bounds(pq.read_metadata(path), size)
    with open(path, "rb") as f:
        def digest(offset: int, length: int) -> Segment:
            f.seek(offset)
            h = hashlib.sha256()
            left = length
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise OSError(f"{path}: shorter than its own footer says")
                h.update(chunk)
                left -= len(chunk)
            return offset, length, h.hexdigest()

        return [digest(*g) for g in groups], digest(*footer)


def segments_problem(row_groups: list, footer: list | None) -> str | None:
    """What is wrong with the form of a manifest's segment list: each entry ``[offset, length,
    sha256]`` (None: sound). Whether they cover the shard is :func:`covers`' question."""
    if footer is None:
        return "has row_groups but no footer"
    for entry in [*row_groups, footer]:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and type(entry[0]) is int
                and type(entry[1]) is int and entry[0] >= 0 and entry[1] >= 0
                and isinstance(entry[2], str) and len(entry[2]) == 64):
            return f"has an entry {str(entry)[:60]} that is not [offset, length, sha256]"
    return None


def covers(segments: list, size: int) -> bool:
    """Whether ``segments`` cover a file of ``size`` bytes in order, every byte once. A shard
    rewritten and rehashed by hand keeps stale segments: it is then read whole, against its
    sha256 (which protects it all the same)."""
    pos = 0
    for offset, length, _ in segments:
        if offset != pos:
            return False
        pos += length
    return pos == size


class SegmentMismatch(LogitCacheError):
    """Bytes read from a shard differ from the manifest's sha256: ``shard`` (its path or URL),
    ``segment`` ("row group 3", "footer"; "" for the whole shard) and ``reason``."""

    def __init__(self, shard: str, segment: str, reason: str) -> None:
        self.shard, self.segment, self.reason = shard, segment, reason
        self.where = f"{shard}{' ' + segment if segment else ''}"
        super().__init__(f"{self.where}: {reason}")


class SegmentFile(io.RawIOBase):
    """A read-only file over a shard whose bytes come segment by segment from ``fetch(offset,
    length)`` (one ranged GET each), every segment checked against its sha256 before any of it
    is returned. pyarrow reads through it as through a local file.

    ``names[i]`` says what segment i is ("row group 3", "footer") in a mismatch's message. The
    last ``keep`` segments fetched stay in memory (a row group is read column by column).
    """

    def __init__(self, where: str, size: int, segments: list[Segment], names: list[str],
                 fetch: Callable[[int, int], bytes], keep: int = 2) -> None:
        super().__init__()
        self.where, self.size, self.segments, self.names, self._fetch = where, size, segments, names, fetch
        self._starts = [s[0] for s in segments]
        self._held: dict[int, bytes] = {}
        self._keep = keep
        self._pos = 0
        self.fetched = 0  # bytes fetched so far (the benchmark reports it)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = base + offset
        return self._pos

    def segment(self, i: int) -> bytes:
        """Segment ``i``'s bytes, fetched (or held) and checked."""
        data = self._held.get(i)
        if data is None:
            offset, length, digest = self.segments[i]
            data = self._fetch(offset, length)
            self.fetched += len(data)
            if len(data) != length or hashlib.sha256(data).hexdigest() != digest:
                raise SegmentMismatch(self.where, self.names[i], "sha256 differs from the manifest (the object was "
                                      "replaced or damaged after the manifest was written)")
            while len(self._held) >= self._keep:
                self._held.pop(next(iter(self._held)))
            self._held[i] = data
        return data

    def read(self, n: int = -1) -> bytes:
        import bisect

        end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        out = []
        while self._pos < end:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            offset, length, _ = self.segments[i]
            data = self.segment(i)
            take = data[self._pos - offset: min(end, offset + length) - offset]
            out.append(take)
            self._pos += len(take)
        return b"".join(out)

    def readall(self) -> bytes:
        return self.read(-1)

    def metadata(self) -> pq.FileMetaData:
        """The footer parsed from the checked footer segment alone (so opening reads nothing else)."""
        return pq.read_metadata(pa.BufferReader(self.segment(len(self.segments) - 1)))
