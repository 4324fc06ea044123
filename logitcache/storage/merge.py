"""merge: join the parts written by the workers of a cluster run into one cache.

    report = merge_caches("out/cache", ["out/parts/part-00000-of-00002", "out/parts/part-00001-of-00002"])

Part i of n (``logitcache teacher --num-parts n --part-index i``) writes a complete
cache of its own, holding the records whose dataset index r has r % n == i. Merging checks
that the parts belong together (same settings, every worker once, every example once, every
shard intact: a regular file of its size and sha256, with the footer verify and the training
reader expect), then hard-links (or copies) their shards into ``out/data/`` without rewriting
a byte of Parquet, and writes the merged manifest last: until it exists, ``out`` is not a
cache, and a merge that fails midway removes what it made.

Rows come in worker order (all of part 0, then part 1, ...), not in dataset order.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from logitcache.errors import LogitCacheError
from logitcache.storage.card import render_card
from logitcache.storage.decode import shard_id_table
from logitcache.storage.fsutil import atomic_write_bytes, copy_files, crash_point, fsync_dir, publish
from logitcache.storage.integrity import MAX_ID_BYTES, footer_problem, shard_file_problem, tokenizer_problems
from logitcache.storage.lock import LOCK_NAME, CacheLock
from logitcache.storage.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest, resolve_inside
from logitcache.storage.marker import clear_marked, write_marker
from logitcache.storage.parts import PART_GLOB, part_name
from logitcache.storage.writer import CARD_NAME, DATA_DIR, TMP_PREFIX, TOKENIZER_DIR, layout_names

# Hashing is bound by disk and sha256 (hashlib releases the GIL): several shards at once
# keep a parallel filesystem busy, with 1 MiB of memory each.
_HASH_THREADS = min(8, os.cpu_count() or 1)
# os.link fails with these where a hard link cannot be made (another filesystem, one without
# hard links, a file we may read but not link): copy instead.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass
class MergeReport:
    out: Path
    parts: int = 0
    shards: int = 0
    examples: int = 0
    skipped: int = 0
    tokens: int = 0
    bytes: int = 0
    linked: int = 0  # shards hard-linked from their part (no extra disk space)
    copied: int = 0  # shards copied (another filesystem, or link=False)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"merged {self.parts} parts into {self.out}: {self.shards} shards, {self.examples} examples "
            f"({self.skipped} skipped), {self.tokens} tokens, {self.bytes / 2**20:.1f} MiB; "
            f"{self.linked} shards hard-linked, {self.copied} copied"
        )


@dataclass
class _Part:
    path: Path
    manifest: Manifest
    index: int
    count: int


def expand_parts(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each path as given if it is a cache, else the ``part-*`` caches inside it (the --out of a cluster run)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / MANIFEST_NAME).is_file():
            out.append(p)
            continue
        found = sorted(d for d in p.glob(PART_GLOB) if d.is_dir()) if p.is_dir() else []
        if not found:
            raise LogitCacheError(
                f"{p} holds neither a {MANIFEST_NAME} nor {PART_GLOB} directories; give the worker parts "
                "or the --out directory of the `logitcache teacher --num-parts N` run that holds them."
            )
        out.extend(found)
    return out


def merge_caches(
    out: str | os.PathLike,
    parts: Sequence[str | os.PathLike],
    *,
    link: bool = True,
    verify: bool = True,
    on_shard: Callable[[str, int, int], None] | None = None,
) -> MergeReport:
    """Join the worker parts of one cluster run into the cache ``out``.

    Args:
        out: the merged cache; must not exist or be an empty directory.
        parts: one cache directory per worker, in any order (see ``expand_parts``).
        link: hard-link the shards (falls back to copying across filesystems); False copies.
        verify: check every shard's sha256 (and part 0's tokenizer files) against the parts'
            manifests before linking anything. Sizes, footers, row counts and ids are always checked.
        on_shard: called as ``on_shard(stage, done, total)`` with the shards done so far in each
            long stage (``hashing``, ``reading ids``, ``placing``): progress of a merge of big parts.

    Raises ``LogitCacheError`` naming the problem and the fix when the parts do not make one
    whole cache; ``out`` then holds no manifest. Holds the lock on ``out`` throughout: a second
    merge (or a teacher run) into the same directory refuses.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LogitCacheError(f"{out} is a file; give a new or empty directory for the merged cache.")
    _check_out_outside_parts(out, parts)
    with CacheLock(out, purpose="merging into"):
        return _merge_locked(out, parts, link, verify, on_shard or _nothing)


def _nothing(stage: str, done: int, total: int) -> None:
    pass


def _merge_locked(out: Path, parts: Sequence[str | os.PathLike], link: bool, verify: bool,
                  on_shard: Callable[[str, int, int], None]) -> MergeReport:
    _check_out(out)
    if not parts:
        raise LogitCacheError("no parts to merge; give the part-* directories written by the workers.")
    loaded = [_load_part(Path(p)) for p in parts]
    loaded.sort(key=lambda part: part.index)
    _check_settings(loaded)
    _check_workers(loaded)
    _check_files(loaded)
    report = MergeReport(out=out, parts=len(loaded))
    _check_tokenizer(loaded[0])  # a few small files: checked even without --verify
    if verify:
        _verify_parts(loaded, on_shard)
    _check_examples(loaded, report, on_shard)
    _write(out, loaded, link, report, on_shard)
    return report


# --- checks ------------------------------------------------------------------------------


def _check_out_outside_parts(out: Path, parts: Sequence[str | os.PathLike]) -> None:
    # Checked before the lock creates ``out``: writing the merged cache into a part would
    # plant files in a cache we are about to read (and hard-link from).
    where = out.resolve()
    for part in parts:
        root = Path(part).resolve()
        if where == root or where.is_relative_to(root):
            raise LogitCacheError(
                f"{out} is inside the part {part}; give an output directory outside the parts for the merged cache."
            )


MERGE_MARKER = ".merging"  # present while a merge writes ``out``; lists what it may leave there


def _check_out(out: Path) -> None:
    if (out / MERGE_MARKER).exists():  # a merge killed half-way: start over, removing only what it made
        clear_marked(out, MERGE_MARKER, keep=(LOCK_NAME,))
        (out / MERGE_MARKER).unlink()
    if any(p.name != LOCK_NAME for p in out.iterdir()):  # the lock made ``out`` if it was missing
        raise LogitCacheError(f"{out} is not empty; give a new or empty directory for the merged cache.")


def _load_part(path: Path) -> _Part:
    m = load_manifest(path)
    w = m.worker
    if not (isinstance(w, dict) and type(w.get("index")) is int and type(w.get("count")) is int):
        raise LogitCacheError(
            f"{path} is not a part of a split run (its manifest has no worker entry); merge joins the "
            "part-* directories written by `logitcache teacher --num-parts N --part-index I`."
        )
    index, count = w["index"], w["count"]
    if not 0 <= index < count:
        raise LogitCacheError(f"{path}: part index {index} is outside 0..{count - 1}; the manifest is damaged.")
    if m.status != "complete":
        raise LogitCacheError(
            f"part {path} is partial: rerun its teacher command "
            f"(--num-parts {count} --part-index {index}); it resumes where it stopped."
        )
    return _Part(path, m, index, count)


def _check_settings(parts: list[_Part]) -> None:
    ref = parts[0]
    versions = {part.manifest.format_version for part in parts}
    if len(versions) > 1:
        # Shards of two formats in one cache would give one manifest a lie: refuse, and say how to align them.
        old = next(part for part in parts if part.manifest.format_version == min(versions))
        raise LogitCacheError(
            f"parts mix cache format versions {sorted(versions)} ({old.path} is v{min(versions)}); "
            f"rewrite the older parts in format v{max(versions)} with `logitcache convert PART NEW_DIR "
            f"--codec {old.manifest.codec}`, then merge those."
        )
    for part in parts[1:]:
        keys = [key for key in ref.manifest.settings_differences(part.manifest) if key != "worker"]
        if keys:
            detail = "; ".join(_difference(key, ref, part) for key in keys)
            raise LogitCacheError(
                f"parts {ref.path} and {part.path} were made with different settings ({detail}); "
                "merge only the parts of one run (remove an odd part and rerun its worker with the others' command)."
            )


def _difference(key: str, a: _Part, b: _Part) -> str:
    va, vb = _plain(getattr(a.manifest, key)), _plain(getattr(b.manifest, key))
    if isinstance(va, dict) and isinstance(vb, dict):
        subs = sorted(s for s in va.keys() | vb.keys() if va.get(s) != vb.get(s))
        return "; ".join(f"{key}.{s}: {_short(va.get(s))} vs {_short(vb.get(s))}" for s in subs)
    return f"{key}: {_short(va)} vs {_short(vb)}"


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_workers(parts: list[_Part]) -> None:
    ref = parts[0]
    for part in parts[1:]:
        if part.count != ref.count:
            raise LogitCacheError(
                f"parts {ref.path} (of {ref.count} parts) and {part.path} (of {part.count} parts) come from "
                "different splits (--num-parts); merge the parts of one run (move the other run's parts away)."
            )
    for a, b in itertools.pairwise(parts):  # sorted by index: a duplicate sits next to its twin
        if a.index == b.index:
            if a.path.resolve() == b.path.resolve():
                raise LogitCacheError(f"part {a.path} is given twice; give each part once.")
            raise LogitCacheError(
                f"parts {a.path} and {b.path} are both part {a.index} of {a.count}; keep one of them."
            )
    if ref.count != len(parts):
        # Found by walking the indices, never by building range(count): a hostile manifest may
        # claim a billion workers, and the message must not list (or allocate) them all.
        have = {p.index for p in parts}  # distinct, each in [0, count): the walk meets 20 gaps soon
        missing = list(itertools.islice((i for i in range(ref.count) if i not in have), 20))
        n_missing = ref.count - len(parts)
        listed = ", ".join(map(str, missing)) + (f" ... ({n_missing:,} in all)" if n_missing > len(missing) else "")
        raise LogitCacheError(
            f"part{'s' if n_missing > 1 else ''} {listed} of {ref.count} missing (no "
            f"{', '.join(part_name(i, ref.count) for i in missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            f"run {'them' if n_missing > 1 else 'it'} (--num-parts {ref.count} --part-index I, or resubmit the "
            "whole Slurm array: finished parts return at once) and merge again."
        )


def _damaged(part: _Part, what: str) -> LogitCacheError:
    return LogitCacheError(
        f"part {part.path} is damaged ({what}): remove it and rerun its teacher command (--part-index {part.index})."
    )


def _check_files(parts: list[_Part]) -> None:
    """Every listed shard is there, a regular file of its listed size (cheap; ``verify`` also hashes them)."""
    for part in parts:
        for info in part.manifest.shards:
            problem = shard_file_problem(resolve_inside(part.path, info.path), info.bytes, info.sha256, hash_bytes=False)
            if problem is not None:
                raise _damaged(part, f"{info.path}: {problem}")


def _check_examples(parts: list[_Part], report: MergeReport, on_shard: Callable[[str, int, int], None]) -> None:
    """Every example in exactly one part; all of the dataset's records accounted for."""
    owner: dict[str, Path] = {}

    def claim(rid: str, part: _Part) -> None:
        other = owner.get(rid)
        if other == part.path:
            raise _damaged(part, f"example id {_short_id(rid)} is in it twice")
        if other is not None:
            raise LogitCacheError(
                f"example id {_short_id(rid)} is in both {other} and {part.path}: the parts overlap, so they are "
                "not one split of one dataset; merge the parts of one run (and give every record a unique id)."
            )
        owner[rid] = part.path

    counts: list[int] = []
    done, total = 0, sum(len(part.manifest.shards) for part in parts)
    for part in parts:
        n = 0
        for info in part.manifest.shards:
            on_shard("reading ids", done, total)
            done += 1
            ids = _shard_ids(part, info)
            for rid in ids:
                claim(rid, part)
            n += len(ids)
        for rid in part.manifest.skipped:
            claim(rid, part)
        report.examples += n
        report.skipped += len(part.manifest.skipped)
        counts.append(n + len(part.manifest.skipped))

    total = sum(counts)
    expected = parts[0].manifest.dataset.get("num_records")
    if expected is None:
        msg = (
            "the parts' manifests do not record the dataset's size (dataset.num_records), so merge cannot "
            "check that no example is missing; they were written by an older logitcache."
        )
        report.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)
    elif total != expected:
        n = parts[0].count
        short = [
            f"{part_name(p.index, n)} has {c} of {len(range(p.index, expected, n))}"
            for p, c in zip(parts, counts)
            if c != len(range(p.index, expected, n))
        ]
        raise LogitCacheError(
            f"the parts hold {total} examples (rows + skipped) but the dataset has {expected} records"
            f"{' (' + ', '.join(short) + ')' if short else ''}; remove the parts that are off and rerun "
            "their teacher commands."
        )


def _shard_ids(part: _Part, info: ShardInfo) -> list[str]:
    """The example ids of one of ``part``'s shards, read once its footer is what the part's manifest
    says (the footer check of verify and the training reader, in the same words): the columns of
    its codec and k, its rows; a compact shard's id table inflates within bounds. A shard merged
    on looks (sizes, hashes and ids) alone could still be one that every reader refuses."""
    path = resolve_inside(part.path, info.path)
    problem = footer_problem(path, info.rows, part.manifest)[1]
    if problem is not None:
        raise _damaged(part, f"{info.path}: {problem}")
    try:
        f = pq.ParquetFile(path)
        if part.manifest.codec == "compact":  # decoded as readers decode it: a zlib bomb stops at its bound
            shard_id_table(f)
        ids = f.read(columns=["id"]).column("id")
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _damaged(part, f"{info.path} is unreadable: {_clip(' '.join(str(e).split()), 300)}") from e
    longest = pc.max(pc.binary_length(ids)).as_py() or 0
    if longest > MAX_ID_BYTES:  # checked on the Arrow column, before each id becomes a Python string
        raise _damaged(part, f"{info.path} holds an example id of {longest:,} bytes, longer than any id ({MAX_ID_BYTES:,})")
    return ids.to_pylist()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_id(rid: str) -> str:
    return repr(_clip(rid, 80))


def _verify_parts(parts: list[_Part], on_shard: Callable[[str, int, int], None]) -> None:
    """Every shard's sha256.

    Only hashes: ``verify_cache(check_values=False)`` would also decode every column (14x
    slower than hashing on a k=64 part); ``logitcache verify`` of the merged cache does that once.
    """
    jobs = [(part, info) for part in parts for info in part.manifest.shards]
    problems = []
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        on_shard("hashing", 0, len(jobs))
        for problem in pool.map(
            lambda job: shard_file_problem(resolve_inside(job[0].path, job[1].path), job[1].bytes, job[1].sha256,
                                           remember=False),
            jobs,
        ):
            problems.append(problem)
            on_shard("hashing", len(problems), len(jobs))
    for (part, info), problem in zip(jobs, problems):
        if problem is not None:
            raise _damaged(part, f"{info.path}: {problem}")


def _check_tokenizer(part: _Part) -> None:
    """The tokenizer files the merged cache copies from part 0: hashed, listed, none linked from outside."""
    problems = tokenizer_problems(part.path, part.manifest)
    if problems:
        raise _damaged(part, problems[0])


# --- writing -----------------------------------------------------------------------------


def _write(out: Path, parts: list[_Part], link: bool, report: MergeReport,
           on_shard: Callable[[str, int, int], None]) -> None:
    total = sum(len(part.manifest.shards) for part in parts)
    try:
        write_marker(out, MERGE_MARKER, layout_names())
        (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
        shards: list[ShardInfo] = []
        for part in parts:
            for j, info in enumerate(part.manifest.shards):
                on_shard("placing", len(shards), total)
                rel = f"{DATA_DIR}/part-{part.index:05d}-shard-{j:05d}.parquet"
                linked = _place(resolve_inside(part.path, info.path), out / rel, link)
                report.linked += linked
                report.copied += not linked
                shards.append(dataclasses.replace(info, path=rel))
        fsync_dir(out / DATA_DIR)
        crash_point("merge.placed")
        tok = parts[0].path / TOKENIZER_DIR
        if tok.is_dir():  # the same files in every part: the settings check compared their hashes
            copy_files(tok, out / TOKENIZER_DIR)
        skipped: dict[str, str] = {}
        for part in parts:
            skipped.update(part.manifest.skipped)
        merged = dataclasses.replace(
            parts[0].manifest,
            worker=None,
            status="complete",
            shards=shards,
            skipped=skipped,
            created_at=min((p.manifest.created_at for p in parts), key=_when),
        )
        atomic_write_bytes(out / CARD_NAME, render_card(merged).encode())
        merged.save(out)  # from here on ``out`` is a cache
        crash_point("merge.saved")
        (out / MERGE_MARKER).unlink()
    except BaseException as e:
        _remove_output(out)
        if isinstance(e, OSError):
            raise LogitCacheError(
                f"could not write the merged cache to {out} ({e}); nothing was kept there. "
                "Fix the cause (disk space, permissions) and run the merge again."
            ) from e
        raise
    report.shards = len(shards)
    report.tokens = sum(s.tokens for s in shards)
    report.bytes = sum(s.bytes for s in shards)


def _place(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link ``src`` to ``dst``, or copy it where that is not possible. Returns whether it linked."""
    if link:
        try:
            os.link(src, dst)
            return True
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
    tmp = dst.with_name(TMP_PREFIX + dst.name)
    shutil.copyfile(src, tmp)
    publish(tmp, dst)
    return False


def _when(stamp: str) -> Any:
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):  # a hand-edited stamp: order it after the readable ones
        return float("inf")


def _remove_output(out: Path) -> None:
    """Undo a failed merge: ``out`` was absent or empty before, so all it holds now is ours.
    (Directories the merge created go when its lock is released.)"""
    for p in out.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass


__all__ = ["MergeReport", "expand_parts", "merge_caches"]
