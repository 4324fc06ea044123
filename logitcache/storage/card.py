"""The dataset card (README.md) of a cache, with a YAML header that `datasets` understands."""

from __future__ import annotations

import json

from logitcache.storage.manifest import Manifest


def _loading(m: Manifest) -> str:
    if m.codec == "compact":
        return (
            "**Codec: compact.** The columns `top1_logprob`, `topk_steps_*` and `topk_ranks_*` are logitcache's\n"
            "compact encoding of the top-k log-probs and ids (quantised log-probs, frequency-ranked ids in byte\n"
            "planes, an id table in each shard's footer): `datasets`, pandas or DuckDB read them as opaque bytes,\n"
            "not as numbers. Read the cache with `logitcache.open_cache(path)`, or write a plain-Parquet copy\n"
            "for those tools with\n\n"
            "    logitcache convert CACHE OUT --codec v1\n\n"
            "(about twice the bytes: the decoded log-probs stored as float16)."
        )
    return (
        "**Codec: v1**, plain Parquet (float16 log-probs, int32 ids). Load it with\n"
        "`logitcache.open_cache(path)`, `pyarrow.parquet`, pandas, DuckDB, or\n"
        '`datasets.load_dataset("parquet", data_files="data/*.parquet")`. To save about half the disk\n'
        "(for logitcache's own readers only): `logitcache convert CACHE OUT --codec compact`."
    )


def _origin(m: Manifest) -> str:
    """Where a converted cache came from (``logitcache convert``); empty for any other."""
    origin = m.converted_from
    if not origin:
        return ""
    return (f"\nConverted by `logitcache convert` from a cache in the {origin.get('codec', '?')} codec "
            f"(written by logitcache {origin.get('tool_version') or '?'}).\n")


def _extras(m: Manifest) -> str:
    """What the rows hold beyond format v1's columns (issue 12), as card paragraphs."""
    parts = [_targets(m)]
    if m.eos_id is not None:
        parts.append(
            f"Every example that ended (not `truncated`) ends with the end-of-sequence token (id {m.eos_id}),\n"
            "appended on an empty span at the end of `text` unless the text already ended with it: the\n"
            "last position holds the teacher's prediction of the end of the response."
        )
    else:
        parts.append("No end-of-sequence token was appended to the examples.")
    if m.temperatures:
        taus = ", ".join(f"{t:g}" for t in m.temperatures)
        parts.append(
            f"`lse_tau` holds, per position, `logsumexp(logits / tau)` for tau = {taus}: the log-prob of a\n"
            "stored entry at tau is `(logprob + logsumexp) / tau - lse_tau`, exact over the full vocabulary."
        )
    if m.logit_stats:
        parts.append(
            "`logit_mean` and `logit_std` are the mean and (unbiased) standard deviation of the logits over\n"
            "the vocabulary, and `lse_std` is `logsumexp(logits / (logit_std + 1e-4))`."
        )
    if m.word_start:
        parts.append(
            "`word_start_logprob` is, per position, the log of the teacher's probability that the next token\n"
            "starts a word: its mass on tokens beginning with a space, tab or newline byte, and on special tokens."
        )
    if m.sample:
        parts.append(
            f"`sample_ids` and `sample_counts` hold, per position, {m.sample} draws from the teacher's distribution\n"
            "(temperature 1, with replacement): the distinct ids drawn, ascending, and how often each was drawn.\n"
            f"count / {m.sample} is an unbiased estimate of the teacher's probabilities, tail included."
            + ("\nThis cache stores no top-k (k = 0): the draws are its teacher targets." if m.k == 0 else "")
        )
    return "\n\n".join(parts)


def _targets(m: Manifest) -> str:
    if not m.has_spans:
        return ("Students learn from the characters after `prompt_chars` (the response); the prompt is\n"
                "context only (cache format v1).")
    return ("`target_start` and `target_end` list the [start, end) character ranges of `text` that students\n"
            "learn from (sorted, not overlapping; the assistant turns of a chat, the response of a prompt);\n"
            "the rest is context only. `prompt_chars` is kept for readers of format v1: the first range's\n"
            "start (the text's length when there is none). `messages` holds, for an example rendered from a\n"
            "chat, the chat itself as JSON (null otherwise).")


def render_card(m: Manifest) -> str:
    teacher = m.teacher.get("name", "?")
    bpt = m.num_bytes / m.num_tokens if m.num_tokens else 0.0
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
tags:
- knowledge-distillation
- logitcache
---

# Teacher logit cache: {teacher}

Written by [logitcache](https://pypi.org/project/logitcache/) {m.tool_version}, cache format v{m.format_version}.{_origin(m)}
Every row is one example: the exact `text` the teacher read, its tokens with character
spans, and per position the teacher's top-{m.k} next-token log-probabilities (sorted,
temperature {m.temperature}, normalised over the full vocabulary), the log-probability of
the actual next token and the log-normaliser of the raw logits.

{_extras(m)}

| | |
|---|---|
| teacher | `{teacher}` ({m.teacher.get("dtype", "?")}) |
| mode | {m.mode} |
| top-k | {m.k} |
| examples | {m.num_examples} |
| tokens | {m.num_tokens} |
| bytes/token | {bpt:.1f} |
| status | {m.status} |

{_loading(m)}

The teacher tokenizer is in `tokenizer/`; `manifest.json` has the settings and a sha256 per shard
(`logitcache verify` checks them).

Template (how a record became text):

```json
{json.dumps(m.template, indent=2)}
```
"""
