"""The `vllm` teacher engine: teacher-forced scoring with vLLM's prompt log-probabilities (GPU).

API followed: the vLLM V1 offline API (``vllm.LLM``) as of vLLM 0.33, checked against the
0.12.0 and 0.33.0 sources; ``VLLM_SUPPORTED`` below is the range (pyproject's ``vllm``
extra repeats it by hand). What this module relies on, and why the range starts at 0.12:

- ``LLM(..., logprobs_mode="raw_logprobs", max_logprobs=k)``: log-probabilities of the raw
  logits (log-softmax in fp32 at temperature 1, before any logits processor), and room for
  k of them per position. Prompt logprobs are computed from the raw prompt logits in every
  V1 release (0.33's ModelConfig says so: processed_* and raw_* give the same prompt
  logprobs); ``logprobs_mode`` came with vllm-project/vllm#21398 (mid-2025); the V0 engine,
  which computed them differently, is gone since 0.11.
- ``SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=True)``
  on ``TokensPrompt(prompt_token_ids=...)``: ``RequestOutput.prompt_logprobs[0]`` is None
  (nothing predicts the first token) and entry j >= 1 maps token id -> ``Logprob(logprob,
  rank, decoded_token)`` for the top-k (ranks 1..k, torch.topk order) plus the actual token
  ``prompt_token_ids[j]`` with its rank in the full vocabulary (the number of tokens at least
  as likely, itself included). ``flat_logprobs`` (the GC-friendly ``FlatLogprobs``, same
  Sequence interface; vllm-project/vllm#28914) is a SamplingParams field from 0.12 on;
  ``detokenize=False`` spares decoding k + 1 tokens per position.
- ``enable_prefix_caching=False``: with prefix caching on, prompt logprobs can depend on the
  order in which requests are scheduled (vllm-project/vllm#42019); a cache must not.
- A decoder prompt must leave room for the one token vLLM always generates, so at most
  ``max_model_len - 1`` tokens are scored (``max_length``).
- Generation: ``CompletionOutput.token_ids`` keeps the end-of-sequence token that stopped it
  (``finish_reason == "stop"``); it is dropped, as the hf engine does. Each prompt samples
  with its own seed, derived from ``GenerationConfig.seed`` and the prompt.
- The range ends below 0.34, the first release line not checked: vLLM's Python API changes
  between minor releases.

What vLLM does not return: the log-normaliser of the raw logits. ``logsumexp`` is stored as
0.0 (verify rejects NaN) and ``describe()`` records ``"logsumexp": False``; a reader that
needs raw logits (``logprob + logsumexp``) must check that flag. Everything else in a row
(top-k ids and log-probabilities, the label's log-probability) matches the hf engine to
within the numerics of the two implementations.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.pipeline.loading import load_tokenizer
from logitcache.pipeline.offsets import require_fast_tokenizer
from logitcache.pipeline.teacher.engine import GenerationConfig, ScoredSequence
from logitcache.pipeline.teacher.hf import model_fingerprint

# The vLLM releases this module is written against (pyproject: the `vllm` extra, by hand).
VLLM_SUPPORTED = ">=0.12,<0.34"
# Set to 1 to run with a vLLM outside that range anyway (a warning instead of an error).
ALLOW_ANY_VLLM_ENV = "LOGITCACHE_ALLOW_ANY_VLLM"

_DTYPES = {
    "auto": "auto",
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}


def check_vllm_version(version: str, supported: str = VLLM_SUPPORTED) -> None:
    """Raise LogitCacheError unless ``version`` is in ``supported`` (a PEP 440 specifier)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion as e:
        raise LogitCacheError(
            f"vLLM reports the version {version!r}, which is not a version number; "
            f"logitcache supports vllm{supported}."
        ) from e
    # Nightly builds (0.33.1.dev5+g1234abc) count as the release they lead up to.
    if SpecifierSet(supported).contains(parsed, prereleases=True):
        return
    raise LogitCacheError(
        f"vLLM {version} is installed; the vllm engine supports vllm{supported}. Install a supported "
        f"release (`pip install 'logitcache[vllm]'`, or the Dockerfile.vllm image), or use --engine hf. "
        f"To try this vLLM anyway, set {ALLOW_ANY_VLLM_ENV}=1."
    )


def _import_vllm():
    if importlib.util.find_spec("vllm") is None:
        raise LogitCacheError(
            "--engine vllm needs vLLM, which is not installed. On a Linux machine with an NVIDIA GPU run "
            "`pip install 'logitcache[vllm]'` (or use the Dockerfile.vllm image); elsewhere use --engine hf."
        )
    try:
        import vllm
    except ImportError as e:
        raise LogitCacheError(
            f"vLLM is installed but cannot be imported ({e}); reinstall it with `pip install 'logitcache[vllm]'` "
            "on a CUDA machine, or use --engine hf."
        ) from e
    version = str(getattr(vllm, "__version__", "unknown"))
    if os.environ.get(ALLOW_ANY_VLLM_ENV, "") not in ("", "0"):
        try:
            check_vllm_version(version)
        except LogitCacheError:
            warnings.warn(
                f"vLLM {version} is outside the supported vllm{VLLM_SUPPORTED}; going on because "
                f"{ALLOW_ANY_VLLM_ENV} is set.",
                stacklevel=3,
            )
    else:
        check_vllm_version(version)
    return vllm


# --- vLLM's prompt logprobs -> one row's arrays --------------------------------------------
def scored_from_prompt_logprobs(
    prompt_token_ids: Sequence[int], prompt_logprobs: Sequence[Mapping[int, Any] | None], k: int
) -> ScoredSequence:
    """Convert one ``RequestOutput.prompt_logprobs`` (requested with ``prompt_logprobs=k``).

    ``prompt_logprobs[0]`` is None; ``prompt_logprobs[j]`` (j >= 1) maps token id -> an object
    with ``.logprob`` and ``.rank`` (vLLM's ``Logprob``) and holds the top-k (ranks 1..k) plus
    the actual token ``prompt_token_ids[j]`` (rank > k when outside the top-k). Position
    p = j - 1 predicts token j. Raises ValueError on anything else.

    ``logsumexp`` is not known from vLLM's output and is returned as zeros (see the module doc).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k}).")
    ids = np.asarray(prompt_token_ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size < 1:
        raise ValueError(f"prompt_token_ids must be a non-empty list of ids (got shape {ids.shape}).")
    n = ids.size
    if len(prompt_logprobs) != n:
        raise ValueError(
            f"prompt_logprobs has {len(prompt_logprobs)} entries for {n} prompt tokens; expected one per token."
        )
    if prompt_logprobs[0]:  # None ({} in a FlatLogprobs): nothing predicts the first token
        raise ValueError("prompt_logprobs[0] must be None: nothing predicts the first prompt token.")
    flat = _from_flat_logprobs(ids, prompt_logprobs, k)
    if flat is not None:
        return _finish(*flat)

    topk_ids = np.empty((n - 1, k), dtype=np.int64)
    topk_lp = np.empty((n - 1, k), dtype=np.float64)
    label = np.empty(n - 1, dtype=np.float64)
    want_ranks = list(range(1, k + 1))
    for j in range(1, n):
        entry, token, where = prompt_logprobs[j], int(ids[j]), f"prompt_logprobs[{j}]"
        if not entry:
            raise ValueError(f"{where} is empty; expected the top-{k} and the actual token {token}.")
        if token not in entry:
            raise ValueError(f"{where} lacks the actual next token {token} (vLLM always includes it).")
        if len(entry) == k:  # the actual token is one of the top-k
            top = list(entry.items())
        elif len(entry) == k + 1:  # the actual token is outside the top-k
            rank = entry[token].rank
            if not isinstance(rank, (int, np.integer)) or rank <= k:
                raise ValueError(
                    f"{where}: the actual token {token} is not among the top-{k} but has rank {rank!r} (expected > {k})."
                )
            top = [(t, lp) for t, lp in entry.items() if t != token]
        else:
            raise ValueError(
                f"{where} has {len(entry)} entries; expected {k} (actual token in the top-{k}) or {k + 1}. "
                f"Was it requested with prompt_logprobs={k}?"
            )
        ranks = [lp.rank for _, lp in top]
        if not all(isinstance(r, (int, np.integer)) for r in ranks) or sorted(ranks) != want_ranks:
            raise ValueError(f"{where}: the top-{k} ranks are {sorted(ranks, key=str)}, expected 1..{k}.")
        top.sort(key=lambda item: item[1].rank)
        topk_ids[j - 1] = [t for t, _ in top]
        topk_lp[j - 1] = [lp.logprob for _, lp in top]
        label[j - 1] = entry[token].logprob
    return _finish(topk_ids, topk_lp, label)


def _from_flat_logprobs(ids: np.ndarray, pl: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Vectorised path for vLLM's ``FlatLogprobs`` (``flat_logprobs=True``), whose position j >= 1
    is laid out as [actual token, top-1, ..., top-k]. Returns None when ``pl`` is not one or
    its layout is anything else: the per-position path then reads it (or rejects it)."""
    try:
        starts = np.asarray(pl.start_indices, dtype=np.int64)
        ends = np.asarray(pl.end_indices, dtype=np.int64)
        tok = np.asarray(pl.token_ids, dtype=np.int64)
        lps = np.asarray(pl.logprobs, dtype=np.float64)
        ranks = np.asarray(pl.ranks, dtype=np.int64)
    except (AttributeError, TypeError, ValueError):
        return None
    n = ids.size
    if starts.shape != (n,) or ends.shape != (n,) or ends[0] != starts[0]:
        return None
    if not (tok.shape == lps.shape == ranks.shape and tok.ndim == 1):
        return None
    starts, ends = starts[1:], ends[1:]
    if n > 1 and ((ends - starts != k + 1).any() or starts.min() < 0 or ends.max() > tok.size):
        return None
    idx = starts[:, None] + np.arange(k + 1)  # [n - 1, k + 1]
    if (tok[idx[:, 0]] != ids[1:]).any() or (ranks[idx[:, 1:]] != np.arange(1, k + 1)).any():
        return None
    topk_ids, topk_lp = tok[idx[:, 1:]], lps[idx[:, 1:]]
    outside = (topk_ids != ids[1:, None]).all(axis=1)
    if (ranks[idx[outside, 0]] <= k).any():
        return None  # inconsistent: the per-position path reports it
    return topk_ids, topk_lp, lps[idx[:, 0]]


def _finish(topk_ids: np.ndarray, topk_lp: np.ndarray, label: np.ndarray) -> ScoredSequence:
    if np.isnan(topk_lp).any() or np.isnan(label).any():
        raise ValueError("vLLM returned NaN log-probabilities.")
    if topk_lp.size and (np.diff(topk_lp, axis=1) > 0).any():
        raise ValueError("the top-k log-probabilities do not decrease with rank.")
    return ScoredSequence(
        topk_ids=topk_ids.astype(np.int32),
        topk_logprobs=topk_lp.astype(np.float32),
        label_logprob=label.astype(np.float32),
        logsumexp=np.zeros(label.shape, dtype=np.float32),  # not available from vLLM
    )


def _validation_errors() -> tuple[type[BaseException], ...]:
    """What SamplingParams raises for a bad value: ValueError, and
    VLLMValidationError (newer releases), which is not a ValueError."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMValidationError)


def _request_seed(seed: int, prompt: Sequence[int]) -> int:
    """A per-prompt sampling seed: reproducible whatever the batching or worker split, and not
    the same random stream for every prompt (which one shared seed would give)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(np.asarray(prompt, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


class VLLMTeacher:
    """A teacher served by vLLM on CUDA: the same rows as the hf engine, faster on big models."""

    name = "vllm"
    # No log-normaliser from vLLM, so no log-normaliser at other temperatures and no statistics
    # of the full logits either (run.py refuses --temperatures / --logit-stats / --word-start with this engine).
    temperatures: tuple[float, ...] = ()
    logit_stats = False
    word_start = False

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_logprobs: int = 64,
        seed: int = 0,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        """``engine_args``: further keyword arguments for ``vllm.LLM`` (e.g. ``enforce_eager``,
        ``max_num_batched_tokens``, ``quantization``)."""
        if dtype not in _DTYPES:
            raise LogitCacheError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16.")
        if max_logprobs < 1:
            raise LogitCacheError(f"--top-k must be a positive integer (got {max_logprobs}).")
        if tensor_parallel_size < 1:
            raise LogitCacheError(f"--tensor-parallel-size must be at least 1 (got {tensor_parallel_size}).")
        if not 0 < gpu_memory_utilization <= 1:
            raise LogitCacheError(f"--gpu-memory-utilization must be in (0, 1] (got {gpu_memory_utilization}).")
        if max_model_len is not None and max_model_len < 2:
            raise LogitCacheError(f"--max-model-len must be at least 2 tokens (got {max_model_len}).")
        extra = dict(engine_args or {})
        if "logprobs_mode" in extra:
            raise LogitCacheError("the vllm engine always uses logprobs_mode='raw_logprobs'; do not override it.")

        vllm = _import_vllm()  # before anything slow: a missing or wrong vLLM fails in a second
        self._vllm = vllm
        self.vllm_version = str(vllm.__version__)
        self.model_name = model
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self.tensor_parallel_size = tensor_parallel_size
        self.max_logprobs = max_logprobs
        self.seed = seed
        # Character offsets come from this (the hf engine's) tokenizer, not from vLLM.
        self.tokenizer = load_tokenizer(model, "--model", revision=revision, trust_remote_code=trust_remote_code)
        require_fast_tokenizer(self.tokenizer, "teacher tokenizer")
        self.fingerprint = model_fingerprint(model, revision)

        kwargs: dict[str, Any] = dict(
            model=model,
            tokenizer=model,
            revision=revision,
            tokenizer_revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=_DTYPES[dtype],
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_logprobs=max_logprobs,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=False,
            seed=seed,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(extra)
        try:
            self.llm = vllm.LLM(**kwargs)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LogitCacheError(f"--model {model}: vLLM could not load it ({first}).") from e
        self._model_config = self.llm.llm_engine.model_config
        self._vocab_size: int | None = None

    # --- facts the pipeline needs ------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Width of vLLM's logits: the model config's vocab_size (its text config for
        multimodal models), which is what vLLM's top-k ranges over."""
        if self._vocab_size is None:
            n = int(self._model_config.get_vocab_size() or 0)
            if n <= 0:  # not in vLLM's view of the config: ask transformers
                from transformers import AutoConfig

                cfg = AutoConfig.from_pretrained(
                    self.model_name, revision=self.revision, trust_remote_code=self.trust_remote_code
                )
                n = int(getattr(cfg.get_text_config(), "vocab_size", 0) or 0)
            self._vocab_size = n
        return self._vocab_size

    @property
    def max_length(self) -> int | None:
        """Tokens one sequence may have: vLLM needs room for the one token it generates."""
        return int(self._model_config.max_model_len) - 1

    def describe(self) -> dict:
        cfg = getattr(self._model_config, "hf_config", None)
        archs = getattr(cfg, "architectures", None) or [getattr(self._model_config, "architecture", "unknown")]
        return {
            "engine": self.name,
            "name": self.model_name,
            "revision": self.revision or getattr(cfg, "_commit_hash", None),
            "fingerprint": self.fingerprint,
            "dtype": str(self._model_config.dtype).removeprefix("torch."),
            "vocab_size": self.vocab_size,
            "architecture": archs[0],
            "vllm_version": self.vllm_version,
            "tensor_parallel_size": self.tensor_parallel_size,
            # The logsumexp column holds 0.0: vLLM does not return the raw logits' normaliser.
            "logsumexp": False,
        }

    # --- scoring -----------------------------------------------------------------------
    def _prompts(self, seqs: Sequence[Sequence[int]], room: int) -> list:
        limit = int(self._model_config.max_model_len) - room
        prompts = []
        for i, s in enumerate(seqs):
            if len(s) < 1:
                raise LogitCacheError(f"sequence {i} is empty; the vllm engine needs at least one token.")
            if len(s) > limit:
                raise LogitCacheError(
                    f"a sequence of {len(s)} tokens does not fit: vLLM's max_model_len is "
                    f"{self._model_config.max_model_len} and {room} token(s) must stay free; "
                    "lower --max-length or raise --max-model-len."
                )
            prompts.append(self._vllm.TokensPrompt(prompt_token_ids=[int(t) for t in s]))
        return prompts

    def score(self, seqs: Sequence[Sequence[int]], k: int) -> list[ScoredSequence]:
        """Top-k of every next-token prediction along each sequence, from vLLM's prompt logprobs."""
        if not seqs:
            return []
        if k > self.max_logprobs:
            raise LogitCacheError(
                f"--top-k {k} exceeds the max_logprobs={self.max_logprobs} this vLLM engine was started with."
            )
        prompts = self._prompts(seqs, room=1)
        # The one generated token is discarded; greedy leaves the RNG alone.
        params = self._vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False, flat_logprobs=True
        )
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        if len(outs) != len(seqs):
            raise LogitCacheError(f"vLLM returned {len(outs)} outputs for {len(seqs)} sequences.")
        scored = []
        for s, out in zip(seqs, outs):
            if out.prompt_token_ids is not None and list(out.prompt_token_ids) != [int(t) for t in s]:
                raise LogitCacheError("vLLM scored different token ids than it was given (request order mixed up?).")
            if out.prompt_logprobs is None:
                raise LogitCacheError("vLLM returned no prompt logprobs although they were requested.")
            scored.append(scored_from_prompt_logprobs(s, out.prompt_logprobs, k))
        return scored

    def generate(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> list[list[int]]:
        """The new tokens after each prompt, up to (not including) the end-of-sequence token."""
        if not prompts:
            return []
        inputs = self._prompts(prompts, room=1)
        common = dict(temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_new_tokens, detokenize=False)
        try:
            if gen.temperature > 0:
                params: Any = [
                    self._vllm.SamplingParams(**common, seed=_request_seed(gen.seed, p)) for p in prompts
                ]
            else:
                params = self._vllm.SamplingParams(**common)
        except _validation_errors() as e:  # vLLM's own limits, e.g. temperature <= 2
            raise LogitCacheError(f"the vllm engine rejects these generation settings: {e}") from e
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        if len(outs) != len(prompts):
            raise LogitCacheError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts.")
        responses = []
        for out in outs:
            completion = out.outputs[0]
            ids = [int(t) for t in completion.token_ids]
            reason = completion.finish_reason
            if reason == "stop":
                # No stop strings are set, so vLLM stopped on an end-of-sequence token, which
                # it keeps as the last of token_ids.
                ids = ids[:-1]
            elif reason != "length":
                raise LogitCacheError(f"vLLM ended a generation with finish_reason={reason!r}.")
            responses.append(ids)
        return responses
