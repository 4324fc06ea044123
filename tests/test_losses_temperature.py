"""ULD and KL at a temperature (issue 12 §2): exact from the cache, tau**2-scaled, against slow references.

The teacher's log-probabilities at tau come from what a cache stores (``targets.tempered_logprobs``:
logprob, logsumexp and logsumexp(logits / tau)); the references work on the teacher's full logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from logitcache.losses import kl_loss, uld_loss
from logitcache.pipeline.student.targets import tempered_logprobs


def softmax_list(row: list[float], tau: float) -> list[float]:
    row = [x / tau for x in row]
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def make_case(seed: int, n: int = 5, vs: int = 9, vt: int = 11, k: int | None = None, tau: float = 2.0):
    """Student logits, the teacher's full logits, and what a cache gives at tau for its top-k."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vs, generator=g, dtype=torch.float64) * 2
    full = torch.randn(n, vt, generator=g, dtype=torch.float64) * 2
    lp, ids = torch.log_softmax(full, dim=-1).topk(k or vt, dim=-1)
    lp_tau = tempered_logprobs(lp, torch.logsumexp(full, -1), torch.logsumexp(full / tau, -1), tau)
    return student, full, lp_tau, ids


def uld_reference(student, full, mask, tau: float) -> float:
    """The paper's ULD at tau on full distributions (zero-padded, sorted), times tau**2, mean over positions."""
    terms = []
    for p in range(student.shape[0]):
        if not bool(mask[p]):
            continue
        s = sorted(softmax_list(student[p].tolist(), tau), reverse=True)
        t = sorted(softmax_list(full[p].tolist(), tau), reverse=True)
        size = max(len(s), len(t))
        s, t = s + [0.0] * (size - len(s)), t + [0.0] * (size - len(t))
        terms.append(sum(abs(a - b) for a, b in zip(s, t)))
    return tau**2 * sum(terms) / len(terms)


def forward_kl_reference(student, full, mask, tau: float) -> float:
    terms = []
    for p in range(student.shape[0]):
        if bool(mask[p]):
            s, t = softmax_list(student[p].tolist(), tau), softmax_list(full[p].tolist(), tau)
            terms.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(t, s)))
    return tau**2 * sum(terms) / len(terms)


MASK = torch.tensor([True, True, False, True, True])


@pytest.mark.parametrize("tau", [2.0, 0.5, 4.0])
@pytest.mark.parametrize("vs,vt", [(9, 11), (13, 7)])
def test_uld_at_tau_with_a_complete_cache_is_the_full_uld_times_tau_squared(tau: float, vs: int, vt: int) -> None:
    student, full, lp_tau, _ = make_case(vs + vt, vs=vs, vt=vt, tau=tau)
    got = uld_loss(student, lp_tau, MASK, temperature=tau)
    assert got.item() == pytest.approx(uld_reference(student, full, MASK, tau), rel=1e-10)


@pytest.mark.parametrize("tau", [2.0, 0.5])
def test_forward_kl_at_tau_with_a_complete_cache_is_the_full_kl_times_tau_squared(tau: float) -> None:
    student, full, lp_tau, ids = make_case(1, vs=11, vt=11, tau=tau)
    got = kl_loss(student, lp_tau, ids, MASK, temperature=tau)
    assert got.item() == pytest.approx(forward_kl_reference(student, full, MASK, tau), rel=1e-10)


def test_kl_at_tau_from_a_top_k_cache_has_the_exact_teacher_tail() -> None:
    # K = 4 of 11: the teacher's tail bucket at tau is 1 - sum of the exact tempered top-K.
    tau = 2.0
    student, full, lp_tau, ids = make_case(2, vs=11, vt=11, k=4, tau=tau)
    got = kl_loss(student, lp_tau, ids, MASK, temperature=tau)
    terms = []
    for p in range(5):
        if not bool(MASK[p]):
            continue
        s, t = softmax_list(student[p].tolist(), tau), softmax_list(full[p].tolist(), tau)
        top = ids[p].tolist()
        tb = [t[i] for i in top] + [sum(t[i] for i in range(11) if i not in top)]
        sb = [s[i] for i in top] + [sum(s[i] for i in range(11) if i not in top)]
        terms.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(tb, sb)))
    assert got.item() == pytest.approx(tau**2 * sum(terms) / len(terms), rel=1e-10)


def test_student_equal_to_the_teacher_gives_zero_at_every_temperature() -> None:
    # From a top-K cache too: the tempered teacher is exact, never renormalised over K.
    for tau in (0.5, 2.0, 4.0):
        _, full, lp_tau, ids = make_case(3, vs=11, vt=11, k=4, tau=tau)
        assert uld_loss(full, lp_tau, MASK, temperature=tau).item() == pytest.approx(0.0, abs=1e-12)
        for kind in ("forward", "reverse", "jsd"):
            assert kl_loss(full, lp_tau, ids, MASK, kind=kind, temperature=tau).item() == pytest.approx(0.0, abs=1e-12)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("loss", ["uld", "forward", "reverse", "jsd"])
def test_gradcheck_at_tau(loss: str, one_thread) -> None:
    student, _, lp_tau, ids = make_case(4, vs=9, vt=9, k=4, tau=2.5)
    w = torch.tensor([0.1, 0.4, 0.0, 0.2, 0.3], dtype=torch.float64)
    if loss == "uld":
        fn = lambda s: uld_loss(s, lp_tau, MASK, temperature=2.5, weights=w, chunk_size=2)  # noqa: E731
    else:
        fn = lambda s: kl_loss(s, lp_tau, ids, MASK, kind=loss, temperature=2.5, weights=w, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student.requires_grad_(),))


def test_a_non_positive_temperature_is_refused() -> None:
    student, _, lp_tau, ids = make_case(5)
    with pytest.raises(ValueError, match="temperature"):
        uld_loss(student, lp_tau, MASK, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        kl_loss(student, lp_tau, ids, MASK, temperature=-1.0)
