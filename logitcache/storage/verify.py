"""verify: recompute every hash and count, and check every number is sane.

Finds: missing, resized or altered shards (sha256), shards the manifest does not list,
schema drift, row/token counts that disagree with the manifest, top-k rows not sorted
descending, log-probabilities above 0 or not finite, probability mass above 1, ids outside
the vocabulary or repeated within a position, a label log-prob that disagrees with the
top-k, character spans outside ``text`` or out of order, duplicate example ids, a
logsumexp column that is not all 0 where the manifest says the engine gives none
(``teacher.logsumexp: false``, the vllm engine), tokenizer files that do not match their
recorded hashes or are not listed, and shard or tokenizer files that are symlinks pointing
outside the cache. A manifest that fails its schema (storage/manifest.py) is refused
outright, with the field named.

Optional content (issue 12): a row that ended (not ``truncated``) must end with the
manifest's ``eos_id`` (appended: on an empty span at the end of the text); ``lse_tau`` must be finite and at least
``max(logits) / tau`` (``logsumexp(x / tau) >= max(x) / tau``, with ``max(x) = top-1
log-prob + logsumexp``) and at most that plus ``log(vocab)``; ``logit_mean`` finite and
not above the largest logit, ``logit_std`` finite and positive, ``lse_std`` finite and
within the same bounds for the scale ``1 / (std + 1e-4)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from logitcache.storage.manifest import Manifest
from logitcache.storage.decode import decode_rows, shard_id_table
from logitcache.storage.integrity import (
    id_bound,
    inside_or_noted,
    tokenizer_problems,
    value_problems,
)
from logitcache.storage.lists import flat_list_column
from logitcache.storage.rows import rows_to_table
from logitcache.storage.samples import sample_problems
from logitcache.storage.segments import SegmentMismatch
from logitcache.storage.schema import EXTRA_COLUMNS, STATS_COLUMNS, TAU_COLUMN
from logitcache.storage.writer import DATA_DIR, SHARD_NAME, TMP_PREFIX

# fp16 keeps 11 significant bits: a stored log-prob is within 2^-11 relative of the truth.
_FP16_RTOL = 2.0**-10
_FP16_ATOL = 2.0**-14
_MASS_TOL = 1e-2


@dataclass
class VerifyReport:
    path: Path
    shards: int = 0
    examples: int = 0
    tokens: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    # (records processed, records the run has to process; None where the manifest does not
    # say) while the teacher run has not finished; None once the cache is complete.
    partial: tuple[int, int | None] | None = None

    @property
    def ok(self) -> bool:
        """Sound: nothing damaged. A partial cache can be sound (what it holds is right)."""
        return not self.problems

    def summary(self) -> str:
        if not self.ok:
            return f"FAILED {self.path}: {len(self.problems)} problem(s)"
        bpt = self.bytes / self.tokens if self.tokens else 0.0
        line = (
            f"OK {self.path}: {self.shards} shards, {self.examples} examples, "
            f"{self.tokens} tokens, {bpt:.1f} bytes/token"
        )
        if self.partial is not None:
            done, total = self.partial
            line += (f"; partial: {done} of {total if total is not None else '?'} records "
                     "(the teacher run has not finished; rerun it to continue)")
        return line


def _progress(m: Manifest) -> tuple[int, int | None] | None:
    """(records processed, records to process) of an unfinished run; None for a complete cache.
    Skipped records count as processed: the run has decided about them."""
    if m.status == "complete":
        return None
    total = m.dataset.get("num_records")
    if total is not None and m.worker:  # a part: worker i of n takes records i, i + n, ...
        total = len(range(m.worker["index"], total, m.worker["count"]))
    return m.num_examples + len(m.skipped), total


def verify_cache(cache_dir: str | os.PathLike, *, check_values: bool = True,
                 on_shard: Callable[[int, int], None] | None = None,
                 local_cache: str | os.PathLike | None = None) -> VerifyReport:
    """Check a cache end to end, on disk or at an fsspec URL. Never raises for a damaged shard: it reports it.

    ``on_shard(done, total)`` is called before each shard is checked (progress of a long run).
    A URL's shards are read as training reads them: each row group and footer against its
    sha256 (segments together cover every byte of the shard), or an older cache's shard whole
    against the shard's sha256; ``local_cache``: through verified local copies.
    """
    from logitcache.storage.reader import CacheReader

    c = CacheReader(cache_dir, local_cache=local_cache)
    root, m = c.path, c.manifest
    report = VerifyReport(path=root, partial=_progress(m))
    tok_root = c.tokenizer_root(fresh=True)  # a URL's tokenizer files as they are now
    report.problems.extend(tokenizer_problems(tok_root, m))
    vocab = id_bound(tok_root, m, trust_files=not report.problems)

    listed = {s.path for s in m.shards}
    # A cache being written: its writer renames the next shard into place just before it lists
    # it in the manifest, so a verify between the two sees it unlisted. It is not a problem of
    # this manifest (the snapshot verify reads); a writer killed there removes it on resume.
    being_written = f"{DATA_DIR}/{SHARD_NAME.format(index=len(m.shards))}" if m.status != "complete" else None
    for rel in c.data_files():
        if rel not in listed and not rel.split("/")[-1].startswith(TMP_PREFIX) and rel != being_written:
            report.problems.append(f"{rel}: not listed in the manifest (unknown shard)")

    seen_ids: set[str] = set()
    for done, info in enumerate(m.shards):
        if on_shard is not None:
            on_shard(done, len(m.shards))
        where = info.path
        if c.remote is None and inside_or_noted(root, where, report.problems) is None:
            continue
        # The file and its footer: the same checks (and words) as the training reader's.
        problem = c.shard_problem(done, remember=False)
        if problem is None:
            problem = c.footer_problem(done)[1]
        if problem is not None:
            report.problems.append(f"{where}: {problem}")
            continue
        size = info.bytes
        try:
            counts = _check_shard(c.open_shard(done), m, vocab, seen_ids, check_values, report.problems, where)
        except SegmentMismatch as e:  # a remote object replaced after the manifest was written
            report.problems.append(f"{where}{' ' + e.segment if e.segment else ''}: {e.reason}")
            continue
        except (pa.ArrowException, OSError) as e:
            report.problems.append(f"{where}: unreadable Parquet ({e})")
            continue
        except (ValueError, IndexError, KeyError, TypeError) as e:  # columns that read but do not decode into rows
            report.problems.append(f"{where}: rows cannot be decoded ({e})")
            continue
        if counts is None:  # not the expected columns: nothing more to count
            continue
        rows, tokens = counts
        if rows != info.rows or tokens != info.tokens:
            report.problems.append(
                f"{where}: {rows} rows / {tokens} tokens, manifest says {info.rows} / {info.tokens}"
            )
        report.shards += 1
        report.examples += rows
        report.tokens += tokens
        report.bytes += size
    return report


def _check_shard(
    f: pq.ParquetFile, m: Manifest, vocab: int, seen_ids: set[str], check_values: bool, problems: list[str], where: str,
) -> tuple[int, int] | None:
    k, compact = m.k, m.codec == "compact"
    has_logsumexp = m.has_logsumexp
    # The columns and k were checked by footer_problem.
    id_table = shard_id_table(f) if compact else None
    # A logprob that went through the compact codec (this cache's, or its source's when
    # `logitcache convert` wrote it) is within the codec's bound of the label's fp32 value.
    extra_tol = m.logprob_error_nats()
    rows = tokens = 0
    for batch in f.iter_batches(batch_size=1024):
        for rid in batch.column("id").to_pylist():
            if rid in seen_ids:
                problems.append(f"{where}: example id {rid!r} appears more than once")
            seen_ids.add(rid)
        rows += batch.num_rows
        tokens += int(pc.sum(pc.list_value_length(batch.column("input_ids"))).as_py() or 0)
        if check_values:
            if compact and batch.num_rows:  # the stored values as the reader checks them, then decoded in v1 layout
                raw = value_problems(batch, compact=True)
                if raw:
                    problems.extend(f"{where}: {msg}" for msg in raw)
                    continue
                rows_ = list(decode_rows(batch, id_table, compact=True))
                batch = rows_to_table(rows_, k, **m.column_options()).to_batches()[0]
            for msg in _check_values(batch, k, vocab, has_logsumexp, extra_tol, m):
                problems.append(f"{where}: {msg}")
    return rows, tokens


def _check_values(
    batch: pa.RecordBatch, k: int, vocab: int, has_logsumexp: bool = True, extra_tol: float = 0.0,
    m: Manifest | None = None,
) -> list[str]:
    """Vectorised over the whole batch; returns one message per kind of problem found."""
    out: list[str] = []
    ids = batch.column("id").to_pylist()
    texts = batch.column("text").to_pylist()
    in_ids, tok_off = flat_list_column(batch.column("input_ids"))
    cs, cs_off = flat_list_column(batch.column("char_start"))
    ce, ce_off = flat_list_column(batch.column("char_end"))
    label, label_off = flat_list_column(batch.column("label_logprob"))
    if k:
        lp, pos_off = flat_list_column(batch.column("topk_logprobs"))
        tk, _ = flat_list_column(batch.column("topk_ids"))
    else:  # sampled targets only: no top-k columns
        lp, tk, pos_off = np.zeros((len(label), 0), np.float16), np.zeros((len(label), 0), np.int32), label_off
    lse, lse_off = flat_list_column(batch.column("logsumexp"))

    n_tok = np.diff(tok_off)
    n_pos = np.diff(pos_off)

    def first_bad(mask_rows: np.ndarray) -> str:
        return repr(ids[int(np.flatnonzero(mask_rows)[0])])

    bad = (n_tok < 1) | (np.diff(cs_off) != n_tok) | (np.diff(ce_off) != n_tok)
    bad |= (n_pos != n_tok - 1) | (np.diff(label_off) != n_pos) | (np.diff(lse_off) != n_pos)
    if bad.any():
        out.append(f"{int(bad.sum())} rows with inconsistent column lengths (first: id {first_bad(bad)})")
        return out  # the position-level checks below assume consistent lengths

    row_of_pos = np.repeat(np.arange(len(ids)), n_pos)
    lp32 = lp.astype(np.float32)

    def report(mask_pos: np.ndarray, what: str) -> None:
        if mask_pos.any():
            rows = np.zeros(len(ids), bool)
            rows[row_of_pos[mask_pos]] = True
            out.append(f"{int(mask_pos.sum())} positions {what} (first: id {first_bad(rows)})")

    out.extend(value_problems(batch, compact=False))  # v1 layout here; the training reader runs the same checks
    if lp.size:
        mass = np.exp(np.where(np.isfinite(lp32), lp32, -np.inf)).sum(axis=1)
        report(mass > 1 + _MASS_TOL, "whose top-k probabilities sum above 1")
        report(((tk < 0) | (tk >= vocab)).any(axis=1) if vocab else (tk < 0).any(axis=1), "with top-k ids outside the vocabulary")
        srt = np.sort(tk, axis=1)
        report((np.diff(srt, axis=1) == 0).any(axis=1), "with a token id repeated in the top-k")
    if not has_logsumexp:  # an engine without the log-normaliser (vllm) stores 0 and says so in the manifest
        report(lse != 0, "with a logsumexp although the manifest says the engine gives none")

    if lp.size:
        # The label of position p is input_ids[p + 1] of the same row.
        local = np.arange(len(row_of_pos)) - pos_off[row_of_pos]
        label_ids = in_ids[tok_off[row_of_pos] + 1 + local]
        hit = tk == label_ids[:, None]
        in_topk = hit.any(axis=1)
        stored = np.where(in_topk, (lp32 * hit).sum(axis=1), 0.0)
        tol = _FP16_RTOL * np.abs(label) + _FP16_ATOL + extra_tol
        report(in_topk & (np.abs(stored - label) > tol), "whose label log-prob disagrees with its top-k entry")
        report(~in_topk & (label > lp32[:, -1] + tol), "whose label is outside the top-k but more likely than its k-th entry")

    text_len = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    row_of_tok = np.repeat(np.arange(len(ids)), n_tok)
    bad_span = (cs < 0) | (ce < cs) | (ce > text_len[row_of_tok])
    prev_end = np.concatenate([[0], ce[:-1]])
    first_of_row = np.zeros(len(cs), bool)
    first_of_row[tok_off[:-1]] = True
    bad_span |= ~first_of_row & (cs < prev_end)
    if bad_span.any():
        rows = np.zeros(len(ids), bool)
        rows[row_of_tok[bad_span]] = True
        out.append(f"{int(bad_span.sum())} token spans outside the text or out of order (first: id {first_bad(rows)})")
    if m is not None and m.sample:
        problems, n_sample_pos = sample_problems(batch, m.sample, vocab)
        # value_problems above reported the rest (it has no vocabulary size nor N here)
        out.extend(p for p in problems if "sum to" in p or "at or above" in p)
        bad = n_sample_pos != n_pos
        if bad.any():
            out.append(f"{int(bad.sum())} rows whose sample_ids have another number of positions (first: id {first_bad(bad)})")
    if m is not None:
        out.extend(_check_optional(batch, m, vocab, ids, texts, in_ids, tok_off, cs, ce, lp32, lse, row_of_pos, extra_tol, first_bad))
    prompt = batch.column("prompt_chars").to_numpy()
    bad_prompt = (prompt < 0) | (prompt > text_len)
    if bad_prompt.any():
        out.append(f"{int(bad_prompt.sum())} rows with prompt_chars outside the text (first: id {first_bad(bad_prompt)})")
    return out


def _check_optional(batch, m: Manifest, vocab, ids, texts, in_ids, tok_off, cs, ce, lp32, lse, row_of_pos, extra_tol, first_bad) -> list[str]:
    """The manifest's optional content: EOS at the end of rows that ended, lse_tau and the logit stats."""
    out: list[str] = []

    def report(mask_pos: np.ndarray, what: str) -> None:
        if mask_pos.any():
            rows = np.zeros(len(ids), bool)
            rows[row_of_pos[mask_pos]] = True
            out.append(f"{int(mask_pos.sum())} positions {what} (first: id {first_bad(rows)})")

    if m.eos_id is not None and len(ids):
        truncated = np.asarray(batch.column("truncated").to_pylist(), dtype=bool)
        last = tok_off[1:] - 1
        # Appended by stage 1 on an empty span at len(text); a text that already ended with it
        # (a chat template rendering the marker) keeps the span of its characters.
        text_len = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        ok = (in_ids[last] == m.eos_id) & ((cs[last] != ce[last]) | (ce[last] == text_len))
        bad = ~truncated & ~ok
        if bad.any():
            out.append(
                f"{int(bad.sum())} rows that ended (not truncated) do not end with the end-of-sequence id "
                f"{m.eos_id} (first: id {first_bad(bad)})"
            )
    _, pos_off = flat_list_column(batch.column("label_logprob"))
    present = [name for name in EXTRA_COLUMNS if name in batch.schema.names]
    lengths_bad = np.zeros(len(ids), bool)
    for name in present:
        lengths_bad |= np.diff(flat_list_column(batch.column(name))[1]) != np.diff(pos_off)
    if lengths_bad.any():
        out.append(f"{int(lengths_bad.sum())} rows whose {'/'.join(present)} lengths differ from their positions (first: id {first_bad(lengths_bad)})")
        return out
    if not lp32.size:  # no positions, or k = 0 (no top-1 to bound the partitions with)
        return out
    # The largest raw logit, from the stored top-1 (rounded: fp16, or the compact codec's step).
    top1 = lp32[:, 0].astype(np.float64) + lse
    tol = _FP16_RTOL * np.abs(lp32[:, 0]) + _FP16_ATOL + extra_tol + 1e-5 * (1 + np.abs(lse))
    log_v = np.log(max(vocab, lp32.shape[1], 1))

    def check_partition(value: np.ndarray, scale: np.ndarray, what: str) -> None:
        value = value.astype(np.float64)  # not finite: value_problems reports it
        low = scale * top1
        bad = np.isfinite(value) & ((value < low - scale * tol - 1e-4) | (value > low + log_v + scale * tol + 1e-4))
        report(bad, f"whose {what} is outside [max(logits) * s, max(logits) * s + log(vocab)]")

    if m.temperatures and TAU_COLUMN in batch.schema.names:
        taus, _ = flat_list_column(batch.column(TAU_COLUMN))
        for j, tau in enumerate(m.temperatures):
            check_partition(taus[:, j], np.full(len(top1), 1 / tau), f"lse_tau at tau={tau:g}")
    if m.logit_stats and all(name in batch.schema.names for name in STATS_COLUMNS):
        mean, _ = flat_list_column(batch.column("logit_mean"))
        std, _ = flat_list_column(batch.column("logit_std"))
        lse_std, _ = flat_list_column(batch.column("lse_std"))
        report(np.isfinite(mean) & (mean > top1 + tol + 1e-4), "with a logit_mean above the largest logit")
        report(np.isfinite(std) & (std <= 0), "with a logit_std that is not positive")
        ok_std = np.isfinite(std) & (std > 0)
        check_partition(np.where(ok_std, lse_std, 0.0), np.where(ok_std, 1 / (std.astype(np.float64) + 1e-4), 0.0), "lse_std")
    return out
