"""Held-out evaluation comparable across tokenizers: loss per character, greedy exact match.

Bits per character = (sum of the response tokens' negative log-likelihood) / ln 2 /
(characters those tokens cover). Dividing by characters, not tokens, makes students with
different tokenizers (and the teacher) comparable. The tokens scored are the training targets
(align.py): every token that covers a response character, so a token straddling the
prompt/response boundary (byte-level ``':\n'``) is scored, and its prompt characters are
counted too (characters run from the first scored token's start to the response's end: still a
per-character figure; at most a character or two per example differs between tokenizers). When
the model's tokenizer has an EOS token, its prediction after the response (the model saying
"the answer is over") is scored as well: its NLL is added, with no characters (it is spread over
the response's characters, as the cache and training do).

Two accuracies where records have answers, both on the greedy continuation of the prompt:
* prefix match (``accuracy``): the continuation, stripped, starts with the reference response,
  stripped; the model may go on talking;
* exact match (``exact_match``): the continuation up to the model's EOS, stripped, equals the
  reference, stripped (a reference ending with the EOS token rendered as text, as some chat
  templates write it, is compared without it): the answer AND stopping. A continuation that
  reaches ``max_new_tokens`` without EOS is not an exact match; for a tokenizer without EOS the
  whole continuation must equal the reference.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from logitcache.errors import LogitCacheError
from logitcache.pipeline.offsets import encode_with_offsets
from logitcache.pipeline.padding import pad_sequences, pad_token_id
from logitcache.pipeline.progress import StepProgress, check_log_every, progress_enabled
from logitcache.pipeline.student.align import target_positions, target_span_index
from logitcache.storage.spans import ends_at_text_end
from logitcache.pipeline.records import TextTemplate, add_special_tokens_for, iter_examples, load_records


@dataclass
class EvalConfig:
    model: str
    data: str
    template: TextTemplate = field(default_factory=TextTemplate)
    split: str = "train"
    batch_size: int = 16
    limit: int | None = None
    max_new_tokens: int | None = None  # default: the longest reference answer in tokens + 4
    accuracy: bool = True
    device: str = "auto"
    trust_remote_code: bool = False  # run the model's own Python code (only for models you trust)
    progress: bool = True  # a bar on a terminal; off one, or False, a line every log_every seconds
    log_every: float | None = 30.0  # None: no progress at all (the demo shows its own)


@dataclass
class EvalResult:
    examples: int
    chars: int
    nll_nats: float
    answered: int  # records with a reference answer (for exact match)
    correct: int  # prefix match: the greedy continuation starts with the reference
    exact: int = 0  # exact match: the continuation up to EOS is the reference (stopping included)

    @property
    def bits_per_char(self) -> float:
        return self.nll_nats / math.log(2) / self.chars if self.chars else float("nan")

    @property
    def char_perplexity(self) -> float:
        return 2.0 ** self.bits_per_char

    @property
    def accuracy(self) -> float | None:
        """Prefix match rate."""
        return self.correct / self.answered if self.answered else None

    @property
    def exact_match(self) -> float | None:
        """Exact match rate of the whole answer, stopping included."""
        return self.exact / self.answered if self.answered else None


def evaluate(cfg: EvalConfig) -> EvalResult:
    from logitcache.pipeline.loading import load_causal_lm, load_tokenizer
    from logitcache.pipeline.device import resolve_device

    if cfg.batch_size <= 0:
        raise LogitCacheError(f"--batch-size must be positive (got {cfg.batch_size}).")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise LogitCacheError(f"--max-new-tokens must be positive (got {cfg.max_new_tokens}).")
    check_log_every(cfg.log_every)
    ds = load_records(cfg.data, cfg.split)
    template = cfg.template.resolved(list(ds.column_names))
    device = resolve_device(cfg.device)
    tok = load_tokenizer(cfg.model, "--model", trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(cfg.model, "--model", trust_remote_code=cfg.trust_remote_code).to(device).eval()
    add_special = add_special_tokens_for(template)
    records = [(ex.text, ex.spans) for ex in iter_examples(ds, template, tok, cfg.limit) if ex.text.strip() and ex.spans]
    if not records:
        raise LogitCacheError(f"--data {cfg.data}: no record with text to evaluate.")
    result = EvalResult(examples=len(records), chars=0, nll_nats=0.0, answered=0, correct=0)
    max_len = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    with _progress(cfg, "eval loss", len(records)) as bar:
        for a in range(0, len(records), cfg.batch_size):
            _score_batch(model, tok, records[a : a + cfg.batch_size], add_special, max_len, device, result)
            bar.update(min(a + cfg.batch_size, len(records)), note=f"{result.bits_per_char:.4f} bits/char")
    if cfg.accuracy and template.kind != "text":
        # The answer is the last target span, continued from everything before it.
        answers = [(text[: spans[-1][0]], text[spans[-1][0] : spans[-1][1]]) for text, spans in records]
        max_new = cfg.max_new_tokens or 4 + max(len(tok(r, add_special_tokens=False)["input_ids"]) for _, r in answers)
        with _progress(cfg, "eval answers", len(answers)) as bar:
            for a in range(0, len(answers), cfg.batch_size):
                _greedy_batch(model, tok, answers[a : a + cfg.batch_size], add_special, max_new, device, result)
                bar.update(result.answered, note=f"{result.exact / result.answered:.1%} exact match")
    return result


def _progress(cfg: EvalConfig, label: str, total: int) -> StepProgress:
    # stderr: stdout holds the result alone (`eval --json` is read by scripts).
    return StepProgress(label, total, unit="examples", bar=progress_enabled(cfg.progress), interval=cfg.log_every or 0.0,
                        stream=sys.stderr, silent=cfg.log_every is None)


@torch.inference_mode()
def _score_batch(model, tok, batch, add_special, max_len, device, result: EvalResult) -> None:
    seqs, targets = [], []
    eos = tok.eos_token_id
    for text, spans in batch:
        ids, starts, ends = encode_with_offsets(tok, text, add_special_tokens=add_special)
        has_end = eos is not None and len(ids) > 0 and ids[-1] == eos and starts[-1] == ends[-1] == len(text)
        if has_end:  # the tokenizer put its EOS there itself: keep the spans of the text's tokens
            starts, ends = starts[:-1], ends[:-1]
        elif eos is not None:
            ids = list(ids) + [eos]  # the end of the answer is scored, as in training (features.py)
        cut = len(ids) > max_len
        ids, starts, ends = ids[:max_len], starts[:max_len], ends[:max_len]
        t = target_positions(starts, ends, spans)
        if len(t):  # characters actually scored: from the first scored token's start
            result.chars += _chars_scored(starts, ends, t, spans)
        if eos is not None and not cut and ends_at_text_end(np.asarray(spans), len(text)):
            t = np.append(t, len(ids) - 2)
        seqs.append(ids)
        targets.append(t)
    input_ids, attn = pad_sequences(seqs, pad_token_id(tok))
    logp = torch.log_softmax(model(input_ids=input_ids.to(device), attention_mask=attn.to(device)).logits.float(), -1)
    for i, t in enumerate(targets):
        if len(t):
            t = torch.as_tensor(t, device=device)
            result.nll_nats -= float(logp[i, t, input_ids[i, t + 1].to(device)].sum())


def _chars_scored(starts: np.ndarray, ends: np.ndarray, t: np.ndarray, spans) -> int:
    """Characters the scored tokens cover, per span from its first scored token's start (one span: as before)."""
    if len(spans) == 1:
        return int(ends[t[-1] + 1]) - int(starts[t[0] + 1])
    sp = target_span_index(starts, ends, t, spans)
    total = 0
    for j in np.unique(sp):
        tj = t[sp == j]
        total += int(ends[tj[-1] + 1]) - int(starts[tj[0] + 1])
    return total


@torch.inference_mode()
def _greedy_batch(model, tok, batch, add_special, max_new, device, result: EvalResult) -> None:
    prompts = [tok(p, add_special_tokens=add_special)["input_ids"] for p, _ in batch]
    pad = pad_token_id(tok)
    input_ids, attn = pad_sequences(prompts, pad, "left")  # generation continues right after each prompt
    T = input_ids.shape[1]
    eos = tok.eos_token_id
    stop = {} if eos is None else {"eos_token_id": eos}
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new,
        do_sample=False, pad_token_id=pad, **stop,
    )
    for i, (_, response) in enumerate(batch):
        new = out[i, T:].tolist()
        stopped = eos is None or eos in new
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        continuation = tok.decode(new, skip_special_tokens=True).strip()
        reference = response.strip()
        result.answered += 1
        result.correct += continuation.startswith(reference)
        if tok.eos_token and reference.endswith(tok.eos_token):  # a chat template's rendered end of turn
            reference = reference[: -len(tok.eos_token)].strip()
        result.exact += stopped and continuation == reference
