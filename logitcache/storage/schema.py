"""Cache format v1: the Parquet schema of one shard.

One row is one example. Per-token columns have one entry per teacher token
(``input_ids``, ``char_start``, ``char_end``); per-position columns have one entry
per prediction, i.e. ``len(input_ids) - 1`` entries: position ``p`` holds the
teacher's distribution over token ``p + 1``.
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1
# Readers accept exactly these; a newer writer bumps FORMAT_VERSION.
SUPPORTED_FORMAT_VERSIONS = (1,)

# Columns with one entry per teacher token.
TOKEN_COLUMNS = ("input_ids", "char_start", "char_end")
# Columns with one entry per prediction (len(input_ids) - 1).
POSITION_COLUMNS = ("topk_ids", "topk_logprobs", "label_logprob", "logsumexp")


def shard_schema(k: int) -> pa.Schema:
    """The Arrow schema of a v1 shard for a cache with top-``k`` entries per position."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("prompt_chars", pa.int32(), nullable=False),
            pa.field("truncated", pa.bool_(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("char_start", pa.list_(pa.int32()), nullable=False),
            pa.field("char_end", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16(), k)), nullable=False),
            pa.field("label_logprob", pa.list_(pa.float32()), nullable=False),
            pa.field("logsumexp", pa.list_(pa.float32()), nullable=False),
        ]
    )
