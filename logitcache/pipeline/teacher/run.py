"""Stage 1 end to end: records -> teacher -> cache. `logitcache teacher` is a thin shell over this."""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

import logitcache
from logitcache.errors import LogitCacheError
from logitcache.pipeline.offsets import encode_prefix_with_offsets, encode_suffix_with_offsets, encode_with_offsets
from logitcache.pipeline.progress import StepProgress, check_log_every, progress_enabled
from logitcache.pipeline.records import (
    TextTemplate,
    add_special_tokens_for,
    check_records,
    dataset_fingerprint,
    iter_examples,
    load_records,
)
from logitcache.pipeline.teacher.draws import sequence_key
from logitcache.pipeline.teacher.engine import ENGINES, GenerationConfig, TeacherEngine, first_bad_value
from logitcache.storage.fsutil import crash_point, hash_files
from logitcache.storage.lease import Lease
from logitcache.storage.lock import CacheLock
from logitcache.storage.manifest import Manifest
from logitcache.storage.parts import part_name
from logitcache.storage.remote import is_url
from logitcache.storage.rows import Row
from logitcache.storage.samples import MAX_SAMPLE, PROPOSAL, SAMPLE_COLUMNS
from logitcache.storage.schema import EXTRA_COLUMNS
from logitcache.storage.writer import DEFAULT_SHARD_BYTES, CacheWriter

# Examples sorted by length within a window of this many batches: less padding, while the
# window (not the dataset) bounds memory. Rows are still written in dataset order.
_SORT_WINDOW_BATCHES = 16

# --max-chars when left out and no context length bounds the work per record (no --max-length,
# a model without a known context, such as a state-space model): tokenizing a million characters
# with offsets peaks at 0.1-0.5 GB (Mistral's 32k vocabulary, a 512-token BPE), ten million at
# 1-3.5 GB, enough to kill a small job, so the default stays at a million (about 250k tokens of
# prose). With a context length a record costs only what its kept tokens cost, so records are
# cut to it instead, and none is skipped unless --max-chars is given.
UNBOUNDED_MAX_CHARS = 1_000_000
TOO_LONG = "text over --max-chars"  # the skip reason, in the manifest and the summary


@dataclass
class TeacherConfig:
    """Everything `logitcache teacher` takes. Settings that decide the cache's content are
    recorded in its manifest; a rerun must repeat them to resume."""

    model: str
    data: str
    out: str
    top_k: int = 64
    engine: str = "hf"
    mode: str = "score"  # score | generate
    template: TextTemplate = field(default_factory=TextTemplate)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    truncate_prompts: bool = False  # generate mode: cut long prompts from the left instead of skipping them
    split: str = "train"
    batch_size: int = 8
    max_length: int | None = None
    # Skip records whose rendered text is longer (before tokenizing). None: UNBOUNDED_MAX_CHARS
    # when no context length bounds the work per record, else no limit (see effective_max_chars).
    max_chars: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    limit: int | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    shard_bytes: int = DEFAULT_SHARD_BYTES
    codec: str = "v1"  # v1 (fp16 + int32) or compact (storage/codec.py)
    topk_chunk: int = 1024
    # Append the tokenizer's end-of-sequence token to every example that ended (issue 12 §1f):
    # the last position then holds the teacher's prediction of the end.
    eos: bool = True
    # Extra temperatures whose log-normaliser is stored per position (1 is always there).
    # None: the engine's default, (2.0,) for hf and () for vllm (which has no log-normaliser).
    temperatures: tuple[float, ...] | None = None
    logit_stats: bool = False  # the logits' mean, std and logsumexp(logits / (std + 1e-4))
    # Draws per position from the teacher's distribution, stored as ids + counts (storage/samples.py;
    # 0: none). Keyed by (generation.seed, example id, position): a rerun or resume draws the same.
    sample: int = 0
    # The log-mass on word-start tokens per position (ALM's debiasing). None: on with hf, off
    # with vllm (which gives no full distribution).
    word_start: bool | None = None
    # Cluster split: None reads SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID, else 1 / 0.
    num_workers: int | None = None
    worker_index: int | None = None
    # Off a terminal, or with the bar off: a progress line every this many seconds (0: after
    # every window of examples written), so a job's log shows how far it is and how long is left.
    log_every: float = 30.0
    # vllm engine
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    # With a URL as ``out``: the local directory the cache is written in before each shard is
    # uploaded (a full local copy; None: storage/sync.py's default_staging of the URL).
    local_cache: str | None = None

    def validate(self) -> None:
        if not 0 <= self.sample <= MAX_SAMPLE:
            raise LogitCacheError(
                f"--sample must be between 1 and {MAX_SAMPLE} draws per position, or 0 for none (got {self.sample}); "
                "12 is a good start."
            )
        if self.top_k < 0 or (self.top_k == 0 and not self.sample):
            raise LogitCacheError(
                f"--top-k must be a positive integer (got {self.top_k}); 64 is a good default "
                "(--top-k 0 stores sampled targets alone, with --sample N)."
            )
        if self.batch_size <= 0:
            raise LogitCacheError(f"--batch-size must be positive (got {self.batch_size}).")
        if self.max_length is not None and self.max_length < 2:
            raise LogitCacheError(f"--max-length must be at least 2 tokens (got {self.max_length}).")
        if self.max_chars is not None and self.max_chars < 1:
            raise LogitCacheError(
                f"--max-chars must be a positive number of characters (got {self.max_chars}); "
                "leave it out for the default (no limit while a context length bounds the work)."
            )
        if self.limit is not None and self.limit < 0:
            raise LogitCacheError(f"--limit must be 0 or more (got {self.limit}).")
        check_log_every(self.log_every)
        if self.shard_bytes <= 0:
            raise LogitCacheError("--shard-size-mb must be positive.")
        if self.topk_chunk <= 0:
            raise LogitCacheError("the top-k chunk must be positive.")
        if self.engine not in ENGINES:
            raise LogitCacheError(f"--engine {self.engine!r}: use one of {', '.join(ENGINES)}.")
        if self.mode not in ("score", "generate"):
            raise LogitCacheError(f"--mode {self.mode!r}: use score (teacher-forced) or generate.")
        if self.mode == "generate":
            self.generation.validate()
        self.template.validate(self.mode)
        if self.temperatures is not None:
            bad = [t for t in self.temperatures if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0)]
            if bad:
                raise LogitCacheError(f"--temperatures: {bad[0]!r} is not a positive number; give e.g. --temperatures 2,4.")
        if self.engine == "vllm" and (self.extra_temperatures() or self.logit_stats):
            flag = "--logit-stats" if self.logit_stats else f"--temperatures {','.join(f'{t:g}' for t in self.extra_temperatures())}"
            raise LogitCacheError(
                f"{flag} needs the log-normaliser of the full logits, which vLLM does not return; "
                f"use --engine hf for it, or drop {'the flag' if self.logit_stats else 'them (--temperatures none)'} with --engine vllm."
            )
        if self.engine == "vllm" and self.sample:
            raise LogitCacheError(
                "--sample needs the teacher's full distribution, which vLLM does not return; "
                "use --engine hf for it, or drop the flag with --engine vllm."
            )
        if self.engine == "vllm" and self.word_start:
            raise LogitCacheError(
                "--word-start needs the teacher's full distribution, which vLLM does not return; "
                "use --engine hf for it, or drop the flag with --engine vllm (ALM then runs with `logitcache train --alm-mode plain`)."
            )
        self.worker()

    def effective_max_chars(self, max_length: int | None) -> int | None:
        """The --max-chars this run applies, given the context length in force (None: none).

        Left out, it is UNBOUNDED_MAX_CHARS only where no context length bounds what a record
        costs; with one, huge records are cut to it as before rather than skipped.
        """
        if self.max_chars is not None:
            return self.max_chars
        return UNBOUNDED_MAX_CHARS if max_length is None else None

    def extra_temperatures(self) -> list[float]:
        """The temperatures stored besides 1, sorted, without repeats (the manifest's list)."""
        taus = (2.0,) if self.temperatures is None and self.engine == "hf" else self.temperatures or ()
        return sorted({float(t) for t in taus if float(t) != 1.0})

    def stores_word_start(self) -> bool:
        """Whether the rows hold ``word_start_logprob`` (the manifest's ``word_start``)."""
        return self.engine == "hf" if self.word_start is None else bool(self.word_start)

    def worker(self) -> tuple[int, int]:
        """(index, count) of this worker; from the flags, else from a Slurm array, else (0, 1)."""
        count, index = self.num_workers, self.worker_index
        env = os.environ
        if count is None and "SLURM_ARRAY_TASK_COUNT" in env:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        if index is None and "SLURM_ARRAY_TASK_ID" in env:
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = 1 if count is None else count
        index = 0 if index is None else index
        if count < 1:
            raise LogitCacheError(f"--num-parts must be at least 1 (got {count}).")
        if not 0 <= index < count:
            raise LogitCacheError(
                f"--part-index {index} is outside 0..{count - 1} for --num-parts {count}; "
                "part indices start at 0 (Slurm arrays: --array=0-N-1)."
            )
        return index, count

    def out_dir(self) -> Path:
        """The cache this worker writes: ``out`` itself, or its part directory in a cluster run."""
        index, count = self.worker()
        return Path(self.out) if count == 1 else Path(self.out) / part_name(index, count)

    def out_target(self) -> str:
        """:meth:`out_dir` as the user would write it, a URL kept a URL (``Path`` would fold its ``//``)."""
        index, count = self.worker()
        return self.out if count == 1 else f"{self.out.rstrip('/')}/{part_name(index, count)}"


@dataclass
class TeacherResult:
    out: str
    written: int = 0  # examples written by this run
    tokens: int = 0  # tokens written by this run
    already_done: int = 0  # examples found in the cache from earlier runs
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (this run)
    truncated: int = 0
    retokenized: int = 0  # generate mode: generated ids that re-tokenize differently
    unfinished: int = 0  # generate mode: responses cut at max_new_tokens (no EOS, flagged truncated)
    seconds: float = 0.0
    engine_seconds: float = 0.0  # inside the teacher (generate, score); the rest is pipeline overhead
    complete: bool = False
    manifest: Manifest | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def overhead(self) -> float:
        """Wall time beyond the teacher's own work, as a fraction of it."""
        return (self.seconds - self.engine_seconds) / self.engine_seconds if self.engine_seconds else 0.0


@dataclass
class _Pending:
    rid: str
    text: str
    spans: tuple[tuple[int, int], ...]  # target spans (records.py); in generate mode, where the response starts
    ids: list[int]
    starts: np.ndarray
    ends: np.ndarray
    truncated: bool
    messages: str | None = None  # the chat it was rendered from, as JSON (the cache's messages column)


@dataclass
class _Skip:
    rid: str
    reason: str


def make_engine(cfg: TeacherConfig) -> TeacherEngine:
    if cfg.engine == "vllm":
        from logitcache.pipeline.teacher.vllm import VLLMTeacher

        return VLLMTeacher(
            cfg.model, dtype=cfg.dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
            tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
            # vLLM always generates one token after a prompt, so a prompt of max_length tokens
            # needs a context one longer.
            max_model_len=cfg.max_model_len or (cfg.max_length + 1 if cfg.max_length else None),
            max_logprobs=cfg.top_k, seed=cfg.generation.seed,
        )
    from logitcache.pipeline.teacher.hf import HFTeacher

    return HFTeacher(
        cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code, chunk=cfg.topk_chunk,
        temperatures=tuple(cfg.extra_temperatures()), logit_stats=cfg.logit_stats,
        word_start=cfg.stores_word_start(), sample=cfg.sample,
    )


def run_teacher(cfg: TeacherConfig, *, progress: bool = True) -> TeacherResult:
    """Write (or resume) this worker's cache. Returns what this run did.

    Holds the lock on the cache (or the worker's part) from the start, so a second run
    pointed at it refuses at once rather than after loading its model. ``progress``: a bar on a
    terminal; off a terminal, or False, a line every ``cfg.log_every`` seconds instead.
    """
    cfg.validate()
    # The manifest records local paths resolved, so that a resume (or a merge of parts) spelled
    # `teacher/` one time and `/work/teacher` the next is recognised as the same run.
    cfg = replace(cfg, model=_resolved_if_local(cfg.model), data=_resolved_if_local(cfg.data))
    if is_url(cfg.out):
        return _run_remote(cfg, progress)
    with CacheLock(cfg.out_dir()) as lock:
        return _run_locked(cfg, lock, progress)


def _run_remote(cfg: TeacherConfig, progress: bool) -> TeacherResult:
    """Write to a URL: the local writer fills a staging directory and each shard it lists is
    uploaded, the manifest last (storage/sync.py). Under the remote's lease (storage/lease.py)
    and the staging's lock. The staging first takes the remote's state, so a rerun resumes from
    what the remote lists, whatever the staging held."""
    from logitcache.storage.sync import Pusher, remote_place, staging_dir, sync_down

    url = cfg.out_target()
    place = remote_place(url)  # protocol, bucket and credentials checked before anything local is made
    with Lease(url) as lease:
        local = replace(cfg, out=str(staging_dir(cfg.out, cfg.local_cache)))
        with CacheLock(local.out_dir()) as lock:
            sync_down(place, local.out_dir())
            pusher = Pusher(local.out_dir(), place, check=lease.check)
            try:
                result = _run_locked(local, lock, progress, on_commit=pusher.push)
            except LogitCacheError as e:
                # The staging holds the remote's cache: its settings are the remote's, said of the URL.
                staged = f"{local.out_dir()} already holds a cache"
                if str(e).startswith(staged):
                    raise LogitCacheError(url + str(e)[len(str(local.out_dir())):]) from None
                raise
            pusher.push(final=True)  # the card the writer rewrote when it closed
    result.out = url
    return result


def _resolved_if_local(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _run_locked(cfg: TeacherConfig, lock: CacheLock, progress: bool,
                on_commit: Callable[[], None] | None = None) -> TeacherResult:
    index, count = cfg.worker()
    ds = load_records(cfg.data, cfg.split)  # before the model: bad data fails in seconds
    template = cfg.template.resolved(list(ds.column_names), cfg.mode)
    check_records(ds, template)  # a bad record 900k in stops us now, not hours into the run
    engine = make_engine(cfg)
    if cfg.top_k > engine.vocab_size:
        raise LogitCacheError(
            f"--top-k {cfg.top_k} exceeds the teacher's vocabulary ({engine.vocab_size}); use at most {engine.vocab_size}."
        )
    tok = engine.tokenizer
    limits = [n for n in (cfg.max_length, engine.max_length) if n]
    max_length = min(limits) if limits else None
    if cfg.mode == "generate" and max_length is not None and cfg.generation.max_new_tokens >= max_length:
        raise LogitCacheError(
            f"--max-new-tokens {cfg.generation.max_new_tokens} leaves no room for a prompt in the teacher's "
            f"{max_length}-token context; lower it."
        )
    max_chars = cfg.effective_max_chars(max_length)
    add_special = add_special_tokens_for(template)
    eos_id = getattr(tok, "eos_token_id", None) if cfg.eos else None
    eos_id = int(eos_id) if eos_id is not None else None

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
            generation=cfg.generation.describe() if cfg.mode == "generate" else None,
            dataset={
                "source": cfg.data, "split": cfg.split, "fingerprint": dataset_fingerprint(cfg.data, ds),
                "num_records": len(ds),
            },
            template=template.describe(add_special, getattr(tok, "chat_template", None)),
            max_length=max_length,
            max_chars=max_chars,
            worker={"index": index, "count": count} if count > 1 else None,
            codec=cfg.codec,
            eos_id=eos_id,
            temperatures=list(engine.temperatures),
            logit_stats=bool(engine.logit_stats),
            word_start=bool(engine.word_start),
            sample=cfg.sample,
            sample_proposal={**PROPOSAL, "seed": cfg.generation.seed} if cfg.sample else None,
            tool_version=logitcache.__version__,
        )
        writer = CacheWriter(cfg.out_dir(), manifest, tokenizer_dir=tok_dir, shard_bytes=cfg.shard_bytes, lock=lock,
                             on_commit=on_commit)
    if on_commit is not None:  # a new cache is there before its first shard (tokenizer, card, manifest)
        on_commit()

    result = TeacherResult(out=str(cfg.out_dir()), already_done=len(writer.done_ids))
    n_records = len(ds) if cfg.limit is None else min(cfg.limit, len(ds))
    assigned = len(range(index, n_records, count))
    done = frozenset(writer.done_ids)  # read by the prefetch thread; the writer thread adds to its own set
    examples = _assigned(ds, template, tok, add_special, cfg, index, count, done, eos_id, max_length, max_chars,
                         generate=cfg.mode == "generate")
    window_size = cfg.batch_size * _SORT_WINDOW_BATCHES
    start = time.perf_counter()
    # Three stages overlap: reading + tokenizing the next window (a thread), the teacher on
    # this one (here), and writing the previous one (a thread). Only the writer thread
    # touches the writer, so rows and skips reach it in dataset order.
    # stderr, as tqdm and the engines log: stdout keeps the summary that scripts read.
    bar = StepProgress("teacher", assigned, unit="examples", bar=progress_enabled(progress), interval=cfg.log_every,
                       stream=sys.stderr, start=len(writer.done_ids))
    with writer, bar, ThreadPoolExecutor(1) as write_pool:
        bar.update(len(writer.done_ids), note=_throughput(0, 0.0))
        writing = None
        for window in _prefetch(_windows(examples, window_size)):
            t0 = time.perf_counter()
            if cfg.mode == "generate":
                window = _generate_window(engine, window, cfg, tok, add_special, max_length, eos_id, result)
            window = _truncate(window, max_length, skip_targetless=_spans_are_data(template))
            pending = [p for p in window if isinstance(p, _Pending)]
            seeded = {"sample_seed": cfg.generation.seed} if cfg.sample else {}
            scored = _score_window(engine, pending, cfg.batch_size, cfg.top_k, **seeded)
            result.engine_seconds += time.perf_counter() - t0
            if writing is not None:
                writing.result()  # in order, and an error in the writer stops us here
            writing = write_pool.submit(_write_window, writer, window, scored, result, bar, start)
        if writing is not None:
            writing.result()
        if n_records == len(ds):
            crash_point("run.before_complete")
            writer.mark_complete()
            result.complete = True
    result.seconds = time.perf_counter() - start
    result.manifest = writer.manifest
    return result


def _assigned(ds, template, tok, add_special, cfg, index, count, done, eos_id, max_length, max_chars, *,
              generate: bool) -> Iterator[_Pending | _Skip]:
    """This worker's records not yet in the cache, tokenized (score mode) or as prompts (generate).

    Only as much of a long text is tokenized as ``max_length`` tokens can keep (the rest is cut
    by _truncate): a 100 MB record costs what its first tokens cost. A text over ``max_chars``
    is skipped untokenized.
    """
    for r, rid, text, spans, chat in iter_examples(ds, template, tok, cfg.limit, generate=generate):
        if r % count != index or rid in done:
            continue
        if generate:
            reason = "empty prompt" if not text.strip() else None
        else:
            reason = "empty text" if not text.strip() else None if spans else _no_target(template)
        if max_chars is not None and len(text) > max_chars:
            reason = TOO_LONG
        if reason:
            yield _Skip(rid, reason)
            continue
        # A prompt's first tokens tell whether it fits; --truncate-prompts then tokenizes its end alone.
        ids, starts, ends = encode_prefix_with_offsets(tok, text, max_length, add_special_tokens=add_special)
        if not generate:  # a prompt gets its end after the teacher's response (_generate_window)
            ids, starts, ends = with_eos(ids, starts, ends, len(text), eos_id)
        # The chat as it was rendered, kept for a student with a template of its own (none in
        # generate mode: the teacher's answer is not a message of it).
        messages = json.dumps(chat, ensure_ascii=False) if chat is not None else None
        yield _Pending(rid, text, spans, ids, starts, ends, truncated=False, messages=messages)


NO_TARGET = "no target"


def _spans_are_data(template) -> bool:
    """Spans given as data or found in a chat: a record left without any has nothing to learn."""
    return bool(template.target_field) or template.kind == "messages"


def _no_target(template) -> str:
    # A response that is empty says it in the words users know; spans given as data, or a chat's
    # assistant turns (none, all empty, all "train": false), may leave no target too.
    return NO_TARGET if _spans_are_data(template) else "empty response"


def cut_spans(spans: tuple[tuple[int, int], ...], n_chars: int) -> tuple[tuple[int, int], ...]:
    """The spans within the first ``n_chars`` characters (a text cut by --max-length), empty ones dropped."""
    return tuple((a, min(b, n_chars)) for a, b in spans if a < n_chars)


def with_eos(ids: list[int], starts: np.ndarray, ends: np.ndarray, n_chars: int, eos_id: int | None):
    """``ids`` with ``eos_id`` appended (an empty span at the end of the text), unless it is None
    or the ids already end with it (a chat template that renders the end-of-turn marker)."""
    if eos_id is None or (ids and ids[-1] == eos_id):
        return ids, starts, ends
    at = np.array([n_chars], dtype=np.int32)
    return ids + [eos_id], np.concatenate([starts, at]).astype(np.int32), np.concatenate([ends, at]).astype(np.int32)


def _truncate(window: list, max_length: int | None, skip_targetless: bool = False) -> list:
    """Cut examples to max_length tokens and exactly the text they cover, and their spans to that
    text (flagged, never dropped; except that with ``--target-field`` an example whose targets
    were all cut away is skipped as "no target", as one without targets is: there the spans are
    the data, where a prompt/response row cut inside its prompt keeps what it has, as v1 did)."""
    if max_length is None:
        return window
    out = []
    for p in window:
        if isinstance(p, _Pending) and len(p.ids) > max_length:
            ends = p.ends[:max_length]
            text = p.text[: int(ends[-1])]
            spans = cut_spans(p.spans, len(text))
            p = _Skip(p.rid, NO_TARGET) if skip_targetless and not spans else \
                _Pending(p.rid, text, spans, p.ids[:max_length], p.starts[:max_length], ends, True, p.messages)
        out.append(p)
    return out


def _generate_window(engine, window: list, cfg: TeacherConfig, tok, add_special: bool, max_length, eos_id, result) -> list:
    """Prompts -> the teacher's responses -> the full texts, tokenized as score mode would."""
    gen = cfg.generation
    room = None if max_length is None else max_length - gen.max_new_tokens
    prompts: list[_Pending] = []
    out: list = []
    for p in window:
        if isinstance(p, _Pending) and room is not None and len(p.ids) > room:
            if not cfg.truncate_prompts:
                p = _Skip(p.rid, "prompt too long")
            else:  # keep the end of the prompt, where the question usually is
                # room - 1 of the whole prompt's tokens, and its BOS again when re-tokenized
                _, tail_starts, _ = encode_suffix_with_offsets(tok, p.text, max(room - 1, 1), add_special_tokens=add_special)
                text = p.text[int(tail_starts[0]):]
                ids, starts, ends = encode_with_offsets(tok, text, add_special_tokens=add_special)
                p = _Pending(p.rid, text, ((len(text), len(text)),), ids[-room:] if len(ids) > room else ids, starts,
                             ends, True)
        out.append(p)
        if isinstance(p, _Pending):
            prompts.append(p)
    responses = {}
    by_length = sorted(prompts, key=lambda p: len(p.ids), reverse=True)
    for a in range(0, len(by_length), cfg.batch_size):
        batch = by_length[a : a + cfg.batch_size]
        for p, new in zip(batch, engine.generate([p.ids for p in batch], gen)):
            responses[p.rid] = new
    final = []
    for p in out:
        if not isinstance(p, _Pending):
            final.append(p)
            continue
        new = responses[p.rid]
        full = tok.decode(p.ids + new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        head = tok.decode(p.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        response = full[len(head) :] if full.startswith(head) else tok.decode(new, skip_special_tokens=True)
        if not response.strip():
            final.append(_Skip(p.rid, "empty response"))
            continue
        text = p.text + response
        ids, starts, ends = encode_with_offsets(tok, text, add_special_tokens=add_special)
        # The stored numbers are the teacher's distribution along the canonical tokenization
        # of the text, which students re-tokenize anyway; count where sampling took another path.
        result.retokenized += ids != p.ids + new
        # The engines drop the end-of-sequence token that stopped a response, so a response of
        # max_new_tokens did not stop: it gets no end and is flagged truncated, as a text cut
        # at --max-length is.
        stopped = len(new) < gen.max_new_tokens
        if stopped:
            ids, starts, ends = with_eos(ids, starts, ends, len(text), eos_id)
        else:
            result.unfinished += 1
        # The response the teacher wrote is the target: from the end of the prompt to the end.
        final.append(_Pending(p.rid, text, ((len(p.text), len(text)),), ids, starts, ends, p.truncated or not stopped))
    return final


def _write_window(writer: CacheWriter, window: list, scored: dict, result: TeacherResult, bar: StepProgress,
                  start: float) -> None:
    for p in window:  # dataset order
        if isinstance(p, _Skip):
            writer.skip(p.rid, p.reason)
            result.skipped[p.reason] = result.skipped.get(p.reason, 0) + 1
            continue
        writer.write(_row(p, scored[p.rid]))
        result.written += 1
        result.tokens += len(p.ids)
        result.truncated += p.truncated
    bar.update(bar.done + len(window), note=_throughput(result.tokens, time.perf_counter() - start))
    crash_point("run.window_written")


def _throughput(tokens: int, seconds: float) -> str:
    return f"{tokens:,} tokens, {tokens / seconds if seconds > 0 else 0:,.0f} tokens/s"


def _windows(items: Iterator, size: int) -> Iterator[list]:
    window: list = []
    for item in items:
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def _prefetch(items: Iterator[list], depth: int = 1) -> Iterator[list]:
    """Produce the next items in a thread while the caller works on the current one."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # re-raised in the caller's thread
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="logitcache-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _score_window(engine, window: list[_Pending], batch_size: int, k: int, *, sample_seed: int | None = None) -> dict:
    by_length = sorted(window, key=lambda p: len(p.ids), reverse=True)
    scored = {}
    for a in range(0, len(by_length), batch_size):
        batch = by_length[a : a + batch_size]
        # Draws keyed by example id, not by batch: a resume, which batches differently, draws the same.
        keys = None if sample_seed is None else {"keys": [sequence_key(sample_seed, p.rid) for p in batch]}
        for p, s in zip(batch, engine.score([p.ids for p in batch], k, **(keys or {}))):
            problem = first_bad_value(s)
            if problem is not None:
                raise LogitCacheError(_non_finite_message(engine, p.rid, problem))
            scored[p.rid] = s
    return scored


def _non_finite_message(engine, rid: str, problem: str) -> str:
    # Raised before this window is written: the cache keeps only sound rows and stays incomplete.
    # A cache is made in one dtype, so the fix goes to a new --out.
    dtype = str((engine.describe() or {}).get("dtype", ""))
    cause = (
        "float16 overflowed in the model's activations (common for models trained in bfloat16): rerun with "
        "--dtype bfloat16 (or --dtype float32 where bfloat16 is not supported) and a new --out"
        if dtype in ("float16", "half") else
        f"the model produces NaN/inf on this input in {dtype or 'its dtype'}: check its weights, or rerun with "
        "--dtype float32 and a new --out"
    )
    return f"teacher output for example {rid!r} {problem}; {cause}. Nothing non-finite was written."



def _row(p: _Pending, s) -> Row:
    return {
        "id": p.rid,
        "text": p.text,
        "prompt_chars": p.spans[0][0] if p.spans else len(p.text),  # v1's column (storage/spans.py)
        "target_spans": np.asarray(p.spans, dtype=np.int32).reshape(-1, 2),
        "messages": p.messages,
        "truncated": p.truncated,
        "input_ids": np.asarray(p.ids, dtype=np.int32),
        "char_start": p.starts,
        "char_end": p.ends,
        "topk_ids": s.topk_ids,
        "topk_logprobs": s.topk_logprobs,
        "label_logprob": s.label_logprob,
        "logsumexp": s.logsumexp,
        **{name: getattr(s, name) for name in EXTRA_COLUMNS + SAMPLE_COLUMNS if getattr(s, name, None) is not None},
    }
