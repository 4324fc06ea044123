"""What a shard must be to be read: one set of checks for `verify`, merge and the training reader.

The file (``shard_file_problem``: present, a regular file, its size, its sha256), its footer
(``footer_problem``: readable, the rows the manifest says, the columns and k of the manifest's
codec) and its values (``value_problems``, below). ``verify`` reports every problem it finds;
the training reader refuses the first (or skips the shard / row group with --skip-bad-shards).
The cache's tokenizer files (``tokenizer_problems``: each one's sha256, none unlisted or linked
from outside; ``tokenizer_check``: the same, read once per process while the files are unchanged).

Values: a damaged or hostile cache (or a teacher that overflowed in float16) can hold NaN, inf or
positive log-probabilities, or a top-k that is not sorted. ``verify`` reports them; the
training reader refuses the row group (or, with ``--skip-bad-shards``, passes over it), so
what one accepts the other accepts. These checks are vectorised over a whole record batch
and read the stored columns without decoding rows, in either codec: the compact codec stores
the top-1 log-prob and non-negative steps below it, so its rows are sorted by construction
and only the top-1 needs checking (benchmarks/finite_checks.py measures the cost beside decoding).
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from logitcache.errors import LogitCacheError
from logitcache.storage.codec import CODEC_NAME, META_CODEC
from logitcache.storage.fsutil import sha256_file
from logitcache.storage.manifest import Manifest, resolve_inside
from logitcache.storage.lists import flat_list_column
from logitcache.storage.samples import SAMPLE_COUNTS, SAMPLE_IDS, sample_problems
from logitcache.storage.schema import STATS_COLUMNS, TAU_COLUMN, WORD_START_COLUMN
from logitcache.storage.spans import CHAT_COLUMN, chat_problems, span_problems
from logitcache.storage.writer import TOKENIZER_DIR

# A row's text ends where its tokens end (stage 1 cuts a truncated text there). A tokenizer
# may leave a little trailing text uncovered (whitespace it normalises away); far more is a
# hostile row whose text would be tokenized whole by the student featurizer (a 300 MB text
# compresses to kilobytes). The check reads lengths only.
TEXT_SLACK_CHARS = 1 << 16

# An example id names a record (a hash of its text, or the dataset's own id): never this long.
# A longer one is a hostile shard's, whose id column would be copied into memory several times
# over (merge, verify); stage 1 refuses such an id in the data.
MAX_ID_BYTES = 1 << 16

# A log-probability may exceed 0 by rounding only: log(sum(exp)) >= the top-1 holds exactly,
# but top1 - (top1 + lse') can come out a few ulps above 0 in float32.
LOGPROB_TOL = 1e-5


# float16 bit patterns as int16 keys that order as the values do: x ^ 0x7FFF on negatives.
# Finite values map to [-31744, 31743]; -inf and +inf just outside; NaN beyond them.
_FP16_MIN_FINITE_KEY = -31744


def _fp16_keys(values: np.ndarray) -> np.ndarray:
    bits = values.view(np.uint16)
    return (bits ^ ((bits >> 15) * np.uint16(0x7FFF))).view(np.int16)


def _largest_fp16_at_most(value: float) -> np.float16:
    x = np.float16(value)
    return np.nextafter(x, np.float16(-np.inf)) if float(x) > value else x


_TOL_KEY = int(_fp16_keys(np.array([_largest_fp16_at_most(LOGPROB_TOL)], np.float16))[0])


def _suspect_rows(lp: np.ndarray) -> np.ndarray | None:
    """[M] the positions that may hold a bad top-k value (all bad ones among them), in one
    pass over integer keys; None where the values are not float16 (check them all).

    Why keys: float16 arithmetic in numpy is emulated and ran 2.6x the decoding time. A row
    whose keys do not rise is sorted, so its largest value is its first and its smallest its
    last: checking those two for range covers NaN and inf anywhere (a NaN or inf inside a row
    would make the keys rise, or push the last one out of range).
    """
    if lp.dtype != np.float16:
        return None
    key = _fp16_keys(np.ascontiguousarray(lp))
    return (key[:, 1:] > key[:, :-1]).any(axis=1) | (key[:, 0] > _TOL_KEY) | (key[:, -1] < _FP16_MIN_FINITE_KEY)


def is_compact(schema: pa.Schema) -> bool:
    return (schema.metadata or {}).get(META_CODEC) == CODEC_NAME.encode()


def _has_nulls(column: pa.Array | pa.ChunkedArray) -> bool:
    """Nulls at any depth (a list of fixed-size lists of floats has three levels)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for arr in chunks:
        while True:
            if arr.null_count:
                return True
            if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
                    or pa.types.is_fixed_size_list(arr.type)):
                break
            arr = arr.values
    return False


def value_problems(batch: pa.RecordBatch | pa.Table, compact: bool | None = None, max_id: int = 0) -> list[str]:
    """One message per kind of bad value in ``batch`` (a shard's rows, either codec); empty if none.

    Checked: no null anywhere, not even inside a list column (Arrow allows them; decoded, a
    null id becomes -2**31); no text far longer than its tokens. Per position: no negative
    top-k id (v1; the compact codec's ids come from its footer table, checked where it is read);
    the top-k log-probabilities are finite, at most 0 and sorted descending; the label log-prob
    is finite and at most 0; the log-normaliser and the optional columns (``lse_tau``, logit
    stats) are finite; format v2's target spans are sorted, apart and inside the text (and its
    ``messages`` column, null for a record that came from no chat, holds a JSON list). Each message counts the
    positions and names the first example id. ``compact``: the codec the manifest names (None:
    the batch's own metadata says). ``max_id``: ids must stay below it (v1; :func:`id_bound`;
    0: unchecked).
    """
    names = batch.schema.names
    out: list[str] = []
    if batch.num_rows == 0:
        return out
    # (the chat a record came from is null for every record that came from no chat)
    nulls = [name for name in names if name != CHAT_COLUMN and _has_nulls(batch.column(names.index(name)))]
    if nulls:
        return [f"null values in column(s) {', '.join(nulls)}, which the format never writes"]
    row_offsets: np.ndarray | None = None

    def report(bad_positions: np.ndarray, what: str, offsets: np.ndarray) -> None:
        if bad_positions.any():
            first = int(np.flatnonzero(bad_positions)[0])
            row = int(np.searchsorted(offsets, first, side="right")) - 1
            rid = batch.column(names.index("id"))[row].as_py()
            out.append(f"{int(bad_positions.sum())} positions {what} (first: id {rid!r})")

    def column(name: str) -> tuple[np.ndarray, np.ndarray]:
        return flat_list_column(batch.column(names.index(name)))  # a Table's columns are chunked

    ends, end_offsets = column("char_end")
    has_tokens = np.diff(end_offsets) > 0
    last_end = np.zeros(len(has_tokens), dtype=np.int64)
    last_end[has_tokens] = ends[end_offsets[1:][has_tokens] - 1]
    text = batch.column(names.index("text"))
    text_len = pc.utf8_length(text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text).to_numpy()
    too_long = text_len > last_end + TEXT_SLACK_CHARS
    if too_long.any():
        first = int(np.flatnonzero(too_long)[0])
        rid = batch.column(names.index("id"))[first].as_py()
        out.append(f"{int(too_long.sum())} rows whose text runs far past their last token (first: id {rid!r}, "
                   f"{int(text_len[first]):,} characters, tokens up to {int(last_end[first]):,})")
    if "top1_logprob" not in names and "topk_ids" not in names:
        pass  # a k = 0 cache (sampled targets only): no top-k columns
    elif is_compact(batch.schema) if compact is None else compact:
        top1, row_offsets = column("top1_logprob")
        report(~np.isfinite(top1), "with NaN/inf top-k log-probabilities", row_offsets)
        report(top1 > LOGPROB_TOL, "with a top-k log-probability above 0", row_offsets)
    else:
        ids, id_offsets = column("topk_ids")  # [M, k]
        if ids.size:
            report((ids < 0).any(axis=1), "with a negative top-k id", id_offsets)
            if max_id:
                report((ids >= max_id).any(axis=1), f"with a top-k id at or above the vocabulary's {max_id}", id_offsets)
        lp, row_offsets = column("topk_logprobs")  # [M, k], float16 in v1
        if lp.size:
            suspect = _suspect_rows(lp)
            if suspect is None or suspect.any():  # the exact checks, on the suspect positions only
                rows = slice(None) if suspect is None else suspect
                x = lp[rows].astype(np.float32)
                for bad, what in (
                    (~np.isfinite(x).all(axis=1), "with NaN/inf top-k log-probabilities"),
                    ((x > LOGPROB_TOL).any(axis=1), "with a top-k log-probability above 0"),
                    ((x[:, 1:] > x[:, :-1]).any(axis=1), "whose top-k is not sorted descending"),
                ):
                    full = np.zeros(len(lp), dtype=bool)
                    full[rows] = bad
                    report(full, what, row_offsets)
    label, offsets = column("label_logprob")
    report(~np.isfinite(label) | (label > LOGPROB_TOL), "with a label log-prob that is not finite or above 0", offsets)
    lse, offsets = column("logsumexp")
    report(~np.isfinite(lse), "with a non-finite logsumexp", offsets)
    for name in (TAU_COLUMN, *STATS_COLUMNS):
        if name in names:
            values, offsets = column(name)
            bad = ~np.isfinite(values)
            report(bad.any(axis=1) if bad.ndim == 2 else bad, f"with a non-finite {name}", offsets)
    if WORD_START_COLUMN in names:
        ws, offsets = column(WORD_START_COLUMN)
        report(~np.isfinite(ws) | (ws > LOGPROB_TOL), "with a word-start log-prob that is not finite or above 0", offsets)
    if SAMPLE_IDS in names and SAMPLE_COUNTS in names:
        # Ids in range, counts positive, distinct ascending ids; verify adds the sum to the manifest's N.
        out.extend(sample_problems(batch, 0, max_id)[0])
    out.extend(span_problems(batch))  # format v2: spans sorted, apart, inside the text
    out.extend(chat_problems(batch))
    return out


# A padded vocabulary (embedding rows past the tokenizer's, for faster matmuls) pads to a
# multiple of 64 or 128, a few thousand rows at most: never this much beyond the tokenizer.
PAD_SLACK_IDS = 1 << 14


def id_bound(root: Path, m: Manifest, trust_files: bool = True) -> int:
    """The bound that top-k ids must stay below (0: unknown, ids are only checked to be >= 0).

    The rule: an id is a row of the teacher's logits, so it is below the logits' width
    (``teacher.vocab_size``), which exceeds the tokenizer's size when the embedding is padded;
    that width may exceed the tokenizer by at most ``PAD_SLACK_IDS``. The tokenizer's size
    comes from its hashed files (``tokenizer.json``), not from the manifest, which an attacker
    could raise (ids near 2**31 would make MultiLevelOT allocate batch x max id).
    """
    return id_bound_for(m, tokenizer_json_size(root / TOKENIZER_DIR / "tokenizer.json") if trust_files else None)


def id_bound_for(m: Manifest, tokenizer_size: int | None) -> int:
    """:func:`id_bound` given the size of the cache's hashed tokenizer (None: its files are not
    sound, or define none; the manifest's ``tokenizer.vocab_size`` then stands in)."""
    size = tokenizer_size
    if size is None:
        size = int(m.tokenizer.get("vocab_size") or 0)
    width = m.teacher.get("vocab_size") if isinstance(m.teacher, dict) else None
    if isinstance(width, int) and size and size < width <= size + PAD_SLACK_IDS:
        return width
    return size


def tokenizer_json_size(path: Path) -> int | None:
    """1 + the largest id a ``tokenizer.json`` defines (its model's vocabulary and its added
    tokens); None if there is no such file or it does not read as one."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
        ids += [t["id"] for t in data.get("added_tokens") or []]
        return max(int(i) for i in ids) + 1 if ids else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def inside_or_noted(root: Path, rel: str, problems: list[str]) -> Path | None:
    """``root / rel`` if it stays inside the cache, else None with the problem noted."""
    try:
        return resolve_inside(root, rel)
    except LogitCacheError:
        problems.append(f"{rel}: leads outside the cache directory (a symlink or an escaping path); refused")
        return None


def tokenizer_problems(root: Path, m: Manifest) -> list[str]:
    """What is wrong with the cache's tokenizer/ files against the manifest's sha256 of each:
    missing, altered, unlisted (an extra file can change how the tokenizer loads), or linked
    from outside the cache. Empty when the cache has no tokenizer and records none."""
    files = m.tokenizer.get("files") or {}
    tok_dir = root / TOKENIZER_DIR
    if not tok_dir.exists() and not tok_dir.is_symlink():
        return [f"{TOKENIZER_DIR}/: missing"] if files else []
    problems: list[str] = []
    if inside_or_noted(root, f"{TOKENIZER_DIR}/", problems) is None:
        return problems
    if not files:
        return [f"{TOKENIZER_DIR}/: the manifest records no sha256 for these files, so they cannot be checked"]
    for name, digest in files.items():
        rel = f"{TOKENIZER_DIR}/{name}"
        path = inside_or_noted(root, rel, problems)
        if path is None:
            continue
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif not path.is_file():
            problems.append(f"{rel}: not a regular file (a FIFO, device or directory)")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest")
    for p in sorted(tok_dir.rglob("*")):
        name = p.relative_to(tok_dir).as_posix()
        if name not in files and (p.is_file() or p.is_symlink()):
            problems.append(f"{TOKENIZER_DIR}/{name}: not listed in the manifest (unknown file)")
    return problems


@dataclass(frozen=True)
class TokenizerCheck:
    """A cache's tokenizer files as read once: what is wrong with them against the manifest (the
    words of :func:`tokenizer_problems`; none: sound), and the size of the vocabulary their
    ``tokenizer.json`` defines (:func:`tokenizer_json_size`; None unless they are sound)."""

    problems: tuple[str, ...]
    size: int | None


# (resolved cache, the manifest's file hashes, the stat of every tokenizer file) -> its check. The
# training run builds up to three datasets (train, eval, the alignment check) and a featurizer
# over one cache, each of which needs the files hashed and tokenizer.json parsed: once per process
# serves them all. A file rewritten, replaced or added has another stat, so it is read again.
_TOKENIZER_CHECKS: dict[tuple, TokenizerCheck] = {}
_MAX_TOKENIZER_CHECKS = 64


def tokenizer_check(root: Path, m: Manifest) -> TokenizerCheck:
    """The cache's tokenizer files hashed against ``m`` and their vocabulary read, once per process
    while no file changes (``verify`` and merge hash every time: they call ``tokenizer_problems``)."""
    root = Path(root)
    key = (str(root.resolve()), json.dumps(m.tokenizer.get("files"), sort_keys=True), _tree_stat(root / TOKENIZER_DIR))
    check = _TOKENIZER_CHECKS.get(key)
    if check is None:
        problems = tuple(tokenizer_problems(root, m))
        size = None if problems else tokenizer_json_size(root / TOKENIZER_DIR / "tokenizer.json")
        if len(_TOKENIZER_CHECKS) >= _MAX_TOKENIZER_CHECKS:
            _TOKENIZER_CHECKS.clear()
        check = _TOKENIZER_CHECKS[key] = TokenizerCheck(problems, size)
    return check


def _tree_stat(directory: Path) -> tuple:
    """(path, size, mtime_ns, inode, mode) of a directory and everything below it, of each link
    and of what it points to (None where there is nothing): what tells a file changed."""
    try:
        paths = [directory, *sorted(directory.rglob("*"))] if directory.is_dir() else [directory]
    except OSError:
        paths = [directory]
    out = []
    for p in paths:
        for follow in (False, True):
            try:
                st = p.stat(follow_symlinks=follow)
                out.append((str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode))
            except OSError:
                out.append((str(p), None))
    return tuple(out)


# Shards whose bytes this process has hashed and found equal to the manifest, keyed by
# (absolute path, size, mtime_ns, sha256): a file replaced or rewritten is checked again.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def shard_file_problem(path: Path, size: int, sha256: str, *, hash_bytes: bool = True, remember: bool = True) -> str | None:
    """What is wrong with a shard's file against its manifest entry (missing, not a regular file,
    another size, another sha256 when ``hash_bytes``), or None. With ``remember`` (the training
    reader), a file hashed sound once by this process is not hashed again while its size and
    mtime stay the same; ``verify`` hashes every time."""
    try:
        st = path.stat()
    except OSError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end when read
        return "not a regular file (a FIFO, device or directory)"
    if st.st_size != size:
        return f"{st.st_size} bytes, the manifest says {size} (truncated or replaced)"
    if not hash_bytes:
        return None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, sha256)
    if remember and key in _VERIFIED:
        return None
    if sha256_file(path) != sha256:
        return "sha256 differs from the manifest (the shard is damaged or was modified)"
    if remember:
        _VERIFIED.add(key)
    return None


def footer_problem(path, rows: int, m: Manifest) -> tuple[list[int], str | None]:
    """The row counts of a shard's row groups from its footer, or what is wrong with it: an
    unreadable footer, another number of rows than the manifest's, columns other than the
    manifest's codec and k (for the compact codec, whose columns are the same for every k, the
    k its footer records). ``path``: the shard's file, or its footer already read
    (``pyarrow.parquet.FileMetaData``, from a remote cache's checked bytes)."""
    import pyarrow.parquet as pq

    try:
        meta = path if isinstance(path, pq.FileMetaData) else pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        return [], f"cannot read the shard's Parquet footer ({e})"
    counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    if not schema.equals(m.arrow_schema(), check_metadata=False):
        extras = ", ".join((["temperatures " + str(m.temperatures)] if m.temperatures else [])
                           + (["logit stats"] if m.logit_stats else []) + (["word-start log-probs"] if m.word_start else [])
                           + ([f"sample={m.sample}"] if m.sample else []))
        return [], (f"its columns differ from the manifest's (codec {m.codec}, k={m.k}"
                    f"{', ' + extras if extras else ''}): schema differs")
    if m.codec == "compact":
        from logitcache.storage.codec import META_K

        try:
            k = int((meta.metadata or {})[META_K])
        except (KeyError, ValueError):
            k = None
        if k != m.k:
            return [], f"the shard holds top-{k} entries, the manifest says k={m.k}"
    if sum(counts) != rows:
        return [], f"{sum(counts)} rows, the manifest says {rows}"
    return counts, None
