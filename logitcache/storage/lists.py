"""Arrow list columns as numpy: the values of every row at once, and offsets into them.

What the readers, verify and the codecs decode list columns with (pure numpy/pyarrow).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def flat_list_column(col: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """The values of a list column as one numpy array, and offsets into it (starting at 0).

    A list of fixed-size lists comes back as a [total, k] matrix. Slices (and chunked columns) are honoured:
    ``offsets`` of a sliced array index into the whole child, ``flatten()`` of a
    fixed-size list honours the child's own offset.
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy()
    child = col.values
    if pa.types.is_fixed_size_list(child.type):
        values = child.flatten().to_numpy(zero_copy_only=False).reshape(-1, child.type.list_size)
    else:
        values = child.to_numpy(zero_copy_only=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def nested_parts(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, per-position offsets into them, per-row offsets into the positions), from 0;
    slices honoured."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    outer = col.offsets.to_numpy().astype(np.int64)
    positions = col.values
    inner = positions.offsets.to_numpy().astype(np.int64)[outer[0] : outer[-1] + 1]
    values = positions.values.to_numpy(zero_copy_only=False)[inner[0] : inner[-1]]
    return values, inner - inner[0], outer - outer[0]
