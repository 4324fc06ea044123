"""The hf engine stores exactly what the teacher computes: checked against model(...).logits."""

import numpy as np
import pytest
import torch

from logitcache.pipeline.teacher.hf import HFTeacher

TEXTS = [
    "Q: What is 3 plus 4?\nA: 3 plus 4 is 7.",
    "Café crème à Zürich — 東京 🎉",
    "short",
    "The capital of Freedonia is Zorvik. The capital of Genovia is Pyrus.",
]


def _reference(model, ids, k):
    """Independent recomputation: one unpadded sequence, plain forward, log_softmax, topk."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, dim=-1)
    vals, top_ids = logp.topk(k, dim=-1)
    label = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return vals.numpy(), top_ids.numpy(), label.numpy(), torch.logsumexp(logits, -1).numpy()


def _assert_matches_reference(engine, scored, seqs, k):
    for ids, s in zip(seqs, scored):
        vals, top_ids, label, lse = _reference(engine.model, ids, k)
        assert s.topk_ids.shape == (len(ids) - 1, k)
        # fp16 storage: relative error at most 2^-11, plus float noise of the padded forward.
        np.testing.assert_allclose(s.topk_logprobs.astype(np.float64), vals, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(s.label_logprob, label, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s.logsumexp, lse, rtol=1e-4, atol=1e-4)
        # Ids must agree wherever the teacher's ranking is not a near-tie.
        gaps = np.abs(np.diff(vals, axis=1))
        clear = np.concatenate([gaps[:, :1] > 1e-4, (gaps[:, 1:] > 1e-4) & (gaps[:, :-1] > 1e-4), gaps[:, -1:] > 1e-4], axis=1)
        assert clear.mean() > 0.9
        assert (s.topk_ids[clear] == top_ids[clear]).all()


@pytest.fixture(scope="module")
def engine(teacher_dir):
    return HFTeacher(str(teacher_dir), dtype="float32", device="cpu")


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_with_padding_matches_unpadded_forward(engine, side):
    engine.tokenizer.padding_side = side
    seqs = [engine.tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(s) for s in seqs}) == len(seqs), "lengths must differ so padding happens"
    _assert_matches_reference(engine, engine.score(seqs, k=16), seqs, 16)


def test_head_path_is_used_and_full_logits_path_agrees(engine):
    seqs = [engine.tokenizer(t)["input_ids"] for t in TEXTS]
    assert engine.uses_head_path
    via_head = engine.score(seqs, k=8)
    engine.uses_head_path = False
    try:
        via_logits = engine.score(seqs, k=8)
    finally:
        engine.uses_head_path = True
    for a, b in zip(via_head, via_logits):
        np.testing.assert_allclose(a.topk_logprobs.astype(float), b.topk_logprobs.astype(float), atol=2e-3)
        np.testing.assert_allclose(a.label_logprob, b.label_logprob, atol=1e-5)


def test_gpt2_architecture_matches_reference(gpt2_teacher_dir):
    engine = HFTeacher(str(gpt2_teacher_dir), dtype="float32", device="cpu")
    engine.tokenizer.padding_side = "left"
    seqs = [engine.tokenizer(t)["input_ids"] for t in TEXTS]
    _assert_matches_reference(engine, engine.score(seqs, k=8), seqs, 8)


def test_models_that_rescale_logits_use_their_own_forward(teacher_dir):
    engine = HFTeacher(str(teacher_dir), dtype="float32", device="cpu")
    engine.model.config.final_logit_softcapping = 30.0
    assert engine._setup_head_path() is False


def test_bfloat16_teacher_stays_close_to_fp32(teacher_dir, engine):
    bf16 = HFTeacher(str(teacher_dir), dtype="bfloat16", device="cpu")
    seqs = [bf16.tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    for a, b in zip(bf16.score(seqs, k=4), engine.score(seqs, k=4)):
        assert a.topk_logprobs.dtype == np.float32  # the cache codec rounds (v1: to fp16)
        np.testing.assert_allclose(a.label_logprob, b.label_logprob, atol=0.1)


@pytest.mark.parametrize("head_path", [True, False])
def test_extra_temperatures_and_logit_stats_match_the_full_logits(teacher_dir, head_path):
    """Both scoring paths (chunked LM head, the model's own forward) give the extra columns."""
    engine = HFTeacher(str(teacher_dir), dtype="float32", device="cpu", temperatures=(2.0, 4.0), logit_stats=True)
    engine.uses_head_path = head_path and engine.uses_head_path
    seqs = [engine.tokenizer(t)["input_ids"] for t in TEXTS]
    for ids, s in zip(seqs, engine.score(seqs, k=8)):
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        for j, tau in enumerate((2.0, 4.0)):
            np.testing.assert_allclose(s.lse_tau[:, j], torch.logsumexp(logits / tau, -1).numpy(), rtol=1e-5, atol=1e-5)
        std = logits.std(-1)
        np.testing.assert_allclose(s.logit_mean, logits.mean(-1).numpy(), atol=1e-5)
        np.testing.assert_allclose(s.logit_std, std.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.lse_std, torch.logsumexp(logits / (std[:, None] + 1e-4), -1).numpy(), rtol=1e-5, atol=1e-5)
