"""manifest.json: what a cache holds, how it was made, and a hash of every shard."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from logitcache.errors import LogitCacheError
from logitcache.storage.fsutil import atomic_write_bytes
from logitcache.storage.parts import merge_command, part_dirs, parts_summary
from logitcache.storage.schema import FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS, shard_schema

MANIFEST_NAME = "manifest.json"
CODECS = ("v1", "compact")  # v1: fp16 + int32 (DESIGN.md §2); compact: storage/codec.py

# The settings that decide a cache's content: a rerun must match all of them to resume.
# (limit, batch size, device and shard size change how the work is done, not what it yields.)
SETTINGS_KEYS = (
    "format_version",
    "codec",
    "teacher",
    "tokenizer",
    "k",
    "temperature",
    "mode",
    "generation",
    "dataset",
    "template",
    "max_length",
    "max_chars",
    "worker",
    "eos_id",
    "temperatures",
    "logit_stats",
    "word_start",
    "sample",
    "sample_proposal",
)


@dataclass
class ShardInfo:
    path: str  # relative to the cache root, e.g. "data/shard-00000.parquet"
    rows: int
    tokens: int
    bytes: int
    sha256: str
    truncated: int = 0
    # Each row group's and the footer's bytes as [offset, length, sha256] (storage/segments.py):
    # a remote reader checks every range it fetches. None in caches written before them.
    row_groups: list[list] | None = None
    footer: list | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardInfo":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """The cache's table of contents. See DESIGN.md §2."""

    teacher: dict[str, Any]  # name, revision, fingerprint, dtype
    tokenizer: dict[str, Any]  # name, sha256, files {name: sha256}, vocab_size, special_ids
    k: int
    mode: str  # "score" | "generate"
    dataset: dict[str, Any]  # source, split, fingerprint, num_records
    template: dict[str, Any]  # how a record became text
    temperature: float = 1.0
    generation: dict[str, Any] | None = None
    max_length: int | None = None
    # Records whose text was longer than this many characters were skipped before tokenizing
    # (reason "text over --max-chars"); None: no limit (and every cache made before the limit existed).
    max_chars: int | None = None
    # {"index": i, "count": n} for one worker's part of a cluster run (None: the whole dataset);
    # worker i takes the records whose index r has r % n == i.
    worker: dict[str, int] | None = None
    codec: str = "v1"
    # Optional content, all absent from caches written before issue 12 (read as these defaults):
    # the end-of-sequence id appended to every example that ended (None: none appended);
    eos_id: int | None = None
    # the extra temperatures of the per-position ``lse_tau`` column (1 is never listed);
    temperatures: list[float] = field(default_factory=list)
    # whether the rows hold ``logit_mean``, ``logit_std`` and ``lse_std``.
    logit_stats: bool = False
    # whether the rows hold ``word_start_logprob`` (ALM's debiasing).
    word_start: bool = False
    # Draws per position of the sampled targets (``sample_ids``/``sample_counts``, storage/samples.py;
    # 0: none), and how they were drawn: the proposal, its weights and the seed.
    sample: int = 0
    sample_proposal: dict[str, Any] | None = None
    # Written by `logitcache convert`: the source cache's codec, path, tool version and a digest of
    # its shards' sha256 (what tells a rerun that OUT is a partial convert of the same source).
    converted_from: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    tool_version: str = ""
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    status: str = "partial"  # "partial" until every input record has been processed
    skipped: dict[str, str] = field(default_factory=dict)  # example id -> reason
    shards: list[ShardInfo] = field(default_factory=list)

    # --- derived figures -------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def num_truncated(self) -> int:
        return sum(s.truncated for s in self.shards)

    @property
    def has_logsumexp(self) -> bool:
        """Whether the engine gave the raw logits' log-normaliser (vllm does not)."""
        return self.teacher.get("logsumexp", True) is not False

    @property
    def compact_encodings(self) -> int:
        """How many times the top-k log-probs went through the compact codec's quantisation since
        the teacher wrote them: 1 for a compact cache, 0 for v1, as ``convert`` counted for a
        converted one (a v1 copy of a compact cache keeps its error)."""
        counted = (self.converted_from or {}).get("compact_encodings")
        if type(counted) is int and counted >= 0:
            return counted
        return int(self.codec == "compact")

    def logprob_error_nats(self) -> float:
        """The most a stored top-k log-prob may differ from the teacher's beyond float16 rounding:
        the compact codec's bound once per quantisation it went through."""
        if not self.compact_encodings:
            return 0.0
        from logitcache.storage.codec import ERROR_BOUND_NATS

        return self.compact_encodings * ERROR_BOUND_NATS

    def column_options(self) -> dict[str, Any]:
        """Which optional columns this cache's shards hold, as the keyword arguments that the
        schema and table builders of either codec take (shard_schema, rows_to_table, ...)."""
        return {"n_temperatures": len(self.temperatures), "logit_stats": self.logit_stats,
                "word_start": self.word_start, "spans": self.has_spans, "sample": self.sample}

    def arrow_schema(self):
        """The Arrow schema of this cache's shards (codec, k and optional columns)."""
        if self.codec == "compact":
            from logitcache.storage.codec import compact_schema

            return compact_schema(**self.column_options(), topk=self.k > 0)
        return shard_schema(self.k, **self.column_options())

    @property
    def has_spans(self) -> bool:
        """Whether the shards hold format v2's target span columns (a v1 cache has prompt_chars alone)."""
        return self.format_version >= 2

    def settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SETTINGS_KEYS}

    def settings_differences(self, other: "Manifest") -> list[str]:
        """Names of the content-deciding settings in which ``other`` differs from ``self``."""
        mine, theirs = self.settings(), other.settings()
        return [key for key in SETTINGS_KEYS if _jsonable(mine[key]) != _jsonable(theirs[key])]

    # --- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "manifest") -> "Manifest":
        """Build from manifest.json's data, after :func:`validate_manifest_dict` accepts it."""
        validate_manifest_dict(d, where=where)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["shards"] = [ShardInfo.from_dict(s) for s in d.get("shards", [])]
        return cls(**kwargs)

    def save(self, cache_dir: str | os.PathLike) -> None:
        """Rewrite manifest.json atomically (a reader sees the old or the new one, never half)."""
        self.updated_at = _now()
        data = json.dumps(self.to_dict(), indent=2, sort_keys=False).encode() + b"\n"
        atomic_write_bytes(Path(cache_dir) / MANIFEST_NAME, data)


def _jsonable(value: Any) -> Any:
    # Compare settings as JSON does, so a tuple read back as a list still matches.
    return json.loads(json.dumps(value, sort_keys=True))


# A manifest lists its shards (about 200 bytes each) and skipped ids: 256 MiB is over a million
# shards. Bigger is a damaged or hostile file, not read into memory.
MAX_MANIFEST_BYTES = 256 << 20


def load_manifest(cache_dir: str | os.PathLike) -> Manifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        parts = part_dirs(Path(cache_dir))
        if parts:  # the --out of a split teacher run: each part is a cache, the whole is not yet
            raise LogitCacheError(
                f"{cache_dir} is the directory of a split teacher run, holding {parts_summary(parts)}, not one cache; "
                f"join the parts first with {merge_command(Path(cache_dir))} and use MERGED_DIR (or give one part)."
            )
        raise LogitCacheError(
            f"{cache_dir}: no {MANIFEST_NAME} here, so this is not a logitcache cache; "
            "point to the directory written by `logitcache teacher --out`."
        )
    check_manifest_size(path, path.stat().st_size)
    return parse_manifest(path.read_bytes(), str(path))


def check_manifest_size(where: str | os.PathLike, size: int) -> None:
    """Refuse a manifest.json too big to be one, before reading it (local or remote)."""
    if size > MAX_MANIFEST_BYTES:
        raise LogitCacheError(
            f"{where}: {size:,} bytes, more than any manifest ({MAX_MANIFEST_BYTES:,}); the manifest is damaged."
        )


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """A Manifest from manifest.json's bytes (read from disk or fetched), refused in one line naming
    ``where`` unless it is JSON that passes the schema."""
    path = where
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LogitCacheError(f"{path}: not valid JSON ({e}); the manifest is damaged.") from e
    except RecursionError as e:  # JSON nested thousands deep: never a manifest
        raise LogitCacheError(f"{path}: JSON nested too deeply to be a manifest; the manifest is damaged.") from e
    if not isinstance(data, dict):
        raise LogitCacheError(f"{path}: expected a JSON object; the manifest is damaged.")
    return Manifest.from_dict(data, where=where)


# --- the schema of manifest.json ------------------------------------------------------------
# Hand-written rather than a JSON-Schema document: the dataclasses above are the schema, and
# this checks every field's JSON type and range so that a damaged or hostile manifest is
# refused with the field's name before any of it is used.

# A shard lives directly in data/ under a plain file name: the writer's shard-NNNNN.parquet,
# merge's part-NNNNN-shard-NNNNN.parquet. No sub-directories, no "..", no absolute paths.
SHARD_PATH_PATTERN = re.compile(r"data/[A-Za-z0-9][A-Za-z0-9_.-]*\.parquet")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MODES = ("score", "generate")
STATUSES = ("partial", "complete")

_NUMBER = (int, float)
# field -> allowed JSON types (None: null allowed)
MANIFEST_FIELD_TYPES: dict[str, tuple] = {
    "format_version": (int,),
    "codec": (str,),
    "teacher": (dict,),
    "tokenizer": (dict,),
    "k": (int,),
    "mode": (str,),
    "dataset": (dict,),
    "template": (dict,),
    "temperature": _NUMBER,
    "generation": (dict, None),
    "max_length": (int, None),
    "max_chars": (int, None),
    "worker": (dict, None),
    "eos_id": (int, None),
    "temperatures": (list,),
    "logit_stats": (bool,),
    "word_start": (bool,),
    "sample": (int,),
    "sample_proposal": (dict, None),
    "converted_from": (dict, None),
    "tool_version": (str,),
    "created_at": (str,),
    "updated_at": (str,),
    "status": (str,),
    "skipped": (dict,),
    "shards": (list,),
}
_SHARD_FIELDS: dict[str, tuple] = {
    "path": (str,), "rows": (int,), "tokens": (int,), "bytes": (int,), "sha256": (str,), "truncated": (int,),
    "row_groups": (list, None), "footer": (list, None),
}
_SHARD_OPTIONAL = ("truncated", "row_groups", "footer")


def _type_ok(value: Any, allowed: tuple) -> bool:
    if value is None:
        return None in allowed
    if isinstance(value, bool):  # JSON true is not a number here
        return bool in allowed
    return any(t is not None and isinstance(value, t) for t in allowed)


def _type_names(allowed: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list",
             bool: "true/false", None: "null"}
    return " or ".join(names[t] for t in allowed if not (t is int and float in allowed))


def _bad(where: str, field_name: str, what: str) -> LogitCacheError:
    return LogitCacheError(
        f"{where}: field {field_name!r} {what}; the manifest is damaged or was edited "
        "(restore manifest.json, or rewrite the cache with `logitcache teacher`)."
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_manifest_dict(d: dict[str, Any], *, where: str = "manifest") -> None:
    """Refuse, naming the field, a manifest.json whose fields have the wrong JSON type or range.

    Checks the format_version and codec first (a newer cache gets "upgrade", not "damaged"),
    then every known field, then each shard entry. Unknown top-level keys are allowed (a
    newer writer of the same format version may add optional fields).
    """
    version = d.get("format_version")
    # type check: JSON true and 1.0 compare equal to 1 in Python
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        raise LogitCacheError(
            f"{where}: cache format_version {version!r} is not supported by this logitcache "
            f"(it reads {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
            "upgrade logitcache (pip install -U logitcache) or rewrite the cache."
        )
    if d.get("codec", "v1") not in CODECS:
        raise LogitCacheError(
            f"{where}: codec {d.get('codec')!r} is not known to this logitcache (it reads {', '.join(CODECS)}); "
            "upgrade logitcache (pip install -U logitcache)."
        )
    required = [
        f.name for f in dataclasses.fields(Manifest)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in d]
    if missing:
        raise LogitCacheError(f"{where}: missing fields {missing}; the cache is damaged or not a logitcache cache.")
    for name, allowed in MANIFEST_FIELD_TYPES.items():
        if name in d and not _type_ok(d[name], allowed):
            raise _bad(where, name, f"must be {_type_names(allowed)} (got {_short(d[name])})")
    _check_values(d, where)
    _check_tokenizer(d["tokenizer"], where)
    _check_shards(d.get("shards", []), where)


# No vocabulary holds a million tokens; a larger k is a damaged or hostile manifest (and would
# overflow Arrow's fixed-size list width).
MAX_K = 1 << 20
# The template records how a record became text: named fields, a separator, flags, a hash.
TEMPLATE_VALUE_TYPES = (str, bool, int)


def _check_values(d: dict[str, Any], where: str) -> None:
    if not 0 <= d["k"] <= MAX_K:
        raise _bad(where, "k", f"must be between 0 and {MAX_K:,} (got {_short(d['k'])})")
    from logitcache.storage.samples import MAX_SAMPLE

    if not 0 <= d.get("sample", 0) <= MAX_SAMPLE:
        raise _bad(where, "sample", f"must be between 0 and {MAX_SAMPLE} draws per position (got {_short(d['sample'])})")
    if d["k"] == 0 and not d.get("sample", 0):
        raise _bad(where, "k", "is 0 with no sampled targets (sample 0): the cache would hold no teacher distribution")
    for key, value in d["template"].items():
        if not isinstance(key, str) or not isinstance(value, TEMPLATE_VALUE_TYPES):
            raise _bad(where, f"template.{key}", f"must be text, a number or true/false (got {_short(value)})")
    if not isinstance(d["template"].get("kind", ""), str):
        raise _bad(where, "template.kind", "must be text")
    if d["mode"] not in MODES:
        raise _bad(where, "mode", f"must be one of {', '.join(MODES)} (got {_short(d['mode'])})")
    if d.get("status", "partial") not in STATUSES:
        raise _bad(where, "status", f"must be one of {', '.join(STATUSES)} (got {_short(d['status'])})")
    if d.get("max_length") is not None and d["max_length"] < 1:
        raise _bad(where, "max_length", f"must be positive or null (got {d['max_length']})")
    records = d["dataset"].get("num_records")
    if records is not None and not (_type_ok(records, (int,)) and records >= 0):
        raise _bad(where, "dataset.num_records", f"must be a count of records (0 or more) or null (got {_short(records)})")
    if d.get("max_chars") is not None and d["max_chars"] < 1:
        raise _bad(where, "max_chars", f"must be positive or null (got {d['max_chars']})")
    worker = d.get("worker")
    if worker is not None:
        index, count = worker.get("index"), worker.get("count")
        if not (_type_ok(index, (int,)) and _type_ok(count, (int,)) and 0 <= index < count):
            raise _bad(where, "worker", f"must be {{index, count}} with 0 <= index < count (got {_short(worker)})")
    if d.get("eos_id") is not None and d["eos_id"] < 0:
        raise _bad(where, "eos_id", f"must be a token id (0 or more) or null (got {d['eos_id']})")
    taus = d.get("temperatures", [])
    if not all(_type_ok(t, _NUMBER) and math.isfinite(t) and t > 0 and t != 1 for t in taus) or len(set(taus)) != len(taus):
        raise _bad(where, "temperatures", f"must list distinct positive temperatures other than 1 (got {_short(taus)})")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in d.get("skipped", {}).items()):
        raise _bad(where, "skipped", "must map example ids to reason strings")


def _check_tokenizer(tok: dict[str, Any], where: str) -> None:
    if "vocab_size" in tok and not _type_ok(tok["vocab_size"], (int,)):
        raise _bad(where, "tokenizer.vocab_size", f"must be an integer (got {_short(tok['vocab_size'])})")
    files = tok.get("files")
    if files is None:
        return
    if not isinstance(files, dict):
        raise _bad(where, "tokenizer.files", "must map file names to sha256 digests")
    for name, digest in files.items():
        if not _is_plain_relative(name):
            raise _bad(where, "tokenizer.files", f"names {name!r}, a path outside tokenizer/")
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise _bad(where, f"tokenizer.files[{name!r}]", f"must be a sha256 hex digest (got {_short(digest)})")


def _check_shards(shards: list[Any], where: str) -> None:
    seen: set[str] = set()
    for i, entry in enumerate(shards):
        name = f"shards[{i}]"
        if not isinstance(entry, dict):
            raise _bad(where, name, f"must be an object (got {_short(entry)})")
        missing = [k for k in _SHARD_FIELDS if k not in entry and k not in _SHARD_OPTIONAL]
        if missing:
            raise _bad(where, name, f"lacks {', '.join(missing)}")
        for key, allowed in _SHARD_FIELDS.items():
            if key in entry and not _type_ok(entry[key], allowed):
                raise _bad(where, f"{name}.{key}", f"must be {_type_names(allowed)} (got {_short(entry[key])})")
            if key in entry and allowed == (int,) and entry[key] < 0:
                raise _bad(where, f"{name}.{key}", f"must be 0 or more (got {entry[key]})")
        path = entry["path"]
        if not SHARD_PATH_PATTERN.fullmatch(path):
            raise _bad(
                where, f"{name}.path",
                f"is {path!r}, not a shard file directly in data/ (like data/shard-00000.parquet); refusing a path "
                "that could point outside the cache",
            )
        if path in seen:
            raise _bad(where, f"{name}.path", f"lists {path!r} a second time")
        seen.add(path)
        if not _SHA256.fullmatch(entry["sha256"]):
            raise _bad(where, f"{name}.sha256", f"must be a sha256 hex digest (got {_short(entry['sha256'])})")
        if entry.get("row_groups") is not None:
            from logitcache.storage.segments import segments_problem

            problem = segments_problem(entry["row_groups"], entry.get("footer"))
            if problem:
                raise _bad(where, f"{name}.row_groups", problem)


def _is_plain_relative(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts


def resolve_inside(cache_dir: str | os.PathLike, rel: str) -> Path:
    """``cache_dir / rel``, refused unless it stays inside ``cache_dir`` once symlinks are followed.

    Every path a manifest names (shards, tokenizer files) goes through here, in the reader, in
    verify and in the training dataset: a hostile or damaged cache must not make us read
    ``/etc/passwd`` through ``../``, an absolute path, or a symlink pointing out.
    """
    root = Path(cache_dir)
    if not _is_plain_relative(rel):
        raise LogitCacheError(
            f"{root}: the manifest names {rel!r}, a path outside the cache directory; refusing to read it "
            "(the manifest is damaged or hostile)."
        )
    path = root / rel
    try:
        target = path.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13, OSError after)
        raise LogitCacheError(f"{path}: a symlink loop; refusing to read it (the cache is damaged or hostile).") from e
    if not target.is_relative_to(root.resolve()):
        raise LogitCacheError(
            f"{path}: links to {target}, outside the cache directory; refusing to read it "
            "(copy the file into the cache instead of linking it)."
        )
    return path
