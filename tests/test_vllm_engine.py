"""The vllm engine: its conversion of vLLM's prompt logprobs, version check, and glue code.

vLLM itself is not installed here (CUDA-only). The conversion is tested on outputs built in
the shape vLLM documents and produces (``vllm/logprobs.py``: a dict per position, the actual
token first, then the top-k with ranks 1..k; or the same entries in a ``FlatLogprobs``);
the engine's glue is tested against a stand-in ``vllm`` module whose ``LLM`` computes those
outputs from the tiny teacher; the real engine is tested under ``-m gpu``.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from logitcache.errors import LogitCacheError
from logitcache.pipeline.teacher.engine import GenerationConfig
from logitcache.pipeline.teacher.hf import HFTeacher
from logitcache.pipeline.teacher.vllm import (
    ALLOW_ANY_VLLM_ENV,
    VLLM_SUPPORTED,
    VLLMTeacher,
    _from_flat_logprobs,
    check_vllm_version,
    scored_from_prompt_logprobs,
)

TEXTS = [
    "Q: What is 3 plus 4?\nA: 3 plus 4 is 7.",
    "Café crème à Zürich — 東京 🎉",
    "short",
    "The capital of Freedonia is Zorvik. The capital of Genovia is Pyrus.",
]


# --- vLLM-shaped outputs --------------------------------------------------------------
@dataclass
class Lp:
    """Stands for vllm.logprobs.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeFlatLogprobs:
    """Stands for vllm.logprobs.FlatLogprobs (same fields, same Sequence behaviour)."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append_fast(self, token_ids, logprobs, ranks) -> None:
        self.start_indices.append(len(self.logprobs))
        for t, lp, r in zip(token_ids, logprobs, ranks):
            self.token_ids.append(t)
            self.logprobs.append(lp)
            self.ranks.append(r)
            self.decoded_tokens.append(None)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, i: int):
        return {
            self.token_ids[a]: Lp(self.logprobs[a], self.ranks[a], self.decoded_tokens[a])
            for a in range(self.start_indices[i], self.end_indices[i])
        }


def vllm_shaped(ids: list[int], logp: np.ndarray, k: int, *, flat: bool = False):
    """What vLLM returns for prompt ``ids`` with prompt_logprobs=k, given the log-probabilities
    ``logp`` [n - 1, V] (row p predicts ids[p + 1]): as vllm/logprobs.py builds it, the actual
    token first (rank = 1 + #tokens at least as likely... counted with >=, itself included),
    then the top-k in torch.topk order with ranks 1..k."""
    t = torch.as_tensor(logp)
    vals, top = t.topk(k, dim=-1)
    out: Any = FakeFlatLogprobs() if flat else []
    if flat:
        out.append_fast([], [], [])
    else:
        out.append(None)
    for p in range(len(ids) - 1):
        actual = ids[p + 1]
        rank = int((t[p] >= t[p, actual]).sum())
        tok = [actual] + top[p].tolist()
        lps = [float(t[p, actual])] + vals[p].tolist()
        ranks = [rank] + list(range(1, k + 1))
        if flat:
            out.append_fast(tok, lps, ranks)
        else:  # a dict: a repeated actual token keeps its first place, with the top-k value
            out.append({a: Lp(b, c) for a, b, c in zip(tok, lps, ranks)})
    return out


# --- the conversion ---------------------------------------------------------------------
def test_hand_worked_example():
    # k = 2, prompt [5, 7, 3].
    # Position 0 predicts 7: top-2 is 2 (-0.5), 7 (-1.25); the actual token is inside.
    # Position 1 predicts 3: top-2 is 1 (-0.25), 4 (-1.5); 3 (-3.0, rank 5) is outside.
    # The dicts list entries out of rank order: the output must follow the ranks.
    pl = [
        None,
        {7: Lp(-1.25, 2), 2: Lp(-0.5, 1)},
        {3: Lp(-3.0, 5), 4: Lp(-1.5, 2), 1: Lp(-0.25, 1)},
    ]
    s = scored_from_prompt_logprobs([5, 7, 3], pl, 2)
    assert s.topk_ids.dtype == np.int32 and s.topk_ids.tolist() == [[2, 7], [1, 4]]
    assert s.topk_logprobs.dtype == np.float32 and s.topk_logprobs.tolist() == [[-0.5, -1.25], [-0.25, -1.5]]
    assert s.label_logprob.dtype == np.float32 and s.label_logprob.tolist() == [-1.25, -3.0]
    assert s.logsumexp.dtype == np.float32 and s.logsumexp.tolist() == [0.0, 0.0]


def test_single_token_has_no_positions():
    s = scored_from_prompt_logprobs([9], [None], 4)
    assert s.topk_ids.shape == (0, 4) and s.topk_logprobs.shape == (0, 4)
    assert s.label_logprob.shape == (0,) and s.logsumexp.shape == (0,)


@pytest.mark.parametrize("flat", [False, True])
def test_actual_token_inside_and_outside_the_topk(flat):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-logp, axis=1)
    k = 5
    # Labels: in the top-k at ranks 1, 3, 5; outside at ranks 6 (just outside), 20, 50 (last).
    ids = [0] + [int(order[p, r]) for p, r in enumerate([0, 2, 4, 5, 19, 49])]
    s = scored_from_prompt_logprobs(ids, vllm_shaped(ids, logp, k, flat=flat), k)
    np.testing.assert_array_equal(s.topk_ids, order[:, :k])
    np.testing.assert_array_equal(s.topk_logprobs, np.take_along_axis(logp, order[:, :k], 1).astype(np.float32))
    np.testing.assert_allclose(s.label_logprob, logp[np.arange(6), ids[1:]], rtol=1e-6)
    inside = (s.topk_ids == np.asarray(ids[1:])[:, None]).any(1)
    assert inside.tolist() == [True, True, True, False, False, False]


def test_ties_at_the_kth_entry():
    # The actual token 3 is as likely as the 2nd entry, but the top-2 holds token 1: vLLM gives
    # token 3 rank 3 (three tokens at least as likely) and keeps it outside the top-2.
    a, b = float(np.log(0.4)), float(np.log(0.2))
    ids = [0, 3]
    as_dict = [None, {3: Lp(b, 3), 0: Lp(a, 1), 1: Lp(b, 2)}]
    as_flat = FakeFlatLogprobs()
    as_flat.append_fast([], [], [])
    as_flat.append_fast([3, 0, 1], [b, a, b], [3, 1, 2])
    for form in (as_dict, as_flat):
        s = scored_from_prompt_logprobs(ids, form, 2)
        assert s.topk_ids.tolist() == [[0, 1]]
        assert s.label_logprob[0] == pytest.approx(b, rel=1e-6)
        assert s.label_logprob[0] == s.topk_logprobs[0, -1].astype(np.float32) or np.isclose(
            s.label_logprob[0], s.topk_logprobs[0, -1], rtol=2**-10
        )


def test_flat_logprobs_take_the_vectorised_path_and_agree():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 300)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = [7] + rng.integers(0, 300, size=40).tolist()
    ids[5] = int(np.argmax(logp[4]))  # some labels inside the top-k
    flat = vllm_shaped(ids, logp, 8, flat=True)
    assert _from_flat_logprobs(np.asarray(ids), flat, 8) is not None
    a = scored_from_prompt_logprobs(ids, flat, 8)
    b = scored_from_prompt_logprobs(ids, vllm_shaped(ids, logp, 8), 8)
    c = scored_from_prompt_logprobs(ids, list(flat), 8)  # FlatLogprobs read position by position
    for other in (b, c):
        for name in ("topk_ids", "topk_logprobs", "label_logprob", "logsumexp"):
            np.testing.assert_array_equal(getattr(a, name), getattr(other, name))


@pytest.fixture(scope="module")
def hf_engine(teacher_dir):
    return HFTeacher(str(teacher_dir), dtype="float32", device="cpu")


@pytest.mark.parametrize("flat", [False, True])
def test_matches_the_hf_engine(hf_engine, flat):
    """vLLM-shaped outputs built from an independent forward agree with HFTeacher.score."""
    k = 16
    for text in TEXTS:
        ids = hf_engine.tokenizer(text)["input_ids"]
        (want,) = hf_engine.score([ids], k)
        with torch.no_grad():
            logits = hf_engine.model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        logp = torch.log_softmax(logits, -1).numpy()
        got = scored_from_prompt_logprobs(ids, vllm_shaped(ids, logp, k, flat=flat), k)
        assert got.topk_ids.shape == want.topk_ids.shape == (len(ids) - 1, k)
        # Identical ids wherever the ranking is not a near-tie between the two float paths.
        vals = np.sort(logp, axis=1)[:, ::-1][:, : k + 1]
        gap = np.diff(-vals, axis=1)  # gap[:, i] = vals[i] - vals[i + 1]
        clear = np.concatenate([np.full((len(gap), 1), np.inf), gap[:, :-1]], 1) > 1e-5
        clear &= gap[:, :k] > 1e-5
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(got.topk_ids[clear], want.topk_ids[clear])
        # fp16 storage: equal up to one fp16 rounding step.
        np.testing.assert_allclose(
            got.topk_logprobs.astype(np.float64), want.topk_logprobs.astype(np.float64), rtol=2**-10, atol=2**-14
        )
        np.testing.assert_allclose(got.label_logprob, want.label_logprob, rtol=1e-5, atol=1e-5)


def _good():
    return [None, {7: Lp(-1.25, 2), 2: Lp(-0.5, 1)}, {3: Lp(-3.0, 5), 4: Lp(-1.5, 2), 1: Lp(-0.25, 1)}]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda pl: pl.pop(), "2 entries for 3 prompt tokens"),
        (lambda pl: pl.__setitem__(0, {5: Lp(-1.0, 1)}), r"prompt_logprobs\[0\] must be None"),
        (lambda pl: pl.__setitem__(1, None), r"prompt_logprobs\[1\] is empty"),
        (lambda pl: pl[2].pop(3), r"lacks the actual next token 3"),
        (lambda pl: pl[1].pop(2), r"has 1 entries; expected 2"),
        (lambda pl: pl[2].update({8: Lp(-2.0, 3)}), r"has 4 entries; expected 2"),
        (lambda pl: pl[2].__setitem__(4, Lp(-1.5, 3)), r"ranks are \[1, 3\], expected 1..2"),
        (lambda pl: pl[1].__setitem__(7, Lp(-1.25, None)), r"ranks are"),
        (lambda pl: pl[2].__setitem__(3, Lp(-3.0, 2)), r"not among the top-2 but has rank 2"),
        (lambda pl: pl[2].__setitem__(4, Lp(float("nan"), 2)), "NaN"),
        (lambda pl: pl[2].__setitem__(4, Lp(-0.1, 2)), "do not decrease with rank"),
    ],
)
def test_malformed_outputs_raise(mutate, match):
    pl = _good()
    mutate(pl)
    with pytest.raises(ValueError, match=match):
        scored_from_prompt_logprobs([5, 7, 3], pl, 2)


def test_malformed_flat_outputs_raise():
    flat = FakeFlatLogprobs()
    flat.append_fast([], [], [])
    flat.append_fast([7, 2, 7], [-1.25, -0.5, -1.25], [2, 1, 2])
    flat.append_fast([3, 1], [-3.0, -0.25], [5, 1])  # only the top-1: requested with k=1, not 2
    with pytest.raises(ValueError, match=r"prompt_logprobs\[2\]: the top-2 ranks are \[1, 5\], expected 1..2"):
        scored_from_prompt_logprobs([5, 7, 3], flat, 2)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be"):
        scored_from_prompt_logprobs([5, 7], [None, {7: Lp(-1.0, 1)}], 0)
    with pytest.raises(ValueError, match="non-empty"):
        scored_from_prompt_logprobs([], [], 1)


# --- the version check ------------------------------------------------------------------
def test_supported_range_is_the_one_pinned_in_pyproject():
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (req,) = [Requirement(r) for r in extras["vllm"] if Requirement(r).name == "vllm"]
    assert req.specifier == SpecifierSet(VLLM_SUPPORTED)


@pytest.mark.parametrize("version", ["0.12.0", "0.20.2", "0.33.0", "0.33.1.dev5+g1234abc", "0.33.0+cu130"])
def test_supported_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.3.0", "0.11.2", "0.34.0", "0.34.0rc1", "1.0.0"])
def test_unsupported_versions_raise(version):
    with pytest.raises(LogitCacheError) as e:
        check_vllm_version(version)
    msg = str(e.value)
    assert f"vLLM {version} is installed" in msg and f"vllm{VLLM_SUPPORTED}" in msg and "--engine hf" in msg


def test_unparsable_version_raises():
    with pytest.raises(LogitCacheError, match="not a version number"):
        check_vllm_version("banana")


# --- the engine without vLLM, and with a stand-in vllm module ---------------------------
def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # absent, even where it is installed
    with pytest.raises(LogitCacheError) as e:
        VLLMTeacher("/no/such/model")
    assert "logitcache[vllm]" in str(e.value) and "--engine hf" in str(e.value)


def _module(version: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.__version__ = version
    for name, value in attrs.items():
        setattr(mod, name, value)
    return mod


def test_wrong_vllm_version_fails_before_loading_anything(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", _module("0.3.0"))
    with pytest.raises(LogitCacheError, match=r"vLLM 0\.3\.0 is installed; the vllm engine supports vllm>="):
        VLLMTeacher("/no/such/model")  # the version error, not a missing-model one


def test_wrong_vllm_version_can_be_allowed(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", _module("0.99.0"))
    monkeypatch.setenv(ALLOW_ANY_VLLM_ENV, "1")
    with pytest.warns(UserWarning, match="0.99.0"), pytest.raises(LogitCacheError, match="no such directory"):
        VLLMTeacher("/no/such/model")  # past the version check: fails on the model path


# Arguments that exist in every supported vLLM (checked in the 0.12.0 and 0.33.0 sources):
# an unknown one here would be a TypeError there.
_ENGINE_ARGS = {
    "model", "tokenizer", "revision", "tokenizer_revision", "trust_remote_code", "dtype",
    "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_logprobs",
    "logprobs_mode", "enable_prefix_caching", "seed", "enforce_eager",
}
_SAMPLING_ARGS = {
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "flat_logprobs", "detokenize", "skip_special_tokens", "stop", "stop_token_ids",
    "ignore_eos",
}


class FakeSamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - _SAMPLING_ARGS
        assert not unknown, f"not a SamplingParams field: {unknown}"
        if kwargs.get("temperature", 1.0) > 2:
            raise ValueError("temperature must be in [0, 2]")
        self.__dict__.update(dict(prompt_logprobs=None, flat_logprobs=False, seed=None), **kwargs)


class FakeLLM:
    """vllm.LLM computed with the tiny teacher's transformers model (float32, CPU)."""

    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs):
        from transformers import AutoModelForCausalLM

        unknown = set(kwargs) - _ENGINE_ARGS
        assert not unknown, f"not an EngineArgs field: {unknown}"
        self.kwargs = kwargs
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"]).eval()
        cfg = self.model.config
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(
                max_model_len=kwargs.get("max_model_len") or cfg.max_position_embeddings,
                get_vocab_size=lambda: cfg.vocab_size,
                dtype=torch.float32,
                hf_config=cfg,
            )
        )
        self.calls: list[tuple[list, Any]] = []
        self.script = lambda prompt, params: ([1, 2, 3, cfg.eos_token_id], "stop")
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outs = []
        for i, prompt in enumerate(prompts):
            p = params[i] if isinstance(params, list) else params
            ids = prompt["prompt_token_ids"]
            pl = None
            if p.prompt_logprobs is not None:
                assert p.prompt_logprobs <= self.kwargs["max_logprobs"]
                with torch.no_grad():
                    logits = self.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                pl = vllm_shaped(ids, torch.log_softmax(logits, -1).numpy(), p.prompt_logprobs, flat=p.flat_logprobs)
                token_ids, reason = [0], "length"
            else:
                token_ids, reason = self.script(ids, p)
                token_ids = token_ids[: p.max_tokens]
            completion = types.SimpleNamespace(token_ids=token_ids, finish_reason=reason)
            outs.append(types.SimpleNamespace(prompt_token_ids=list(ids), prompt_logprobs=pl, outputs=[completion]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.instances.clear()
    monkeypatch.setitem(
        sys.modules,
        "vllm",
        _module("0.33.0", LLM=FakeLLM, SamplingParams=FakeSamplingParams, TokensPrompt=dict),
    )


def test_engine_glue_with_a_stand_in_vllm(fake_vllm, teacher_dir, hf_engine):
    eng = VLLMTeacher(str(teacher_dir), dtype="bf16", max_logprobs=16, tensor_parallel_size=1)
    (llm,) = FakeLLM.instances
    assert llm.kwargs["logprobs_mode"] == "raw_logprobs" and llm.kwargs["max_logprobs"] == 16
    assert llm.kwargs["enable_prefix_caching"] is False and llm.kwargs["dtype"] == "bfloat16"
    assert llm.kwargs["tokenizer"] == str(teacher_dir) and "max_model_len" not in llm.kwargs

    assert eng.tokenizer.is_fast and eng.vocab_size == hf_engine.vocab_size
    assert eng.max_length == hf_engine.max_length - 1  # room for the token vLLM generates
    assert eng.fingerprint == hf_engine.fingerprint
    d = eng.describe()
    assert set(hf_engine.describe()) <= set(d)
    assert d["engine"] == "vllm" and d["vllm_version"] == "0.33.0" and d["tensor_parallel_size"] == 1
    assert d["logsumexp"] is False and d["architecture"] == "LlamaForCausalLM"

    seqs = [eng.tokenizer(t)["input_ids"] for t in TEXTS]
    got, want = eng.score(seqs, 16), hf_engine.score(seqs, 16)
    (prompts, params), = llm.calls
    assert [p["prompt_token_ids"] for p in prompts] == seqs
    assert params.prompt_logprobs == 16 and params.max_tokens == 1 and params.detokenize is False
    for g, w in zip(got, want, strict=True):
        assert g.topk_ids.shape == w.topk_ids.shape
        assert (g.topk_ids == w.topk_ids).mean() > 0.99
        np.testing.assert_allclose(g.topk_logprobs.astype(float), w.topk_logprobs.astype(float), atol=2e-3)
        np.testing.assert_allclose(g.label_logprob, w.label_logprob, atol=1e-4)
        assert (g.logsumexp == 0).all()

    with pytest.raises(LogitCacheError, match="max_logprobs=16"):
        eng.score(seqs, 17)
    with pytest.raises(LogitCacheError, match="does not fit"):
        eng.score([[1] * (eng.max_length + 1)], 4)
    assert eng.score([], 4) == []


def test_generate_drops_the_eos_vllm_keeps(fake_vllm, teacher_dir):
    eng = VLLMTeacher(str(teacher_dir))
    llm = FakeLLM.instances[0]
    eos = llm.model.config.eos_token_id
    scripts = {5: ([9, 8, eos], "stop"), 6: ([9, 8, 7], "length")}
    llm.script = lambda prompt, params: scripts[len(prompt)]
    gen = GenerationConfig(max_new_tokens=3, temperature=0.7, top_p=0.9, seed=1)
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]]
    assert eng.generate(prompts, gen) == [[9, 8], [9, 8, 7]]
    params = llm.calls[-1][1]
    assert [p.temperature for p in params] == [0.7, 0.7] and [p.max_tokens for p in params] == [3, 3]
    # One seed per prompt: derived from gen.seed and the prompt, the same in every run.
    seeds = [p.seed for p in params]
    assert seeds[0] != seeds[1]
    eng.generate(prompts[::-1], gen)
    assert [p.seed for p in llm.calls[-1][1]] == seeds[::-1]

    eng.generate(prompts, GenerationConfig(max_new_tokens=3, temperature=0.0))
    assert not isinstance(llm.calls[-1][1], list)  # greedy: one params object, no seed
    with pytest.raises(LogitCacheError, match="rejects these generation settings"):
        eng.generate(prompts, GenerationConfig(temperature=2.5))
    llm.script = lambda prompt, params: ([9], "abort")
    with pytest.raises(LogitCacheError, match="finish_reason='abort'"):
        eng.generate(prompts, gen)


def test_engine_arguments_are_checked(fake_vllm, teacher_dir):
    with pytest.raises(LogitCacheError, match="--dtype"):
        VLLMTeacher(str(teacher_dir), dtype="int8")
    with pytest.raises(LogitCacheError, match="raw_logprobs"):
        VLLMTeacher(str(teacher_dir), engine_args={"logprobs_mode": "processed_logprobs"})
    eng = VLLMTeacher(str(teacher_dir), max_model_len=64, engine_args={"enforce_eager": True})
    assert FakeLLM.instances[-1].kwargs["enforce_eager"] is True
    assert eng.max_length == 63


# --- the real engine ----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_vllm_matches_the_hf_engine(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'logitcache[vllm]' on a CUDA machine)")
    from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_teacher

    # The tiny teacher with head_dim 64, a size every vLLM attention backend supports.
    path = build_tiny_teacher(
        tmp_path_factory.mktemp("teacher") / "llama", model_cfg=TinyModelConfig(hidden_size=256, num_heads=4)
    )
    k = 16
    # vLLM first: it starts its engine process before this process touches CUDA.
    eng = VLLMTeacher(
        str(path), dtype="bfloat16", max_logprobs=k, gpu_memory_utilization=0.3, engine_args={"enforce_eager": True}
    )
    ref = HFTeacher(str(path), dtype="bfloat16", device="cuda")
    assert eng.vocab_size == ref.vocab_size and eng.max_length == ref.max_length - 1
    seqs = [ref.tokenizer(t)["input_ids"] for t in TEXTS]
    for g, w in zip(eng.score(seqs, k), ref.score(seqs, k), strict=True):
        assert g.topk_ids.shape == w.topk_ids.shape
        # bf16 weights and activations, two implementations: equal to within bf16 noise, and
        # the same ids wherever the teacher's ranking is not a near-tie at that noise level.
        lp = w.topk_logprobs.astype(np.float64)
        np.testing.assert_allclose(g.topk_logprobs.astype(np.float64), lp, atol=5e-2)
        np.testing.assert_allclose(g.label_logprob, w.label_logprob, atol=5e-2)
        gap = -np.diff(lp, axis=1)
        clear = np.concatenate([gap[:, :1], np.minimum(gap[:, 1:], gap[:, :-1]), gap[:, -1:]], 1) > 5e-2
        assert (g.topk_ids[clear] == w.topk_ids[clear]).all()
    responses = eng.generate(seqs[:2], GenerationConfig(max_new_tokens=8, temperature=0.0))
    eos = ref.model.generation_config.eos_token_id
    assert all(len(r) <= 8 and eos not in r for r in responses)
