"""Cache format v2 (and v1): the Parquet schema of one shard.

One row is one example. Per-token columns have one entry per teacher token
(``input_ids``, ``char_start``, ``char_end``); per-position columns have one entry
per prediction, i.e. ``len(input_ids) - 1`` entries: position ``p`` holds the
teacher's distribution over token ``p + 1``.

Optional per-position columns, after the v1 columns, present when the manifest says so
(issue 12; the format version stays 1, a reader of an older cache finds none of them):

* ``lse_tau`` list<fixed_size_list<float32, M>>: ``logsumexp(logits / tau)`` for each of the
  manifest's M ``temperatures``;
* ``logit_mean``, ``logit_std``, ``lse_std`` list<float32> (manifest ``logit_stats``): the
  logits' mean and unbiased std over the vocabulary, and ``logsumexp(logits / (std + 1e-4))``;
* ``word_start_logprob`` list<float32> (manifest ``word_start``): the log of the teacher's
  probability that the next token starts a word (its mass on tokens that begin with a space,
  tab or newline byte, and on special tokens), for ALM's chunk debiasing;
* ``sample_ids`` list<list<int32>>, ``sample_counts`` list<list<uint8>> (manifest ``sample``: N):
  N draws from the teacher's distribution as distinct ids and counts (storage/samples.py).

A cache with ``k`` 0 (sampled targets only) has no ``topk_ids``/``topk_logprobs`` columns.

Format v2 (issue 15) adds ``target_start`` and ``target_end`` list<int32> after ``truncated``:
the [start, end) character ranges of ``text`` that are targets (storage/spans.py), which
generalise v1's ``prompt_chars`` to several spans (the assistant turns of a chat). v2 keeps
``prompt_chars``, written as the first span's start (``len(text)`` with no span), so a tool that
reads only v1 columns keeps working. A v1 shard has no span columns; readers give its rows
the one span ``(prompt_chars, len(text))``.
"""

from __future__ import annotations

import pyarrow as pa

from logitcache.storage.samples import sample_fields
from logitcache.storage.spans import CHAT_COLUMN, SPAN_COLUMNS

FORMAT_VERSION = 2
# Readers accept exactly these; a newer writer bumps FORMAT_VERSION.
SUPPORTED_FORMAT_VERSIONS = (1, 2)

# Columns with one entry per teacher token.
TOKEN_COLUMNS = ("input_ids", "char_start", "char_end")
# Columns with one entry per prediction (len(input_ids) - 1).
POSITION_COLUMNS = ("topk_ids", "topk_logprobs", "label_logprob", "logsumexp")
# Optional per-position columns (stored as they are in both codecs).
TAU_COLUMN = "lse_tau"
STATS_COLUMNS = ("logit_mean", "logit_std", "lse_std")
WORD_START_COLUMN = "word_start_logprob"
EXTRA_COLUMNS = (TAU_COLUMN, *STATS_COLUMNS, WORD_START_COLUMN)
# The optional columns with one float per position.
FLAT_EXTRA_COLUMNS = (*STATS_COLUMNS, WORD_START_COLUMN)


def extra_fields(n_temperatures: int = 0, logit_stats: bool = False, word_start: bool = False) -> list[pa.Field]:
    """The optional per-position columns of a cache with these settings, in their order."""
    fields = []
    if n_temperatures:
        fields.append(pa.field(TAU_COLUMN, pa.list_(pa.list_(pa.float32(), n_temperatures)), nullable=False))
    if logit_stats:
        fields += [pa.field(name, pa.list_(pa.float32()), nullable=False) for name in STATS_COLUMNS]
    if word_start:
        fields.append(pa.field(WORD_START_COLUMN, pa.list_(pa.float32()), nullable=False))
    return fields


def span_fields(spans: bool = True) -> list[pa.Field]:
    """v2's span columns and the chat a record came from (none for a v1 shard)."""
    if not spans:
        return []
    return [pa.field(name, pa.list_(pa.int32()), nullable=False) for name in SPAN_COLUMNS] + [
        pa.field(CHAT_COLUMN, pa.string(), nullable=True)]


def topk_fields(k: int) -> list[pa.Field]:
    """The top-k columns; none at k = 0 (a cache of sampled targets only: Arrow has no
    fixed-size list of width 0, and readers give such rows [n - 1, 0] top-k arrays)."""
    if not k:
        return []
    return [pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16(), k)), nullable=False)]


def shard_schema(k: int, n_temperatures: int = 0, logit_stats: bool = False, word_start: bool = False,
                 spans: bool = True, sample: int = 0) -> pa.Schema:
    """The Arrow schema of a shard (v2; ``spans=False``: v1) for a cache with top-``k`` entries per position
    (and ``sample`` draws per position, storage/samples.py)."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("prompt_chars", pa.int32(), nullable=False),
            pa.field("truncated", pa.bool_(), nullable=False),
        ]
        + span_fields(spans)
        + [
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("char_start", pa.list_(pa.int32()), nullable=False),
            pa.field("char_end", pa.list_(pa.int32()), nullable=False),
        ]
        + topk_fields(k)
        + [
            pa.field("label_logprob", pa.list_(pa.float32()), nullable=False),
            pa.field("logsumexp", pa.list_(pa.float32()), nullable=False),
        ]
        + extra_fields(n_temperatures, logit_stats, word_start)
        + sample_fields(sample)
    )
