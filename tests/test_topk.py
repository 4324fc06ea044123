"""chunked_topk equals top-k taken from the full logits, whatever the chunk size."""

import pytest
import torch

from logitcache.pipeline.teacher.topk import chunked_topk


def _reference(hidden, weight, labels, k):
    logits = hidden @ weight.T  # [N, V], the whole thing at once
    logp = torch.log_softmax(logits.double(), dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    return vals, ids, logp.gather(-1, labels[:, None]).squeeze(-1), torch.logsumexp(logits.double(), -1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_topk_matches_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(50, 16, generator=g), torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 300, (50,), generator=g)
    top = chunked_topk(hidden, lambda h: h @ weight.T, labels, k=10, chunk=chunk)
    vals, ids, label_lp, lse = _reference(hidden, weight, labels, 10)
    assert torch.equal(top.ids, ids)
    torch.testing.assert_close(top.logprobs.double(), vals, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top.label_logprob.double(), label_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top.logsumexp.double(), lse, atol=1e-5, rtol=1e-5)


def test_chunked_topk_is_sorted_and_normalised_over_full_vocab():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(40, 8, generator=g)
    top = chunked_topk(hidden, lambda h: h @ weight.T, torch.zeros(5, dtype=torch.long), k=40, chunk=2)
    assert (top.logprobs.diff(dim=-1) <= 0).all()
    # k = V: the top-k is the whole distribution, so it sums to one.
    torch.testing.assert_close(top.logprobs.exp().sum(-1), torch.ones(5))


def test_logits_fn_output_is_consumed_not_the_callers_tensor():
    """The fallback path passes fresh slices of the model's logits; those stay untouched."""
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(2))
    keep = logits.clone()
    from logitcache.pipeline.teacher.topk import chunked_topk_from_logits_fn

    chunked_topk_from_logits_fn(lambda a, b: logits[torch.arange(a, b)], 6, torch.zeros(6, dtype=torch.long), k=4, chunk=4)
    assert torch.equal(logits, keep)


def test_chunked_topk_with_no_positions():
    top = chunked_topk(torch.zeros(0, 4), lambda h: h @ torch.zeros(10, 4).T, torch.zeros(0, dtype=torch.long), k=3)
    assert top.logprobs.shape == (0, 3) and top.ids.shape == (0, 3)


def test_label_outside_topk_still_gets_its_logprob():
    logits = torch.tensor([[5.0, 4.0, 3.0, -2.0]])
    top = chunked_topk(torch.eye(4)[:1], lambda h: logits.expand(h.shape[0], -1).clone(), torch.tensor([3]), k=2)
    expected = -2.0 - torch.logsumexp(logits[0], 0)
    torch.testing.assert_close(top.label_logprob, expected[None])
    assert top.ids.tolist() == [[0, 1]]


def _word_start_reference(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log of the softmax mass on the masked ids, in float64 from the whole logits."""
    return torch.logsumexp(torch.log_softmax(x.double(), -1)[:, mask], -1)


@pytest.mark.parametrize("extras", [{}, {"temperatures": [2.0, 4.0], "stats": True}])
def test_word_start_logprob_is_the_log_mass_on_the_masked_ids(extras):
    from logitcache.pipeline.teacher.topk import chunked_topk_from_logits_fn

    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 500, generator=g) * 3
    mask = torch.rand(500, generator=g) < 0.3
    top = chunked_topk_from_logits_fn(lambda a, b: x[a:b].clone(), 20, torch.zeros(20, dtype=torch.long), 4, 6,
                                      word_start=mask, **extras)
    torch.testing.assert_close(top.word_start_logprob.double(), _word_start_reference(x, mask), rtol=1e-6, atol=1e-5)
    assert (top.word_start_logprob <= 0).all()


def test_word_start_logprob_is_zero_when_every_id_starts_a_word_and_bounded_when_none_is_likely():
    x = torch.tensor([[0.0, 1.0, 2.0], [200.0, 0.0, 0.0]])
    every = chunked_topk(torch.eye(2), lambda h: x.clone(), torch.zeros(2, dtype=torch.long), 1, word_start=torch.ones(3, dtype=torch.bool))
    assert torch.equal(every.word_start_logprob, torch.zeros(2))
    # mass e^-200 on the mask: below float32's range, stored as log of its smallest normal, not -inf
    rare = chunked_topk(torch.eye(2), lambda h: x.clone(), torch.zeros(2, dtype=torch.long), 1, word_start=torch.tensor([False, True, True]))
    assert torch.isfinite(rare.word_start_logprob).all()
    assert rare.word_start_logprob[1].item() == pytest.approx(float(torch.log(torch.tensor(torch.finfo(torch.float32).tiny))), abs=1e-3)
