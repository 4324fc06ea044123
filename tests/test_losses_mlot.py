"""multilevel_ot_loss against a slow plain-Python reference (loops, dicts, non-log Sinkhorn)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from logitcache.losses import MLOTConfig, multilevel_ot_loss


# --- the reference: written from the formulas, sharing no code with the implementation ----------
def softmax_list(row: list[float], tau: float = 1.0) -> list[float]:
    row = [x / tau for x in row]
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def std_list(row: list[float]) -> float:
    mean = sum(row) / len(row)
    return math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))


def sinkhorn_cost(t_vecs: list[list[float]], s_vecs: list[list[float]], lam: float, iters: int) -> float:
    """sum_ij P_ij C_ij, P from `iters` plain row-then-column normalisations of exp(-C/lam)."""
    n = len(t_vecs)
    cost = [[sum(abs(a - b) for a, b in zip(t_vecs[i], s_vecs[j])) for j in range(n)] for i in range(n)]
    plan = [[math.exp(-cost[i][j] / lam) for j in range(n)] for i in range(n)]
    for _ in range(iters):
        for i in range(n):
            r = sum(plan[i])
            plan[i] = [x / r for x in plan[i]]
        for j in range(n):
            c = sum(plan[i][j] for i in range(n))
            for i in range(n):
                plan[i][j] /= c
    return sum(plan[i][j] * cost[i][j] for i in range(n) for j in range(n))


def reference(
    student, lp, ids, mask, cfg: MLOTConfig, student_ids: list[list[int]] | None = None, *,
    full=None, reduction: str = "sample",
) -> dict:
    """MultiLevelOT per the module's documented formulas, one position and one id at a time.

    ``full``: the teacher's raw logits [B, T, Vt], from which the teacher's probabilities at the
    cached ids are computed exactly (the cache's exact tempered / std-normalised values).
    Without it, ``cfg.approximate_temperature`` must be set: the teacher at tau != 1 is then the
    softmax of logprob / tau over the K cached entries (the former approximation).
    """
    c = cfg.resolved()
    code = c.variant == "code"
    B, T, Vs = student.shape
    S, LP, ID, M = student.tolist(), lp.tolist(), ids.tolist(), mask.tolist()
    F = full.tolist() if full is not None else None

    def teacher_dist(b: int, t: int, tau: float) -> dict[int, float]:
        if F is not None:
            row = F[b][t]
            if code:
                sd = std_list(row) + c.std_eps
                row = [x / sd for x in row]
            full_probs = softmax_list(row, tau)
            probs = [full_probs[i] for i in ID[b][t]]
        else:
            assert c.approximate_temperature and not code
            row = LP[b][t]
            probs = [math.exp(x) for x in row] if tau == 1.0 else softmax_list(row, tau)
        out: dict[int, float] = {}
        for i, p in zip(ID[b][t], probs):
            out[i] = out.get(i, 0.0) + p
        return out

    def student_z(b: int, t: int) -> list[float]:
        row = S[b][t]
        if code:
            sd = std_list(row) + c.std_eps
            return [x / sd for x in row]
        return row

    # The paper ranks at temperature 1; the authors' code ranks what it compares (tau_SL).
    rank_tau = c.tau_sl if code else 1.0
    groups = [list(range(B))] if c.rank_over == "batch" else [[b] for b in range(B)]
    t_rank, s_rank = {}, {}
    for group in groups:
        t_sums: dict[int, float] = {}
        s_sums = [0.0] * Vs
        max_id = 0
        for b in group:
            for t in range(T):
                if not M[b][t]:
                    continue
                for i, p in teacher_dist(b, t, rank_tau).items():
                    t_sums[i] = t_sums.get(i, 0.0) + p
                    max_id = max(max_id, i)
                for i, p in enumerate(softmax_list(student_z(b, t), rank_tau)):
                    s_sums[i] += p
        candidates = range(max(max_id + 1, c.k))
        tr = sorted(candidates, key=lambda i: (-t_sums.get(i, 0.0), i))[: c.k]
        sr = sorted(range(Vs), key=lambda i: (-s_sums[i], i))[: c.k]
        for b in group:
            t_rank[b], s_rank[b] = tr, (student_ids[b] if student_ids else sr)

    had_seq, sl_seq, n_seq, sd_seq = [], [], [], []
    for b in range(B):
        pos = [t for t in range(T) if M[b][t]]
        if not pos:
            continue
        had_b, sl_b, t_sd_vecs, s_sd_vecs = 0.0, 0.0, [], []
        for t in pos:
            td = teacher_dist(b, t, c.tau_sl)
            tv = [td.get(i, 0.0) for i in t_rank[b]]
            sp = softmax_list(student_z(b, t), c.tau_sl)
            sv = [sp[i] for i in s_rank[b]]
            h = sum(abs(x - y) for x, y in zip(tv, sv))
            if code:
                ws, lt = softmax_list(sv), [math.log(x) for x in softmax_list(tv)]
                sl = -sum(w * l for w, l in zip(ws, lt))
                t_sd_vecs.append(softmax_list(tv, c.tau_sd))
                s_sd_vecs.append(softmax_list(sv, c.tau_sd))
            else:
                sl = -sum(x * math.log(y) for x, y in zip(tv, sv))
                tdd = teacher_dist(b, t, c.tau_sd)
                t_sd_vecs.append([tdd.get(i, 0.0) for i in t_rank[b]])
                spd = softmax_list(student_z(b, t), c.tau_sd)
                s_sd_vecs.append([spd[i] for i in s_rank[b]])
            had_b += h
            sl_b += sl
        had_seq.append(had_b)
        sl_seq.append(sl_b)
        n_seq.append(len(pos))
        transport = sinkhorn_cost(t_sd_vecs, s_sd_vecs, c.sinkhorn_lambda, c.sinkhorn_iters)
        sd_seq.append(0.001 * transport if code else transport / len(pos))
    if not n_seq:
        return {"had": 0.0, "sl": 0.0, "sd": 0.0, "total": 0.0}
    if reduction == "sample":
        had = sum(h / n for h, n in zip(had_seq, n_seq)) / len(n_seq)
        sl = sum(x / n for x, n in zip(sl_seq, n_seq)) / len(n_seq)
    else:
        had, sl = sum(had_seq) / sum(n_seq), sum(sl_seq) / sum(n_seq)
    sd = sum(sd_seq) / len(sd_seq)
    scale = c.tau_sl**2 if c.hinton_scale else 1.0
    return {"had": had, "sl": sl, "sd": sd, "total": scale * c.alpha * (had + c.beta * sl + c.gamma * sd)}


# --- cases ---------------------------------------------------------------------------------------
def make_case(seed: int, B: int = 2, T: int = 5, vs: int = 9, vt: int = 11, K: int | None = None):
    """Random logits; the teacher cache = its top-K log-probabilities (K = vt: a complete cache).

    Returns (student, lp, ids, full): ``full`` the teacher's raw logits [B, T, vt].
    """
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, vs, generator=g, dtype=torch.float64) * 2
    full = torch.randn(B, T, vt, generator=g, dtype=torch.float64) * 2
    lp, ids = torch.log_softmax(full, dim=-1).topk(K or vt, dim=-1)
    return student, lp, ids, full


def exact(full: torch.Tensor, ids: torch.Tensor, cfg: MLOTConfig) -> dict:
    """What a cache with --temperatures / --logit-stats gives the loss: exact values at the cached ids."""
    c = cfg.resolved()
    if c.variant == "code":
        z = full / (full.std(dim=-1, keepdim=True) + c.std_eps)
        return {"std_logprobs": torch.log_softmax(z, dim=-1).gather(-1, ids)}
    taus = {c.tau_sl, c.tau_sd} - {1.0}
    return {"tempered": {tau: torch.log_softmax(full / tau, dim=-1).gather(-1, ids) for tau in taus}}


def assert_parts_match(got: dict, expected: dict) -> None:
    for key in ("had", "sl", "sd", "total"):
        assert got[key].item() == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


MASK = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize(
    "vs,vt,K",
    [(9, 11, 11), (12, 7, 7), (8, 8, 8), (10, 12, 5), (6, 12, 4)],
    ids=["complete-Vs<Vt", "complete-Vs>Vt", "complete-same", "topK-5-of-12", "topK-4-of-12"],
)
def test_matches_reference(variant: str, vs: int, vt: int, K: int) -> None:
    student, lp, ids, full = make_case(vs * 31 + vt, vs=vs, vt=vt, K=K)
    cfg = MLOTConfig(variant=variant, k=4)
    got = multilevel_ot_loss(student, lp, ids, MASK, cfg, **exact(full, ids, cfg), return_parts=True)
    assert_parts_match(got, reference(student, lp, ids, MASK, cfg, full=full))


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_matches_reference_other_hyperparameters(variant: str) -> None:
    # tau_SL != 1 (paper: the exact tempered teacher; code: only tau_SL = 1 comes from a cache),
    # other tau_SD, lambda, N and ranking scope.
    student, lp, ids, full = make_case(42, vs=10, vt=12, K=6)
    cfg = MLOTConfig(
        variant=variant, k=5, tau_sl=1.5 if variant == "paper" else 1.0, tau_sd=3.0, sinkhorn_lambda=0.3,
        sinkhorn_iters=7, rank_over="batch" if variant == "paper" else "sequence", alpha=0.7, beta=0.3, gamma=0.2,
    )
    got = multilevel_ot_loss(student, lp, ids, MASK, cfg, **exact(full, ids, cfg), return_parts=True)
    assert_parts_match(got, reference(student, lp, ids, MASK, cfg, full=full))


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_token_reduction_matches_reference(variant: str) -> None:
    student, lp, ids, full = make_case(43, vs=10, vt=12, K=6)
    cfg = MLOTConfig(variant=variant, k=5)
    got = multilevel_ot_loss(student, lp, ids, MASK, cfg, **exact(full, ids, cfg), reduction="token", return_parts=True)
    assert_parts_match(got, reference(student, lp, ids, MASK, cfg, full=full, reduction="token"))


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_fully_masked_sequence_is_ignored(variant: str) -> None:
    student, lp, ids, full = make_case(3, B=2, T=4)
    mask = torch.tensor([[True, True, False, True], [False, False, False, False]])
    cfg = MLOTConfig(variant=variant, k=4)
    extra = exact(full, ids, cfg)
    got = multilevel_ot_loss(student, lp, ids, mask, cfg, **extra, return_parts=True)
    assert_parts_match(got, reference(student, lp, ids, mask, cfg, full=full))
    # Same as the first sequence on its own (its garbage ids in the masked one are never read).
    ids2 = ids.clone()
    ids2[1] = -100
    alone = multilevel_ot_loss(student[:1], lp[:1], ids[:1], mask[:1], cfg, **exact(full[:1], ids[:1], cfg))
    assert multilevel_ot_loss(student, lp, ids2, mask, cfg, **extra).item() == pytest.approx(alone.item(), rel=1e-12)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_all_masked_is_zero_with_zero_gradient(variant: str) -> None:
    student, lp, ids, full = make_case(4)
    student.requires_grad_()
    cfg = MLOTConfig(variant=variant, k=4)
    parts = multilevel_ot_loss(student, lp, ids, torch.zeros(2, 5, dtype=torch.bool), cfg, **exact(full, ids, cfg), return_parts=True)
    parts["total"].backward()
    assert all(v.item() == 0.0 for v in parts.values())
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_ties_go_to_the_lower_id() -> None:
    # Teacher ids 1 and 4 (and 0 and 3) have the same summed probability, and so do student
    # ids 0 and 2: the ranking puts the lower id first, on both sides.
    p = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64).expand(2, 2, 4)
    ids = torch.tensor([[[4, 1, 0, 3], [1, 4, 0, 3]], [[2, 3, 1, 0], [2, 3, 1, 0]]])
    # Every row holds the same logits at its cached ids (and -30 at the one id left out), so the
    # tied sums are exp(a) + exp(b) vs exp(b) + exp(a): equal in floating point too.
    full = torch.full((2, 2, 5), -30.0, dtype=torch.float64).scatter(2, ids, p.log())
    lp = torch.log_softmax(full, dim=-1).gather(-1, ids)
    # Student ids 0 and 2 have equal logits at every position.
    student = torch.tensor(
        [[[1.0, 0.0, 1.0, 0.0], [0.5, 2.0, 0.5, 0.0]], [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]],
        dtype=torch.float64,
    )
    mask = torch.ones(2, 2, dtype=torch.bool)
    for variant in ("paper", "code"):
        cfg = MLOTConfig(variant=variant, k=3, rank_over="sequence")  # over the batch the ties would break
        got = multilevel_ot_loss(student, lp, ids, mask, cfg, **exact(full, ids, cfg), return_parts=True)
        assert_parts_match(got, reference(student, lp, ids, mask, cfg, full=full))


@pytest.fixture
def one_thread():
    """gradcheck runs hundreds of tiny forwards; on a busy machine every intra-op parallel region
    can wait milliseconds for a descheduled worker thread (seen: 9 s instead of 0.2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("student_rank", ["sum", "assignment"])
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_gradcheck(variant: str, student_rank: str, one_thread) -> None:
    # At the paper's lambda = 0.1 and default tolerances: float64 and the log-domain Sinkhorn
    # keep the finite differences accurate, so no larger lambda is needed. The ranking is
    # piecewise constant (no gradient, and fixed under the tiny perturbations of finite
    # differences); everything after it is smooth.
    if student_rank == "assignment":
        pytest.importorskip("scipy")
    student, lp, ids, full = make_case(5, T=5, vs=9, vt=11, K=6)
    mask = torch.tensor([[True, True, False, True, True], [True, True, True, False, False]])
    cfg = MLOTConfig(variant=variant, k=4, student_rank=student_rank)
    extra = exact(full, ids, cfg)
    assert torch.autograd.gradcheck(lambda s: multilevel_ot_loss(s, lp, ids, mask, cfg, **extra), (student.requires_grad_(),))


def test_gradient_flows_through_the_plan() -> None:
    # SD alone must have a gradient (the plan is not detached).
    student, lp, ids, full = make_case(7)
    student.requires_grad_()
    cfg = MLOTConfig(k=4)
    parts = multilevel_ot_loss(student, lp, ids, MASK, cfg, **exact(full, ids, cfg), return_parts=True)
    parts["sd"].backward()
    assert student.grad.abs().sum() > 0


def test_small_lambda_stays_finite() -> None:
    # exp(-C / 1e-4) underflows to 0 in a plain Sinkhorn; the log-domain one does not.
    student, lp, ids, full = make_case(8)
    student = student.float().requires_grad_()
    cfg = MLOTConfig(k=4, sinkhorn_lambda=1e-4)
    tempered = {tau: v.float() for tau, v in exact(full, ids, cfg)["tempered"].items()}
    loss = multilevel_ot_loss(student, lp.float(), ids, MASK, cfg, tempered=tempered)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_cache_k_smaller_than_mlot_k_raises() -> None:
    student, lp, ids, _ = make_case(0, vs=12, vt=12, K=4)
    with pytest.raises(ValueError, match=r"top-4 .* k=5 .*--top-k 5` or more.*MLOTConfig\.k"):
        multilevel_ot_loss(student, lp, ids, MASK, MLOTConfig(k=5))


def test_student_vocab_smaller_than_k_raises() -> None:
    student, lp, ids, _ = make_case(0, vs=3, vt=12, K=6)
    with pytest.raises(ValueError, match="student vocabulary"):
        multilevel_ot_loss(student, lp, ids, MASK, MLOTConfig(k=4))


def test_variant_defaults_and_overrides() -> None:
    paper, code = MLOTConfig().resolved(), MLOTConfig(variant="code").resolved()
    assert (paper.alpha, paper.sinkhorn_iters, paper.rank_over) == (0.15, 20, "sequence")
    assert (code.alpha, code.sinkhorn_iters, code.rank_over) == (1.5, 10, "batch")
    mine = MLOTConfig(variant="code", alpha=2.0, sinkhorn_iters=3, rank_over="sequence").resolved()
    assert (mine.alpha, mine.sinkhorn_iters, mine.rank_over) == (2.0, 3, "sequence")
    with pytest.raises(ValueError, match="variant"):
        MLOTConfig(variant="both").resolved()


# --- the teacher from the cache: exact tempered and std-normalised values (issue 12 §1b, §1c) ------
def shared_top_k_case(seed: int, T: int, v: int, K: int, boost: float = 8.0):
    """A teacher whose top-K ids are the same set at every position (logits + ``boost`` there), so
    every ranked teacher id (k <= K) is cached at every position: the cache then holds all that
    MultiLevelOT reads, and its value must equal the formula on the full logits."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(1, T, v, generator=g, dtype=torch.float64)
    top = torch.randperm(v, generator=g)[:K]
    full[..., top] += boost
    lp, ids = torch.log_softmax(full, dim=-1).topk(K, dim=-1)
    assert set(ids.flatten().tolist()) == set(top.tolist())
    return full, lp, ids


def test_paper_variant_from_a_top_k_cache_equals_the_full_logit_formula() -> None:
    # The teacher at tau_SD = 2 from the cache's exact log-partition; before the fix it was
    # softmax(logprob / 2) renormalised over the K entries.
    full, lp, ids = shared_top_k_case(0, T=6, v=40, K=12)
    student = torch.randn(1, 6, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    mask = torch.ones(1, 6, dtype=torch.bool)
    cfg = MLOTConfig(k=8)
    got = multilevel_ot_loss(student, lp, ids, mask, cfg, **exact(full, ids, cfg), return_parts=True)
    all_lp, all_ids = torch.log_softmax(full, dim=-1).topk(40, dim=-1)  # what full logits give
    assert_parts_match(got, reference(student, all_lp, all_ids, mask, cfg, full=full))


def test_paper_sd_is_zero_with_zero_gradient_when_the_student_is_the_teacher() -> None:
    # One position per sequence: the plan is [[1]] and SD = ||t - s||_1 at tau_SD, so its minimum
    # 0 is reached at student = teacher. The renormalised top-K teacher (the former default) is
    # sharper than the real one: SD > 0 there, and its gradient pulls the student away.
    full, lp, ids = shared_top_k_case(2, T=1, v=40, K=12)
    student = full.clone().requires_grad_()
    mask = torch.ones(1, 1, dtype=torch.bool)
    cfg = MLOTConfig(k=8)
    parts = multilevel_ot_loss(student, lp, ids, mask, cfg, **exact(full, ids, cfg), return_parts=True)
    (grad,) = torch.autograd.grad(parts["sd"], student)
    assert parts["sd"].item() == pytest.approx(0.0, abs=1e-12) and parts["had"].item() == pytest.approx(0.0, abs=1e-12)
    assert grad.abs().max().item() < 1e-12

    approx = MLOTConfig(k=8, approximate_temperature=True)
    biased = multilevel_ot_loss(student, lp, ids, mask, approx, return_parts=True)
    (grad_biased,) = torch.autograd.grad(biased["sd"], student)
    assert biased["sd"].item() > 0.01 and grad_biased.abs().max().item() > 1e-3


def test_approximate_temperature_keeps_the_renormalised_teacher() -> None:
    student, lp, ids, _ = make_case(44, vs=10, vt=12, K=6)
    cfg = MLOTConfig(k=4, tau_sl=1.5, approximate_temperature=True)
    got = multilevel_ot_loss(student, lp, ids, MASK, cfg, return_parts=True)
    assert_parts_match(got, reference(student, lp, ids, MASK, cfg))


def test_paper_variant_without_the_tempered_teacher_is_refused() -> None:
    student, lp, ids, _ = make_case(0)
    with pytest.raises(ValueError, match=r"temperature 2 .*--temperatures 2.*approximate_temperature"):
        multilevel_ot_loss(student, lp, ids, MASK, MLOTConfig(k=4))


def test_code_variant_without_logit_stats_is_refused() -> None:
    student, lp, ids, _ = make_case(0)
    with pytest.raises(ValueError, match="--logit-stats"):
        multilevel_ot_loss(student, lp, ids, MASK, MLOTConfig(variant="code", k=4))


def test_code_variant_had_is_zero_when_the_student_is_the_teacher_even_with_k_below_v() -> None:
    # The std over the whole vocabulary and no renormalisation over K: the teacher's ranked
    # vector is exactly the student's. Before the fix (std of the K values, softmax over K) the
    # teacher came out different, and HAD > 0 at student = teacher.
    full, lp, ids = shared_top_k_case(3, T=5, v=120, K=64, boost=6.0)
    mask = torch.ones(1, 5, dtype=torch.bool)
    cfg = MLOTConfig(variant="code")
    parts = multilevel_ot_loss(full, lp, ids, mask, cfg, **exact(full, ids, cfg), return_parts=True)
    assert parts["had"].item() == pytest.approx(0.0, abs=1e-12)


def authors_code_value(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The authors' DistillationLoss (f=1) on full logits, restated with whole-tensor ops for one
    sequence with no padding (where their batch sums and our averages agree)."""
    def probs_ranked(logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits / (logits.std(dim=-1, keepdim=True) + 1e-4), dim=-1)
        return p[:, :, torch.argsort(p.sum(dim=(0, 1)), descending=True)][:, :, :50]

    ps, pt = probs_ranked(s), probs_ranked(t)
    had = (ps - pt).abs().sum(-1).mean()
    sl = -(torch.softmax(ps, -1) * torch.log_softmax(pt, -1)).sum(-1).mean()
    x, y = torch.softmax(pt[0] / 2, -1), torch.softmax(ps[0] / 2, -1)
    w = torch.cdist(x, y, p=1)
    plan = torch.exp(-w / 0.1)
    for _ in range(10):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    return 1.5 * (had + 0.1 * sl + 0.1 * 0.001 * (plan * w).sum())


def test_code_variant_reproduces_the_authors_pipeline() -> None:
    # A complete cache (K = V): the same value as the authors' code on the full logits.
    g = torch.Generator().manual_seed(0)
    T, vs, vt = 6, 80, 70
    s = torch.randn(1, T, vs, generator=g, dtype=torch.float64) * 3
    t = torch.randn(1, T, vt, generator=g, dtype=torch.float64) * 3
    lp, ids = torch.log_softmax(t, dim=-1).topk(vt, dim=-1)
    cfg = MLOTConfig(variant="code")
    ours = multilevel_ot_loss(s, lp, ids, torch.ones(1, T, dtype=torch.bool), cfg, **exact(t, ids, cfg))
    assert ours.item() == pytest.approx(authors_code_value(s, t).item(), rel=1e-12)


def test_code_variant_from_a_top_k_cache_equals_the_authors_pipeline() -> None:
    # K = 64 of V = 120, every ranked teacher id cached at every position: the cache's std and
    # std-normalised log-partition give the authors' value exactly (before the fix: about 2x HAD).
    t, lp, ids = shared_top_k_case(4, T=6, v=120, K=64, boost=6.0)
    s = torch.randn(1, 6, 90, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    cfg = MLOTConfig(variant="code")
    ours = multilevel_ot_loss(s, lp, ids, torch.ones(1, 6, dtype=torch.bool), cfg, **exact(t, ids, cfg))
    assert ours.item() == pytest.approx(authors_code_value(s, t).item(), rel=1e-12)


# --- student_rank="assignment" ---------------------------------------------------------------
def assignment_case():
    """One sequence, 3 positions. Teacher ranks ids [0, 1]; its columns over time are
    [.7, .1, .6] and [.2, .6, .3]. Student column 3 = [.6, .1, .5] matches the first, column 1
    = [.25, .7, .35] the second (total L1 0.4, the unique optimum), but column 1 has the larger
    sum (1.3 > 1.2), so ranking by sum pairs them the wrong way round."""
    t = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.6, 0.3, 0.1]]], dtype=torch.float64)
    s = torch.tensor(
        [[[0.1, 0.25, 0.05, 0.6], [0.15, 0.7, 0.05, 0.1], [0.1, 0.35, 0.05, 0.5]]], dtype=torch.float64
    )
    lp, ids = t.log().sort(dim=-1, descending=True)
    return s.log(), lp, ids, torch.ones(1, 3, dtype=torch.bool), t.log()


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_assignment_finds_the_hand_matching(variant: str) -> None:
    pytest.importorskip("scipy")
    student, lp, ids, mask, full = assignment_case()
    cfg = MLOTConfig(variant=variant, k=2, student_rank="assignment")
    got = multilevel_ot_loss(student, lp, ids, mask, cfg, **exact(full, ids, cfg), return_parts=True)
    assert_parts_match(got, reference(student, lp, ids, mask, cfg, student_ids=[[3, 1]], full=full))
    by_sum_cfg = MLOTConfig(variant=variant, k=2)
    by_sum = multilevel_ot_loss(student, lp, ids, mask, by_sum_cfg, **exact(full, ids, by_sum_cfg), return_parts=True)
    assert_parts_match(by_sum, reference(student, lp, ids, mask, by_sum_cfg, student_ids=[[1, 3]], full=full))
    assert got["had"].item() < by_sum["had"].item()


def test_assignment_per_sequence_and_gradient() -> None:
    pytest.importorskip("scipy")
    student, lp, ids, full = make_case(9, vs=8, vt=10, K=5)
    student.requires_grad_()
    cfg = MLOTConfig(k=4, student_rank="assignment")
    loss = multilevel_ot_loss(student, lp, ids, MASK, cfg, **exact(full, ids, cfg))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_assignment_without_scipy_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # makes the import fail
    student, lp, ids, mask, full = assignment_case()
    cfg = MLOTConfig(k=2, student_rank="assignment")
    with pytest.raises(ImportError, match=r"logitcache\[mlot\]. \(scipy\)"):
        multilevel_ot_loss(student, lp, ids, mask, cfg, **exact(full, ids, cfg))
