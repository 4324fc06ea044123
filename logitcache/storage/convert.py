"""convert: rewrite a complete cache with another codec, verified both ways.

The output is in the current cache format (v2): a v1 source's rows get their one target span
(``prompt_chars`` to the end of the text) in the span columns; the values are otherwise the same.

    report = convert_cache("cache", "cache-v1", "v1")

Why: a ``compact`` cache is about half the bytes of ``v1``, but its top-k columns are
logitcache's own encoding, which `datasets`, pandas or DuckDB show as opaque bytes; ``v1`` is
plain Parquet that any of them reads. Converting goes either way (or to the same codec).

How: the source must be complete and sound (verify's file checks: every shard's size, sha256
and footer, the tokenizer files). Its rows are decoded in order and written with the stage-1
``CacheWriter`` (shards under temp names, fsync, rename, each hashed in the manifest, the
manifest rewritten after each shard), into a manifest that is the source's (teacher, tokenizer,
template, temperatures, skipped ids, ...) with the new codec and ``converted_from`` recording
the source. Then the result is checked, and only then marked complete:

* it passes :func:`verify_cache` (the check `logitcache verify` runs);
* its decoded rows equal the source's decoded rows, in order. Every column is equal exactly
  except ``topk_logprobs``, which relates to the source's decoded values ``x`` as follows:

  - to ``v1``: the converted value is exactly ``float16(max(x, float16 lowest))``, the value
    the v1 writer stores for ``x`` (:func:`expected_v1_logprobs`). From a v1 source, ``x`` is
    already float16, so the values are identical; from a compact source, ``x`` is float32
    (``lp_0 - n * q``) and the float16 rounding moves it by at most half a float16 ulp,
    ``|x| * 2**-11``.
  - to ``compact``: within ``codec.ERROR_BOUND_NATS`` (q/2 + 2**-17 < 0.0098 nats) of ``x``.

Interrupted (Ctrl-C, SIGTERM, a kill): OUT is a partial cache whose manifest names the source;
rerunning the same command resumes it, keeping the finished shards. Any other non-empty OUT is
refused, touching nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError
from logitcache.storage import codec as compact_codec
from logitcache.storage.schema import FORMAT_VERSION
from logitcache.storage.card import render_card
from logitcache.storage.decode import decode_rows, shard_id_table
from logitcache.storage.fsutil import atomic_write_bytes
from logitcache.storage.integrity import id_bound, value_problems
from logitcache.storage.lock import LOCK_NAME, CacheLock
from logitcache.storage.manifest import CODECS, MANIFEST_NAME, Manifest, load_manifest, resolve_inside
from logitcache.storage.reader import CacheReader
from logitcache.storage.rows import Row, stored_float16
from logitcache.storage.spans import CHAT_COLUMN
from logitcache.storage.verify import verify_cache
from logitcache.storage.writer import (
    CARD_NAME,
    DEFAULT_ROW_GROUP_BYTES,
    DEFAULT_SHARD_BYTES,
    INIT_MARKER,
    TOKENIZER_DIR,
    CacheWriter,
)

CODEC_USES = {
    "v1": "plain Parquet (float16 log-probs, int32 ids) that datasets, pandas and DuckDB read",
    "compact": "logitcache's compact encoding, about half the bytes of v1, read by logitcache only",
}

# on_progress(stage, done, total): stages "checking" (source shards), "converting" (examples),
# "verifying" (converted shards), "comparing" (examples).
Progress = Callable[[str, int, int], None]


@dataclass
class ConvertReport:
    source: Path
    out: Path
    source_codec: str
    codec: str
    shards: int = 0
    examples: int = 0
    skipped: int = 0
    tokens: int = 0
    source_bytes: int = 0
    bytes: int = 0
    resumed: int = 0  # examples a previous, interrupted convert had already written
    was_complete: bool = False  # OUT was already a finished convert of the source: only checked again
    max_logprob_diff: float = 0.0  # largest |converted - source| top-k log-prob seen

    def summary(self) -> str:
        if self.codec == "v1":
            values = "top-k log-probs exactly the float16 of the source's"
        else:
            values = (f"top-k log-probs within {compact_codec.ERROR_BOUND_NATS:.4f} nats of the source's, "
                      f"largest difference {self.max_logprob_diff:.4f}")
        if self.was_complete:
            resumed = "; it was already converted, checked again"
        else:
            resumed = f"; resumed, {self.resumed} examples were already written" if self.resumed else ""
        return (
            f"converted {self.source} ({self.source_codec}) into {self.out} ({self.codec}): {self.shards} shards, "
            f"{self.examples} examples ({self.skipped} skipped), {self.tokens} tokens, "
            f"{_size(self.source_bytes)} -> {_size(self.bytes)}{resumed}; verified: passes "
            f"verify, and every row decodes to the source's (ids, text and offsets exact; {values})"
        )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def convert_cache(
    source: str | os.PathLike,
    out: str | os.PathLike,
    codec: str,
    *,
    on_progress: Progress | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    tool_version: str | None = None,
) -> ConvertReport:
    """Write the complete cache ``source`` into ``out`` with ``codec``, then check it both ways.

    Args:
        source: a complete cache (read only; never modified).
        out: a new or empty directory, or a partial convert of the same source to the same codec
            (resumed).
        codec: ``"v1"`` or ``"compact"``.
        on_progress: called as ``on_progress(stage, done, total)`` during each long stage.
        shard_bytes, row_group_bytes: as for :class:`CacheWriter`.
        tool_version: recorded in the new manifest (the source's is kept in ``converted_from``).

    Raises ``LogitCacheError`` naming the problem and the fix: bad codec, a source that is no
    cache, partial, unmerged parts or damaged, an ``out`` inside the source or holding anything
    but a partial convert of it.
    """
    src, out = Path(source), Path(out)
    progress = on_progress or _nothing
    if codec not in CODECS:
        raise LogitCacheError(
            f"--codec {codec!r} is not a codec; use v1 ({CODEC_USES['v1']}) or compact ({CODEC_USES['compact']})."
        )
    m = _load_source(src)
    _check_out_outside(out, src)
    if out.exists() and not out.is_dir():
        raise LogitCacheError(f"{out} is a file; give a new or empty directory for the converted cache.")
    wanted = _target_manifest(src, m, codec, tool_version)
    _check_out(out, src, wanted)  # before the long source check: a wrong OUT is refused at once
    _check_source(src, m, progress)
    report = ConvertReport(source=src, out=out, source_codec=m.codec, codec=codec)
    with CacheLock(out, purpose="converting into") as lock:
        _check_out(out, src, wanted)  # again, now that no other process can change it
        tokenizer = src / TOKENIZER_DIR if (src / TOKENIZER_DIR).is_dir() else None
        with CacheWriter(out, wanted, tokenizer_dir=tokenizer, shard_bytes=shard_bytes,
                         row_group_bytes=row_group_bytes, lock=lock) as writer:
            report.resumed = len(writer.done_ids) - len(m.skipped)
            report.was_complete = writer.manifest.status == "complete"
            _copy_rows(src, m, writer, progress)
        _check_result(src, out, report, progress)
        _mark_complete(out, report)
    return report


def _nothing(stage: str, done: int, total: int) -> None:
    pass


# --- the source and OUT ----------------------------------------------------------------------


def _load_source(src: Path) -> Manifest:
    if not src.is_dir():
        raise LogitCacheError(f"{src}: no such cache directory; check the path.")
    m = load_manifest(src)  # names the merge command for a directory of parts
    if m.status != "complete":
        raise LogitCacheError(
            f"{src} is a partial cache (its teacher run has not finished); finish it first by rerunning its "
            "`logitcache teacher` command (it resumes), then convert."
        )
    return m


def _check_out_outside(out: Path, src: Path) -> None:
    # Before the lock creates ``out``: a convert into the source would plant files in a cache
    # we are reading (and verify would find them there as unknown shards).
    where, root = out.resolve(), src.resolve()
    if where == root or where.is_relative_to(root):
        raise LogitCacheError(
            f"{out} is {'the cache' if where == root else 'inside the cache'} {src}; give an output directory "
            "outside it for the converted cache."
        )


def source_digest(m: Manifest) -> str:
    """What identifies a source cache's content: its shards' sha256 and its skipped ids, in order."""
    h = hashlib.sha256()
    for s in m.shards:
        h.update(f"{s.path}\0{s.sha256}\n".encode())
    for rid in sorted(m.skipped):
        h.update(f"skipped\0{rid}\n".encode())
    return h.hexdigest()


def _target_manifest(src: Path, m: Manifest, codec: str, tool_version: str | None) -> Manifest:
    origin = {"codec": m.codec, "path": str(src.resolve()), "tool_version": m.tool_version,
              "updated_at": m.updated_at, "shards_digest": source_digest(m),
              # each encoding may add the codec's error (verify widens its tolerance by as much)
              "compact_encodings": m.compact_encodings + (codec == "compact")}
    # A convert writes the current format: a v1 source's rows become v2 rows of one span each.
    return dataclasses.replace(
        m, codec=codec, converted_from=origin, status="partial", shards=[], skipped=dict(m.skipped),
        format_version=FORMAT_VERSION,
        tool_version=m.tool_version if tool_version is None else tool_version,
    )


def _check_out(out: Path, src: Path, wanted: Manifest) -> None:
    """OUT is new, empty, a creation cut short (the writer clears it) or a convert of this source
    to this codec (resumed); anything else is refused before a byte is written."""
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    if not names or INIT_MARKER in names and MANIFEST_NAME not in names:
        return
    if MANIFEST_NAME not in names:
        raise LogitCacheError(
            f"{out} is not empty and holds no cache; give a new or empty directory for the converted cache "
            "(nothing there was touched)."
        )
    try:
        have = load_manifest(out)
    except LogitCacheError as e:
        raise LogitCacheError(f"{out} holds a manifest that does not load ({e}); give a new or empty directory.") from e
    origin = have.converted_from or {}
    if origin.get("shards_digest") != wanted.converted_from["shards_digest"]:
        what = "a convert of another cache (or of an older state of this one)" if origin else "a cache that convert did not write"
        raise LogitCacheError(
            f"{out} already holds {what}; give a new or empty directory for the converted cache "
            "(nothing there was touched)."
        )
    if have.codec != wanted.codec:
        raise LogitCacheError(
            f"{out} holds a convert of {src} to the {have.codec} codec; rerun with --codec {have.codec} to resume it, "
            "or give another directory for this codec."
        )


def _check_source(src: Path, m: Manifest, progress: Progress) -> None:
    """Verify's file checks (sizes, sha256, footers, counts, tokenizer) over the source, before
    anything is written; the values are checked as the rows are read."""
    report = verify_cache(src, check_values=False, on_shard=lambda done, total: progress("checking", done, total))
    if not report.ok:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise LogitCacheError(
            f"{src} is damaged: {report.problems[0]}{more}; nothing was converted. "
            f"See `logitcache verify {src}`, and rewrite the cache (rerun its teacher command) or restore it."
        )


# --- converting ------------------------------------------------------------------------------


def _copy_rows(src: Path, m: Manifest, writer: CacheWriter, progress: Progress) -> None:
    """Every source row not yet in ``writer``, in the source's order (so a resumed convert appends)."""
    done, total = 0, m.num_examples
    for rows in _source_shards(src, m, writer.done_ids):
        for row in rows:
            progress("converting", done, total)
            done += 1
            if row["id"] not in writer.done_ids:
                writer.write(row)
    progress("converting", done, total)


def _source_shards(src: Path, m: Manifest, done_ids: set[str]) -> Iterator[Iterator[Row]]:
    compact = m.codec == "compact"
    bound = id_bound(src, m)
    for info in m.shards:
        f = pq.ParquetFile(resolve_inside(src, info.path))
        ids = f.read(columns=["id"]).column("id").to_pylist()
        if all(rid in done_ids for rid in ids):  # written by the run this one resumes
            yield iter([{"id": rid} for rid in ids])
            continue
        yield _shard_rows(src, info.path, f, compact, bound)


def _shard_rows(src: Path, rel: str, f: pq.ParquetFile, compact: bool, bound: int) -> Iterator[Row]:
    id_table = shard_id_table(f) if compact else None
    for batch in f.iter_batches(batch_size=256):
        problems = value_problems(batch, compact=compact, max_id=0 if compact else bound)
        if problems:
            raise LogitCacheError(
                f"{src}: {rel}: {problems[0]}; the source is damaged, so the convert stopped (what it wrote is "
                f"kept as a partial cache). See `logitcache verify {src}`."
            )
        yield from decode_rows(batch, id_table, compact=compact)


# --- checking the result ---------------------------------------------------------------------


def _check_result(src: Path, out: Path, report: ConvertReport, progress: Progress) -> None:
    checked = verify_cache(out, on_shard=lambda done, total: progress("verifying", done, total))
    if not checked.ok:
        raise _mismatch(out, f"it fails verify: {checked.problems[0]}")
    source, converted = CacheReader(src), CacheReader(out)
    total = source.manifest.num_examples
    n = 0
    theirs = iter(converted)
    for a in source:
        progress("comparing", n, total)
        b = next(theirs, None)
        if b is None or b["id"] != a["id"]:
            raise _mismatch(out, f"its example {n} is {None if b is None else b['id']!r}, the source's {a['id']!r}")
        problem, diff = row_difference(a, b, report.codec)
        if problem is not None:
            raise _mismatch(out, f"example {a['id']!r}: {problem}")
        report.max_logprob_diff = max(report.max_logprob_diff, diff)
        n += 1
    if next(theirs, None) is not None:
        raise _mismatch(out, f"it holds more than the source's {total} examples")
    progress("comparing", n, total)
    m = converted.manifest
    report.shards, report.examples, report.tokens, report.bytes = len(m.shards), n, m.num_tokens, m.num_bytes
    report.skipped, report.source_bytes = len(m.skipped), source.manifest.num_bytes


def _mismatch(out: Path, what: str) -> LogitCacheError:
    return LogitCacheError(
        f"the converted cache {out} differs from its source ({what}); it is left partial. This is a bug in "
        "logitcache: please report it; delete the directory and keep using the source."
    )


def expected_v1_logprobs(x: np.ndarray) -> np.ndarray:
    """What a v1 cache stores for the decoded log-probs ``x``: the v1 writer's own float16."""
    return stored_float16(x)


def row_difference(a: Row, b: Row, codec: str) -> tuple[str | None, float]:
    """(what differs between the source row ``a`` and the converted row ``b``, or None; the largest
    top-k log-prob difference). See the module docstring for the relation of the log-probs."""
    if CHAT_COLUMN not in a and b.get(CHAT_COLUMN, 0) is None:  # a v1 row holds no chat: v2 writes null
        b = {k: v for k, v in b.items() if k != CHAT_COLUMN}
    if a.keys() != b.keys():
        return f"columns {sorted(a.keys() ^ b.keys())} are in one row only", 0.0
    for name in a:
        if name != "topk_logprobs" and not _same(a[name], b[name]):
            return f"{name} differs", 0.0
    x = np.asarray(a["topk_logprobs"], dtype=np.float64)
    y = np.asarray(b["topk_logprobs"], dtype=np.float64)
    if x.shape != y.shape:
        return f"topk_logprobs has shape {y.shape}, the source {x.shape}", 0.0
    diff = float(np.abs(x - y).max()) if x.size else 0.0
    if codec == "v1":
        if not np.array_equal(expected_v1_logprobs(a["topk_logprobs"]), np.asarray(b["topk_logprobs"])):
            return "topk_logprobs are not the float16 of the source's", diff
    elif diff > compact_codec.ERROR_BOUND_NATS:
        return f"topk_logprobs differ by {diff:.6f} nats, more than the codec's {compact_codec.ERROR_BOUND_NATS:.6f}", diff
    return None, diff


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _mark_complete(out: Path, report: ConvertReport) -> None:
    m = load_manifest(out)
    m.status = "complete"
    atomic_write_bytes(out / CARD_NAME, render_card(m).encode())
    m.save(out)  # last: from here on OUT is a complete cache


__all__ = ["CODEC_USES", "ConvertReport", "convert_cache", "expected_v1_logprobs", "row_difference", "source_digest"]
