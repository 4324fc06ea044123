"""The `hf` teacher engine: any transformers causal LM, on CPU or CUDA.

The decoder runs once per batch; the LM head is then applied a chunk of positions at a
time (see topk.py), so the ``[B, T, V]`` logits never exist. Models that transform the
logits after the head (Gemma's soft-capping, Cohere's and Granite's scaling) take the
plain ``model(...).logits`` path instead; a start-up self-check catches any other model
whose head path disagrees with its own forward.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from logitcache.pipeline.device import resolve_device, resolve_dtype
from logitcache.pipeline.loading import load_causal_lm, load_tokenizer
from logitcache.pipeline.offsets import require_fast_tokenizer
from logitcache.pipeline.padding import pad_sequences, pad_token_id
from logitcache.pipeline.teacher.engine import GenerationConfig, ScoredSequence
from logitcache.pipeline.token_bytes import word_start_mask
from logitcache.pipeline.teacher.draws import draw_uniforms
from logitcache.pipeline.teacher.topk import TopK, chunked_topk, chunked_topk_from_logits_fn
from logitcache.storage.samples import counts_from_draws

# Config attributes of models whose logits are not just lm_head(hidden).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def model_fingerprint(name: str, revision: str | None) -> str:
    """A cheap identity of the weights: config + weight file names/sizes for a local model,
    the revision for a hub one (hashing hundreds of GB of weights is not cheap)."""
    path = Path(name)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.iterdir()):
            if p.name == "config.json":
                h.update(p.read_bytes())
            elif p.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
                h.update(f"{p.name}:{p.stat().st_size}".encode())
        return h.hexdigest()
    return f"{name}@{revision or 'main'}"


class HFTeacher:
    """Loads a causal LM and its fast tokenizer; scores token sequences."""

    name = "hf"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        chunk: int = 1024,
        temperatures: tuple[float, ...] = (),
        logit_stats: bool = False,
        word_start: bool = False,
        sample: int = 0,
    ) -> None:
        self.model_name = model
        self.sample = int(sample)
        self.temperatures = tuple(float(t) for t in temperatures)
        self.logit_stats = logit_stats
        self.word_start = word_start
        self.revision = revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.chunk = chunk
        self.tokenizer = load_tokenizer(model, "--model", revision=revision, trust_remote_code=trust_remote_code)
        require_fast_tokenizer(self.tokenizer, "teacher tokenizer")
        self.model = load_causal_lm(
            model, "--model", revision=revision, dtype=self.dtype, trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval()
        self.fingerprint = model_fingerprint(model, revision)
        self._decoder = self._head = None
        self.uses_head_path = self._setup_head_path()
        self._word_start_ids = (
            torch.from_numpy(word_start_mask(self.tokenizer, self.vocab_size)).to(self.device) if word_start else None
        )

    # --- facts the pipeline needs ------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Width of the logits (may exceed len(tokenizer) when the embedding is padded)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_length(self) -> int | None:
        n = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
        return int(n) if n else None

    def describe(self) -> dict:
        return {
            "engine": self.name,
            "name": self.model_name,
            "revision": self.revision or getattr(self.model.config, "_commit_hash", None),
            "fingerprint": self.fingerprint,
            "dtype": str(self.dtype).removeprefix("torch."),
            "vocab_size": self.vocab_size,
            "architecture": (getattr(self.model.config, "architectures", None) or [type(self.model).__name__])[0],
        }

    # --- the LM head, a chunk at a time -----------------------------------------------
    def _setup_head_path(self) -> bool:
        cfg = self.model.config
        if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
            return False
        try:
            decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return False
        if decoder is None or head is None or decoder is self.model:
            return False
        self._decoder, self._head = decoder, head
        # Self-check on a short input: the head path must reproduce the model's own logits.
        ids = torch.arange(min(8, self.vocab_size), device=self.device)[None]
        try:
            with torch.inference_mode():
                want = self.model(input_ids=ids).logits.float()
                got = head(decoder(input_ids=ids).last_hidden_state).float()
        except Exception:  # an unusual model: use its own forward
            return False
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        return bool(torch.allclose(want, got, rtol=tol, atol=tol))

    # --- scoring -----------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, seqs: Sequence[Sequence[int]], k: int, *, keys: Sequence[int] | None = None) -> list[ScoredSequence]:
        """Top-k of every next-token prediction along each sequence (one batch, padded here); with
        ``sample``, that many draws per position too, keyed by ``keys`` (one per sequence)."""
        if not seqs:
            return []
        uniforms = None
        if self.sample:
            if keys is None or len(keys) != len(seqs):
                raise ValueError("an engine made with sample=N needs one draw key per sequence (keys=)")
            uniforms = torch.from_numpy(draw_uniforms(list(keys), [max(len(s) - 1, 0) for s in seqs], self.sample))
        lens = torch.tensor([len(s) for s in seqs])
        input_ids, attn = pad_sequences(seqs, pad_token_id(self.tokenizer), self.tokenizer.padding_side)
        # Explicit positions: with left padding the first real token must still be position 0.
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        # Predicting positions: real tokens that have a next token.
        next_ids = torch.roll(input_ids, -1, dims=1)
        pred = attn.bool() & torch.roll(attn, -1, dims=1).bool()
        pred[:, -1] = False
        inputs = dict(
            input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device),
            position_ids=position_ids.to(self.device), use_cache=False,
        )
        labels = next_ids[pred].to(self.device)
        if self.uses_head_path:
            hidden = self._decoder(**inputs).last_hidden_state[pred.to(self.device)]
            top = chunked_topk(hidden, self._head, labels, k, self.chunk, temperatures=self.temperatures,
                               stats=self.logit_stats, word_start=self._word_start_ids, uniforms=uniforms)
        else:
            logits = self.model(**inputs).logits
            bi, ti = pred.to(self.device).nonzero(as_tuple=True)
            top = chunked_topk_from_logits_fn(
                lambda a, b: logits[bi[a:b], ti[a:b]], len(bi), labels, k, self.chunk,
                temperatures=self.temperatures, stats=self.logit_stats, word_start=self._word_start_ids,
                uniforms=uniforms,
            )
        return _split(top, (lens - 1).tolist())

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> list[list[int]]:
        """Sample (or, at temperature 0, greedily pick) a response after each prompt."""
        if not prompts:
            return []
        pad = pad_token_id(self.tokenizer)
        input_ids, attn = pad_sequences(prompts, pad, "left")  # every response starts at column T
        T = input_ids.shape[1]
        torch.manual_seed(gen.seed)
        sample = gen.temperature > 0
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device),
            max_new_tokens=gen.max_new_tokens, do_sample=sample, pad_token_id=pad,
            **({"temperature": gen.temperature, "top_p": gen.top_p, "top_k": 0} if sample else {}),
        )
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        responses = []
        for row in out[:, T:].tolist():
            # Up to (not including) the first end-of-sequence; generate pads only after it.
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            responses.append(row[:cut])
        return responses


def _split(top: TopK, counts: list[int]) -> list[ScoredSequence]:
    def f32(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.cpu().numpy().astype(np.float32)

    lp = f32(top.logprobs)  # the codec rounds (v1: to fp16)
    ids = top.ids.cpu().numpy().astype(np.int32)
    label, lse = f32(top.label_logprob), f32(top.logsumexp)
    extra = {"lse_tau": f32(top.lse_tau), "logit_mean": f32(top.logit_mean),
             "logit_std": f32(top.logit_std), "lse_std": f32(top.lse_std),
             "word_start_logprob": f32(top.word_start_logprob)}
    if top.sample_ids is not None:
        extra["sample_ids"], extra["sample_counts"] = counts_from_draws(top.sample_ids.cpu().numpy())
    out, a = [], 0
    for c in counts:
        more = {name: v[a : a + c] for name, v in extra.items() if v is not None}
        out.append(ScoredSequence(ids[a : a + c], lp[a : a + c], label[a : a + c], lse[a : a + c], **more))
        a += c
    return out
