"""ALM (approximate likelihood matching): chunks both tokenizations bound, and the binarised divergence."""

import numpy as np
import pytest
import torch

from logitcache.losses import ALMConfig, alm_loss
from logitcache.pipeline.student.chunks import alm_chunks
from logitcache.pipeline.student.losses import FusedLoss, ce_kd_loss
from logitcache.pipeline.student.losses.alm import binarised_divergence

D = torch.float64


def tokenkit_distance(log_y_true, log_y_pred, temp=100.0, epsilon=1e-6):
    """tokenkit's docs/pytorch_alm_from_scratch.ipynb distance_fn (binary CE at temperature 100), written out."""
    log_y_true = log_y_true / temp - epsilon
    log_y_pred = log_y_pred / temp - epsilon
    y, y_hat = torch.exp(log_y_true), torch.exp(log_y_pred)
    return -(y * torch.log(y_hat) + (1 - y) * torch.log(1 - y_hat))


def slow_alm(logits, labels, chunk_index, teacher_ll, kind="binary_kl", end=None, teacher_ws=None, mask=None):
    """Chunk by chunk: the student's chunk log-likelihood summed position by position. Debiased
    (``end``, ``teacher_ws``, the student's word starts ``mask``): plus log sum_{v in mask} p(v)
    at the chunk's end on the student side and the teacher's word-start log-prob on the other,
    for chunks whose teacher value is known."""
    losses = []
    for b in range(logits.shape[0]):
        for c in range(teacher_ll.shape[1]):
            qs = [q for q in range(logits.shape[1]) if int(chunk_index[b, q]) == c]
            if not qs:
                continue
            s_ll = sum(torch.log_softmax(logits[b, q], -1)[labels[b, q + 1]] for q in qs)
            t_ll = teacher_ll[b, c].to(D)
            if end is not None and int(end[b, c]) >= 0 and torch.isfinite(teacher_ws[b, c]):
                p = torch.softmax(logits[b, int(end[b, c])], -1)
                s_ll = s_ll + torch.log(sum(p[v] for v in range(len(mask)) if mask[v]))
                t_ll = t_ll + teacher_ws[b, c].to(D)
            s_ll, t_ll = s_ll.clamp(max=0), t_ll.clamp(max=0)  # as tokenkit clips
            ce = tokenkit_distance(t_ll, s_ll)
            if kind == "binary_ce":
                losses.append(ce)
            else:
                y = torch.exp(t_ll / 100 - 1e-6)
                losses.append(ce + y * torch.log(y) + (1 - y) * torch.log(1 - y))  # CE - teacher's binary entropy
    return sum(losses) / len(losses) if losses else torch.zeros((), dtype=D)


def _case(seed=0, b=2, t=7, v=9, c=4):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g, dtype=D) * 2).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, 0] = -100
    chunk_index = torch.tensor([[-1, 0, 0, 1, 2, 2, -1], [0, 1, 1, 1, 2, -1, -1]])[:b, :t]
    teacher_ll = -torch.rand(b, c, generator=g, dtype=D) * 8
    return logits, labels, chunk_index, teacher_ll


@pytest.mark.parametrize("kind", ["binary_kl", "binary_ce"])
def test_alm_equals_slow_reference_values_and_gradients(kind):
    logits, labels, idx, t_ll = _case()
    got = alm_loss(logits, labels, idx, t_ll, ALMConfig(divergence=kind))
    want = slow_alm(logits, labels, idx, t_ll, kind)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    assert abs(got.item() - want.item()) < 1e-12
    assert torch.allclose(g_got, g_want, atol=1e-12)


def test_binary_kl_and_tokenkits_binary_ce_have_the_same_gradient():
    logits, labels, idx, t_ll = _case(seed=1)
    grads = [torch.autograd.grad(alm_loss(logits, labels, idx, t_ll, ALMConfig(divergence=k)), logits)[0]
             for k in ("binary_kl", "binary_ce")]
    assert torch.allclose(grads[0], grads[1], atol=1e-14)


def test_student_matching_teacher_chunk_likelihoods_gives_zero():
    ll = torch.tensor([-0.0, -0.3, -5.0, -40.0], dtype=D)
    assert binarised_divergence(ll, ll).abs().max().item() < 1e-15


def test_gradcheck():
    logits, labels, idx, t_ll = _case(seed=2, b=1, t=5, v=5)
    x = logits.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: alm_loss(x, labels, idx, t_ll), (x,), fast_mode=True)


def test_no_chunk_is_exactly_zero_with_zero_gradient():
    logits, labels, idx, t_ll = _case()
    loss = alm_loss(logits, labels, torch.full_like(idx, -1), t_ll)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and not grad.any()


def test_sample_reduction_averages_each_sequence_first():
    logits, labels, idx, t_ll = _case()
    per_seq = [alm_loss(logits[i:i + 1], labels[i:i + 1], idx[i:i + 1], t_ll[i:i + 1]) for i in range(2)]
    got = alm_loss(logits, labels, idx, t_ll, reduction="sample")
    assert abs(got.item() - (per_seq[0] + per_seq[1]).item() / 2) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_fused_pass_equals_ce_plus_alm(dtype, reduction):
    logits, labels, idx, t_ll = _case(seed=3)
    x = logits.detach().to(dtype).requires_grad_()
    spec = FusedLoss("alm", weight=0.5, reduction=reduction)
    t_lp = torch.zeros(*labels.shape, 1)
    total, ce, kd = ce_kd_loss(x, labels, t_lp, t_lp.long(), idx >= 0, spec, alm=(idx, t_ll.to(dtype)))
    (g_fused,) = torch.autograd.grad(total, x)
    ref = logits.detach().requires_grad_()
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    want_ce = torch.nn.functional.cross_entropy(ref.reshape(-1, 9), shifted.reshape(-1), ignore_index=-100)
    want_kd = alm_loss(ref, labels, idx, t_ll, reduction=reduction)
    (g_want,) = torch.autograd.grad(want_ce + 0.5 * want_kd, ref)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(kd.item() - want_kd.item()) < tol and abs(ce.item() - want_ce.item()) < tol
    assert torch.allclose(g_fused.to(D), g_want, atol=tol)


# --- chunks ------------------------------------------------------------------------------------


def _spans(pieces, start=0):
    """Tiling spans of pieces given as strings ("" = a later byte piece / special token: empty span)."""
    s, e, pos = [], [], start
    for p in pieces:
        s.append(pos)
        pos += len(p)
        e.append(pos)
    return np.array(s), np.array(e)


def test_chunks_end_where_both_sides_end_a_token():
    # text "ab cd": teacher <s>|a|b| cd, student <s>|ab| c|d; common ends 2 and 5.
    t_s, t_e = _spans(["", "a", "b", " cd"])
    s_s, s_e = _spans(["", "ab", " c", "d"])
    t_ll = np.array([-1.0, -2.0, -4.0, 0.0])  # position p: log p(token p + 1)
    chunk, ll, _, _ = alm_chunks(t_s, t_e, np.arange(3), t_ll, s_s, s_e, np.arange(3), 4)
    assert chunk.tolist() == [0, 1, 1, -1]  # student positions 1, 2 predict " c", "d"
    assert ll.tolist() == [-3.0, -4.0]  # "ab": a + b; " cd"


def test_a_character_split_into_byte_pieces_stays_in_one_chunk():
    # "é!" : the teacher splits é into two byte pieces (the second has an empty span), the student not.
    t_s, t_e = _spans(["", "é", "", "!"])
    s_s, s_e = _spans(["", "é!"])
    chunk, ll, _, _ = alm_chunks(t_s, t_e, np.arange(3), np.array([-1.0, -0.5, -2.0, 0]), s_s, s_e, np.arange(1), 2)
    assert chunk.tolist() == [0, -1] and ll.tolist() == [-3.5]


def test_eos_on_both_sides_is_a_chunk_of_its_own():
    t_s, t_e = _spans(["", "ab", ""])  # <s> ab </s>
    s_s, s_e = _spans(["", "a", "b", ""])
    t_ll = np.array([-1.0, -0.25, 0])
    chunk, ll, _, _ = alm_chunks(t_s, t_e, np.arange(2), t_ll, s_s, s_e, np.arange(3), 4, teacher_eos=True, student_eos=True)
    assert chunk.tolist() == [0, 0, 1, -1] and ll.tolist() == [-1.0, -0.25]


def test_eos_on_one_side_only_is_in_no_chunk():
    t_s, t_e = _spans(["", "ab"])
    s_s, s_e = _spans(["", "a", "b", ""])
    chunk, ll, _, _ = alm_chunks(t_s, t_e, np.arange(1), np.array([-1.0, 0]), s_s, s_e, np.arange(3), 4, student_eos=True)
    assert chunk.tolist() == [0, 0, -1, -1] and ll.tolist() == [-1.0]


def test_first_chunk_is_dropped_when_the_sides_start_the_response_at_different_characters():
    # prompt "Q:" (2 chars); the teacher's ":\n" straddles it (not a target), the student's "\n" is one.
    t_s, t_e = _spans(["", "Q", ":\n", "Hi", " there"])
    s_s, s_e = _spans(["", "Q", ":", "\nHi", " there"])
    t_targets, s_targets = np.array([2, 3]), np.array([2, 3])  # tokens starting at or after char 2
    chunk, ll, _, _ = alm_chunks(t_s, t_e, t_targets, np.array([0, 0, -1.0, -2.0, 0]), s_s, s_e, s_targets, 5)
    assert chunk.tolist() == [-1, -1, -1, 0, -1] and ll.tolist() == [-2.0]


def test_real_tokenizers_chunk_the_same_text_on_both_sides(tmp_path):
    from logitcache.pipeline.offsets import encode_with_offsets
    from logitcache.pipeline.student.align import target_positions
    from logitcache.pipeline.tiny import generate_corpus, load_mistral_tokenizer, train_bpe_tokenizer

    mistral = pytest.importorskip("mistral_common") and load_mistral_tokenizer(tmp_path / "mistral")
    bpe = train_bpe_tokenizer(generate_corpus(300, 1), 300)
    text = "Q: Où?\nA: Café crème 🎉👍🏽, 東京 and naïve façade."
    prompt = 6
    t_ids, t_s, t_e = encode_with_offsets(bpe, text)
    s_ids, s_s, s_e = encode_with_offsets(mistral, text)
    t_tg, s_tg = target_positions(t_s, t_e, prompt), target_positions(s_s, s_e, prompt)
    ones = -np.ones(len(t_ids))
    chunk, ll, _, _ = alm_chunks(t_s, t_e, t_tg, ones, s_s, s_e, s_tg, len(s_ids))
    assert len(ll) >= 8
    for c in range(len(ll)):
        s_tokens = np.flatnonzero(chunk == c) + 1
        s_text = text[s_s[s_tokens[0]]:s_e[s_tokens[-1]]]
        n_t = -int(ll[c])  # every teacher token counted -1: the chunk's teacher token count
        assert n_t >= 1 and s_text
        # The teacher's tokens of the chunk cover exactly the same characters.
        t_tokens = [j for j in t_tg + 1 if s_s[s_tokens[0]] < t_e[j] <= s_e[s_tokens[-1]]]
        assert len(t_tokens) == n_t and text[t_s[t_tokens[0]]:t_e[t_tokens[-1]]] == s_text


# --- debiasing: the word-start probability after each chunk, on both sides --------------------

WS = torch.tensor([True, False, True, False, False, True, False, False, True])  # the student's word starts, V = 9


def _debias_case(seed=4):
    logits, labels, idx, t_ll = _case(seed=seed)
    end = torch.tensor([[2, 3, 5, -1], [1, 4, 5, -1]])
    t_ws = torch.tensor([[-0.2, -3.0, float("nan"), float("nan")], [-1.0, -0.01, -7.0, float("nan")]], dtype=D)
    return logits, labels, idx, t_ll, end, t_ws


def test_debiased_alm_equals_slow_reference_values_and_gradients():
    logits, labels, idx, t_ll, end, t_ws = _debias_case()
    got = alm_loss(logits, labels, idx, t_ll, end=end, teacher_word_start=t_ws, word_start_mask=WS)
    want = slow_alm(logits, labels, idx, t_ll, end=end, teacher_ws=t_ws, mask=WS)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    assert abs(got.item() - want.item()) < 1e-12
    assert torch.allclose(g_got, g_want, atol=1e-12)
    plain = alm_loss(logits, labels, idx, t_ll, ALMConfig(mode="plain"), end=end, teacher_word_start=t_ws, word_start_mask=WS)
    assert abs(plain.item() - slow_alm(logits, labels, idx, t_ll).item()) < 1e-12 and abs(plain.item() - got.item()) > 1e-6


def test_debiased_student_equal_to_its_teacher_gets_zero():
    logits, labels, idx, _, end, _ = _debias_case(seed=5)
    with torch.no_grad():  # the teacher's chunk likelihoods and word starts, from the same logits
        lp = torch.log_softmax(logits, -1)
        nxt = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
        per_q = torch.where(idx >= 0, lp.gather(-1, nxt.clamp_min(0)[..., None]).squeeze(-1), 0.0)
        t_ll = torch.zeros(2, 4, dtype=D).scatter_add(1, idx.clamp_min(0), torch.where(idx >= 0, per_q, 0.0))
        t_ws = torch.logsumexp(lp[..., WS], -1).gather(1, end.clamp_min(0))
    loss = alm_loss(logits, labels, idx, t_ll, end=end, teacher_word_start=t_ws, word_start_mask=WS)
    assert abs(loss.item()) < 1e-15


def test_debiased_alm_gradcheck():
    logits, labels, idx, t_ll, end, t_ws = _debias_case(seed=6)
    x = logits.detach()[:1, :6, :].clone().requires_grad_()
    f = lambda x: alm_loss(x, labels[:1, :6], idx[:1, :6], t_ll[:1], end=end[:1].clamp(max=5), teacher_word_start=t_ws[:1], word_start_mask=WS)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_debiased_fused_pass_equals_ce_plus_standalone_alm(dtype):
    from logitcache.losses import ALMTargets

    logits, labels, idx, t_ll, end, t_ws = _debias_case(seed=7)
    x = logits.detach().to(dtype).requires_grad_()
    t_lp = torch.zeros(*labels.shape, 1)
    targets = ALMTargets(idx, t_ll.to(dtype), end, t_ws.to(dtype), WS)
    total, ce, kd = ce_kd_loss(x, labels, t_lp, t_lp.long(), idx >= 0, FusedLoss("alm", weight=2.0), alm=targets)
    (g_fused,) = torch.autograd.grad(total, x)
    ref = logits.detach().requires_grad_()
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    want_ce = torch.nn.functional.cross_entropy(ref.reshape(-1, 9), shifted.reshape(-1), ignore_index=-100)
    want_kd = alm_loss(ref, labels, idx, t_ll, reduction="sample", end=end, teacher_word_start=t_ws, word_start_mask=WS)
    (g_want,) = torch.autograd.grad(want_ce + 2.0 * want_kd, ref)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(kd.item() - want_kd.item()) < tol and abs(ce.item() - want_ce.item()) < tol
    assert torch.allclose(g_fused.to(D), g_want, atol=tol)


def test_chunks_merge_until_a_word_likely_starts_and_carry_their_end():
    # text "ab cd ef": teacher <s>|ab| cd| ef, student <s>|a|b| c|d| e|f; common ends 2, 5, 8.
    t_s, t_e = _spans(["", "ab", " cd", " ef"])
    s_s, s_e = _spans(["", "a", "b", " c", "d", " e", "f"])
    t_ll = np.array([-1.0, -2.0, -4.0, 0.0])
    # word-start probability after "ab" 0.05 (merge on), after " cd" 0.5 (a group ends), after " ef" none stored
    t_ws = np.log(np.array([0.9, 0.05, 0.5]))
    c = alm_chunks(t_s, t_e, np.arange(3), t_ll, s_s, s_e, np.arange(6), 7, teacher_word_start=t_ws, merge_threshold=0.1)
    assert c.chunk.tolist() == [0, 0, 0, 0, 1, 1, -1]
    assert c.teacher_ll.tolist() == [-3.0, -4.0]
    assert c.end.tolist() == [4, 6]  # student position 4 ('d') predicts what follows " cd"
    assert np.allclose(c.teacher_word_start, [np.log(0.5), np.nan], equal_nan=True)
    unmerged = alm_chunks(t_s, t_e, np.arange(3), t_ll, s_s, s_e, np.arange(6), 7, teacher_word_start=t_ws)
    assert unmerged.chunk.tolist() == [0, 0, 1, 1, 2, 2, -1] and unmerged.end.tolist() == [2, 4, 6]
    assert np.allclose(unmerged.teacher_word_start, np.log([0.05, 0.5, np.nan]), equal_nan=True)
