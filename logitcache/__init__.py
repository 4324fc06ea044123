"""logitcache: offline teacher-logit cache for LLM knowledge distillation, across tokenizers.

Stage 1 (`logitcache.pipeline.teacher`) runs a teacher once and writes its top-k
log-probabilities with character offsets to a cache (`logitcache.storage`); stage 2
(`logitcache.pipeline.student`) streams the cache into the training of students with any
tokenizer, with the losses of `logitcache.losses`.
"""

__version__ = "0.1.0"

from logitcache.errors import LogitCacheError
from logitcache.storage import CacheReader, CacheWriter, Manifest, open_cache, verify_cache

# Stage 2 needs torch; import it on first use so `import logitcache` (and the CLI's --help) stay fast.
_LAZY = {
    "LogitCacheDataset": "logitcache.pipeline.student.dataset",
    "StudentFeaturizer": "logitcache.pipeline.student.features",
    "KDCollator": "logitcache.pipeline.student.collate",
    "KDTrainer": "logitcache.pipeline.student.train",
    "uld_loss": "logitcache.losses",
    "kl_loss": "logitcache.losses",
    "multilevel_ot_loss": "logitcache.losses",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'logitcache' has no attribute {name!r}")


__all__ = [
    "CacheReader", "CacheWriter", "KDCollator", "KDTrainer", "LogitCacheDataset", "LogitCacheError", "Manifest",
    "StudentFeaturizer", "__version__", "kl_loss", "multilevel_ot_loss", "open_cache", "uld_loss", "verify_cache",
]
