"""manifest.json: what a cache holds, how it was made, and a hash of every shard."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from logitcache.errors import LogitCacheError
from logitcache.storage.fsutil import atomic_write_bytes
from logitcache.storage.schema import FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS

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
    "worker",
)


@dataclass
class ShardInfo:
    path: str  # relative to the cache root, e.g. "data/shard-00000.parquet"
    rows: int
    tokens: int
    bytes: int
    sha256: str
    truncated: int = 0

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
    # {"index": i, "count": n} for one worker's part of a cluster run (None: the whole dataset);
    # worker i takes the records whose index r has r % n == i.
    worker: dict[str, int] | None = None
    codec: str = "v1"
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
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in d
        ]
        if missing:
            raise LogitCacheError(f"{where}: missing fields {missing}; the cache is damaged or not a logitcache cache.")
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            kwargs["shards"] = [ShardInfo.from_dict(s) for s in d.get("shards", [])]
        except (KeyError, TypeError) as e:
            raise LogitCacheError(f"{where}: malformed shard entry ({e}); the cache is damaged.") from e
        return cls(**kwargs)

    def save(self, cache_dir: str | os.PathLike) -> None:
        """Rewrite manifest.json atomically (a reader sees the old or the new one, never half)."""
        self.updated_at = _now()
        data = json.dumps(self.to_dict(), indent=2, sort_keys=False).encode() + b"\n"
        atomic_write_bytes(Path(cache_dir) / MANIFEST_NAME, data)


def _jsonable(value: Any) -> Any:
    # Compare settings as JSON does, so a tuple read back as a list still matches.
    return json.loads(json.dumps(value, sort_keys=True))


def load_manifest(cache_dir: str | os.PathLike) -> Manifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise LogitCacheError(
            f"{cache_dir}: no {MANIFEST_NAME} here, so this is not a logitcache cache; "
            "point to the directory written by `logitcache teacher --out`."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LogitCacheError(f"{path}: not valid JSON ({e}); the manifest is damaged.") from e
    if not isinstance(data, dict):
        raise LogitCacheError(f"{path}: expected a JSON object; the manifest is damaged.")
    return Manifest.from_dict(data, where=str(path))
