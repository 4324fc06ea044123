"""Shard batches -> rows in either codec (v1, or compact with its footer id table).

Beside ``rows`` (the v1 layout) and ``codec`` (the compact one), so that neither of those two
needs the other's decoder: ``codec`` builds on ``rows``, and this module on both.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from logitcache.storage import codec
from logitcache.storage.rows import Row, batch_to_rows


def decode_rows(batch: pa.RecordBatch | pa.Table, id_table: np.ndarray | None = None,
                compact: bool | None = None) -> Iterator[Row]:
    """Rows of a shard's batch in either codec: v1, or compact (``id_table``: the shard footer's).

    ``compact``: the codec the manifest names, which wins over the shard's own metadata (so
    that a shard cannot make the reader decode it otherwise than ``verify`` does); None: the
    metadata says.
    """
    if compact is None:
        compact = (batch.schema.metadata or {}).get(codec.META_CODEC) == codec.CODEC_NAME.encode()
    if compact:
        yield from codec.decode_compact(batch, id_table=id_table)
        return
    for b in batch.to_batches() if isinstance(batch, pa.Table) else [batch]:
        yield from batch_to_rows(b)


def shard_id_table(parquet_file) -> np.ndarray | None:
    """The compact codec's id table from a shard's footer; None for a v1 shard."""
    meta = parquet_file.metadata.metadata or {}
    return codec.read_id_table(parquet_file) if codec.META_IDS in meta else None
