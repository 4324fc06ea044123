"""Cache format v1: schema, manifest, shard writer and reader, verify. No torch here."""

from logitcache.storage.manifest import Manifest, ShardInfo, load_manifest
from logitcache.storage.reader import CacheReader, open_cache
from logitcache.storage.schema import FORMAT_VERSION, shard_schema
from logitcache.storage.verify import VerifyReport, verify_cache
from logitcache.storage.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "CacheReader",
    "CacheWriter",
    "Manifest",
    "ShardInfo",
    "VerifyReport",
    "load_manifest",
    "open_cache",
    "shard_schema",
    "verify_cache",
]
