"""Stage 1 end to end: records -> teacher -> cache. `logitcache teacher` is a thin shell over this."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

import logitcache
from logitcache.errors import LogitCacheError
from logitcache.pipeline.offsets import encode_with_offsets
from logitcache.pipeline.teacher.data import (
    TextTemplate,
    add_special_tokens_for,
    dataset_fingerprint,
    iter_examples,
    load_records,
)
from logitcache.storage.fsutil import hash_files
from logitcache.storage.manifest import Manifest
from logitcache.storage.rows import Row
from logitcache.storage.writer import DEFAULT_SHARD_BYTES, CacheWriter

# Examples sorted by length within a window of this many batches: less padding, while the
# window (not the dataset) bounds memory. Rows are still written in dataset order.
_SORT_WINDOW_BATCHES = 16


@dataclass
class TeacherConfig:
    """Everything `logitcache teacher` takes. Settings that decide the cache's content are
    recorded in its manifest; a rerun must repeat them to resume."""

    model: str
    data: str
    out: str
    top_k: int = 64
    engine: str = "hf"
    mode: str = "score"
    template: TextTemplate = field(default_factory=TextTemplate)
    split: str = "train"
    batch_size: int = 8
    max_length: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    limit: int | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    shard_bytes: int = DEFAULT_SHARD_BYTES
    topk_chunk: int = 1024

    def validate(self) -> None:
        if self.top_k <= 0:
            raise LogitCacheError(f"--top-k must be a positive integer (got {self.top_k}); 64 is a good default.")
        if self.batch_size <= 0:
            raise LogitCacheError(f"--batch-size must be positive (got {self.batch_size}).")
        if self.max_length is not None and self.max_length < 2:
            raise LogitCacheError(f"--max-length must be at least 2 tokens (got {self.max_length}).")
        if self.limit is not None and self.limit < 0:
            raise LogitCacheError(f"--limit must be 0 or more (got {self.limit}).")
        if self.shard_bytes <= 0:
            raise LogitCacheError("--shard-size-mb must be positive.")
        if self.topk_chunk <= 0:
            raise LogitCacheError("the top-k chunk must be positive.")
        if self.engine != "hf":
            raise LogitCacheError(f"--engine {self.engine!r} is not available yet; use --engine hf.")
        if self.mode != "score":
            raise LogitCacheError(f"--mode {self.mode!r} is not available yet; use --mode score.")
        self.template.validate()


@dataclass
class TeacherResult:
    out: str
    written: int = 0  # examples written by this run
    tokens: int = 0  # tokens written by this run
    already_done: int = 0  # examples found in the cache from earlier runs
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (this run)
    truncated: int = 0
    seconds: float = 0.0
    complete: bool = False
    manifest: Manifest | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class _Pending:
    rid: str
    text: str
    prompt_chars: int
    ids: list[int]
    starts: np.ndarray
    ends: np.ndarray
    truncated: bool


def run_teacher(cfg: TeacherConfig, *, progress: bool = True) -> TeacherResult:
    """Write (or resume) the cache ``cfg.out``. Returns what this run did."""
    from logitcache.pipeline.teacher.hf import HFTeacher

    cfg.validate()
    ds = load_records(cfg.data, cfg.split)  # before the model: bad data fails in seconds
    template = cfg.template.resolved(list(ds.column_names))
    engine = HFTeacher(
        cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code, chunk=cfg.topk_chunk,
    )
    if cfg.top_k > engine.vocab_size:
        raise LogitCacheError(
            f"--top-k {cfg.top_k} exceeds the teacher's vocabulary ({engine.vocab_size}); use at most {engine.vocab_size}."
        )
    tok = engine.tokenizer
    max_length = cfg.max_length or engine.max_length
    add_special = add_special_tokens_for(template)

    with tempfile.TemporaryDirectory() as tok_dir:
        tok.save_pretrained(tok_dir)
        tok_sha, tok_files = hash_files(tok_dir)
        manifest = Manifest(
            teacher=engine.describe(),
            tokenizer={
                "name": getattr(tok, "name_or_path", cfg.model),
                "sha256": tok_sha,
                "files": tok_files,
                "vocab_size": len(tok),
                "special_ids": {
                    name: getattr(tok, f"{name}_token_id")
                    for name in ("bos", "eos", "pad", "unk")
                    if getattr(tok, f"{name}_token_id", None) is not None
                },
            },
            k=cfg.top_k,
            mode=cfg.mode,
            dataset={"source": cfg.data, "split": cfg.split, "fingerprint": dataset_fingerprint(cfg.data, ds)},
            template=template.describe(add_special, getattr(tok, "chat_template", None)),
            max_length=max_length,
            tool_version=logitcache.__version__,
        )
        writer = CacheWriter(cfg.out, manifest, tokenizer_dir=tok_dir, shard_bytes=cfg.shard_bytes)

    result = TeacherResult(out=str(cfg.out), already_done=len(writer.done_ids))
    total = len(ds) if cfg.limit is None else min(cfg.limit, len(ds))
    start = time.perf_counter()
    with writer, _Progress(total, enabled=progress) as bar:
        bar.advance(len(writer.done_ids), 0)
        for window in _windows(_pending(ds, template, tok, add_special, max_length, cfg.limit, writer, result, bar),
                               cfg.batch_size * _SORT_WINDOW_BATCHES):
            scored = _score_window(engine, window, cfg.batch_size, cfg.top_k)
            for p in window:  # dataset order
                s = scored[p.rid]
                writer.write(_row(p, s))
                result.written += 1
                result.tokens += len(p.ids)
                result.truncated += p.truncated
                bar.advance(1, len(p.ids))
        if total == len(ds):
            writer.mark_complete()
            result.complete = True
    result.seconds = time.perf_counter() - start
    result.manifest = writer.manifest
    return result


def _pending(ds, template, tok, add_special, max_length, limit, writer, result, bar) -> Iterator[_Pending]:
    for rid, text, prompt_chars in iter_examples(ds, template, tok, limit):
        if rid in writer.done_ids:
            continue
        reason = "empty text" if not text.strip() else "empty response" if prompt_chars < 0 else None
        if reason:
            writer.skip(rid, reason)
            result.skipped[reason] = result.skipped.get(reason, 0) + 1
            bar.advance(1, 0)
            continue
        ids, starts, ends = encode_with_offsets(tok, text, add_special_tokens=add_special)
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            # Keep the first max_length tokens and exactly the text they cover, so the row
            # stays self-consistent for students that retokenize it.
            ids, starts, ends = ids[:max_length], starts[:max_length], ends[:max_length]
            text = text[: int(ends[-1])]
            prompt_chars = min(prompt_chars, len(text))
        yield _Pending(rid, text, prompt_chars, ids, starts, ends, truncated)


def _windows(items: Iterator[_Pending], size: int) -> Iterator[list[_Pending]]:
    window: list[_Pending] = []
    for item in items:
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def _score_window(engine, window: list[_Pending], batch_size: int, k: int) -> dict:
    by_length = sorted(window, key=lambda p: len(p.ids), reverse=True)
    scored = {}
    for a in range(0, len(by_length), batch_size):
        batch = by_length[a : a + batch_size]
        for p, s in zip(batch, engine.score([p.ids for p in batch], k)):
            scored[p.rid] = s
    return scored


def _row(p: _Pending, s) -> Row:
    return {
        "id": p.rid,
        "text": p.text,
        "prompt_chars": p.prompt_chars,
        "truncated": p.truncated,
        "input_ids": np.asarray(p.ids, dtype=np.int32),
        "char_start": p.starts,
        "char_end": p.ends,
        "topk_ids": s.topk_ids,
        "topk_logprobs": s.topk_logprobs,
        "label_logprob": s.label_logprob,
        "logsumexp": s.logsumexp,
    }


class _Progress:
    """A rich progress bar counting examples, with tokens/s; silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled and not os.environ.get("LOGITCACHE_NO_PROGRESS")
        self.total = total
        self.tokens = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._p = Progress(
                TextColumn("[bold]teacher"), BarColumn(), MofNCompleteColumn(), TextColumn("examples"),
                TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self._p.__enter__()
            self._task = self._p.add_task("teacher", total=self.total, tps="-")
        return self

    def advance(self, examples: int, tokens: int) -> None:
        self.tokens += tokens
        if self.enabled:
            dt = time.perf_counter() - self.t0
            self._p.update(self._task, advance=examples, tps=f"{self.tokens / dt:,.0f}" if dt > 0 else "-")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._p.__exit__(*exc)
