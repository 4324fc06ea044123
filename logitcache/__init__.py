"""logitcache: offline teacher-logit cache for LLM knowledge distillation, across tokenizers.

Stage 1 (`logitcache.pipeline.teacher`) runs a teacher once and writes its top-k
log-probabilities with character offsets to a cache (`logitcache.storage`); stage 2
streams the cache into the training of students with any tokenizer.
"""

__version__ = "0.1.0"

from logitcache.errors import LogitCacheError
from logitcache.storage import CacheReader, CacheWriter, Manifest, open_cache, verify_cache

__all__ = ["CacheReader", "CacheWriter", "LogitCacheError", "Manifest", "__version__", "open_cache", "verify_cache"]
