"""Same-vocabulary forward KL from a top-K teacher: ours against the peers, in one run, at equal values.

    python benchmarks/peers.py                       # N=2048, V=32000, d=1024, K=64, fp32, CPU
    python benchmarks/peers.py --n 256 --hidden 128  # a smoke run

Peers (benchmark-only installs, ``make bench``; not dependencies of logitcache):

- Liger-Kernel's ``LigerFusedLinearJSDLoss`` at beta=0 (forward KL), its chunked fused-linear
  distillation loss. Its chunked losses are torch code and run on CPU (``compiled=False``: the
  default torch.compile would time the compiler); its Triton kernels are GPU-only and not run.
  It takes the teacher as hidden states and a head: here a head that reproduces the top-K
  teacher exactly (one-hot rows, see ``_teacher_head``).
- torchtune's ``ForwardKLWithChunkedOutputLoss`` over 8 chunks of logits; it takes the
  teacher's full [N, V] logits (here the top-K log-probs, -inf elsewhere). Its value is the
  cross-entropy to the teacher, KL + H(teacher): the teacher's entropy is subtracted to compare.
  Loaded from the installed package's file, as torchtune's ``__init__`` imports torchao.
- plain PyTorch: logits, log_softmax, the KL at the teacher's ids.

Ours: the trainer's fused pass over the logits (losses.fused) and fused-linear from the hidden
states (losses.fused_linear), forward KL, token mean, no CE target (labels -100: CE is 0).
The teacher's top-K sums to 1, so the top-K KL (with its tail bucket) is the full-vocabulary KL
the peers compute. Every case's loss value is checked equal (1e-4 relative) before reporting.
Memory and time are measured as in benchmarks/fused_linear.py (fresh process per case; peak RSS
after the first forward + backward minus RSS before, less dh and dW).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, update_results  # noqa: E402
from fused_linear import MEASURE, PRELUDE, mean_std, measure  # noqa: E402

CHILD = PRELUDE + r"""
import importlib.util
from logitcache.losses import FusedLoss, ce_kd_loss, fused_linear_ce_kd_loss

B = 2
h = (torch.randn(B, N // B, D) / D**0.5).requires_grad_()
w = (torch.randn(V, D) * 0.5).requires_grad_()
# The top-K teacher: the same K ids at every position (so that a head can produce it), log-probs summing to 1.
top = torch.randperm(V)[:K]
t_lp = torch.log_softmax(torch.randn(B, N // B, K) * 2, dim=-1)
t_ids = top.expand(B, N // B, K)
mask = torch.ones(B, N // B, dtype=torch.bool)
labels = torch.randint(0, V, (B, N // B))  # the peers' mask: every position counts
no_ce = torch.full((B, N // B), -100)


def _teacher_head():
    # Hidden states [N, K+1] = (log-probs, -1e4) and a one-hot head [V, K+1]: logits are the
    # log-probs at the top ids and -1e4 (probability 0 in fp32) elsewhere, exactly.
    head = torch.zeros(V, K + 1)
    head[:, K] = 1.0
    head[top] = 0.0
    head[top, torch.arange(K)] = 1.0
    hidden = torch.cat([t_lp.reshape(-1, K), torch.full((N, 1), -1e4)], dim=1)
    return hidden, head


if name == "liger":
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=False)
    t_hidden, t_head = _teacher_head()
elif name == "torchtune":
    spec = importlib.util.find_spec("torchtune")
    path = spec.submodule_search_locations[0] + "/modules/loss/kd_losses.py"
    module_spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    kd_losses = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(kd_losses)
    tt = kd_losses.ForwardKLWithChunkedOutputLoss(num_output_chunks=8)
    # The teacher's full logits, an input like h (a teacher forward pass would produce them).
    t_full = torch.full((B, N // B, V), float("-inf")).scatter_(2, t_ids, t_lp)
    entropy = float(-(t_lp.exp() * t_lp).sum(-1).mean())


def step(t=N // B):
    x = h[:, :t]
    if name == "plain":
        s = torch.log_softmax(F.linear(x, w), dim=-1)
        loss = (t_lp[:, :t].exp() * (t_lp[:, :t] - s.gather(-1, t_ids[:, :t]))).sum(-1).mean()
    elif name == "fused":
        loss = ce_kd_loss(F.linear(x, w), no_ce[:, :t], t_lp[:, :t], t_ids[:, :t], mask[:, :t],
                          FusedLoss("kl", reduction="token"))[0]
    elif name == "fused-linear":
        loss = fused_linear_ce_kd_loss(x, w, None, no_ce[:, :t], t_lp[:, :t], t_ids[:, :t], mask[:, :t],
                                       FusedLoss("kl", reduction="token"))[0]
    elif name == "liger":
        rows = x.shape[0] * t
        keep = torch.cat([torch.arange(i * (N // B), i * (N // B) + t) for i in range(B)])
        loss = liger(x.reshape(rows, D), w, t_hidden[keep], t_head, labels[:, :t].reshape(rows))
    else:
        logits = [c for c in F.linear(x, w).chunk(8, dim=1)]
        loss = tt(logits, list(t_full[:, :t].chunk(8, dim=1)), labels[:, :t]) - entropy
    loss.backward()
    h.grad = w.grad = None
    return loss.detach()
""" + MEASURE

CASES = [
    ("plain", "plain PyTorch: logits, log_softmax, KL at the teacher ids"),
    ("fused", "ours: fused pass over the logits (losses.fused)"),
    ("fused-linear", "ours: fused-linear from hidden states (losses.fused_linear)"),
    ("liger", "Liger-Kernel LigerFusedLinearJSDLoss(beta=0), torch chunked path, compiled=False"),
    ("torchtune", "torchtune ForwardKLWithChunkedOutputLoss (8 chunks) − H(teacher)"),
]


def available(name: str) -> str | None:
    """Why a peer cannot run here, or None."""
    package = {"liger": "liger_kernel", "torchtune": "torchtune"}.get(name)
    if package and importlib.util.find_spec(package) is None:
        return f"{package} not installed (make bench installs it)"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="positions, 2 sequences (default 2048)")
    ap.add_argument("--hidden", type=int, default=1024, help="d (default 1024)")
    ap.add_argument("--vocab", type=int, default=32000, help="V (default 32000)")
    ap.add_argument("--k", type=int, default=64, help="teacher top-K (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per case, the measured one first (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    n, v, d, k = args.n, args.vocab, args.hidden, args.k
    logits_mib, grads_mib = n * v * 4 / 2**20, (n + v) * d * 4 / 2**20
    results, skipped = {}, []
    for name, label in CASES:
        why = available(name)
        if why:
            skipped.append(f"{label}: {why}")
            continue
        results[name] = measure(name, n, v, d, k, args.repeats, args.threads, child=CHILD)
        print(f"{label}: {results[name]}", file=sys.stderr, flush=True)
    ref = results["plain"]["value"]
    for name, r in results.items():
        if abs(r["value"] - ref) > 1e-4 * abs(ref):
            raise SystemExit(f"{name}'s KL {r['value']!r} differs from plain PyTorch's {ref!r}: not the same loss")
    base = statistics.mean(results["plain"]["seconds"])
    rows = []
    for name, label in CASES:
        if name in results:
            r = results[name]
            extra = r["peak_extra_mib"] - grads_mib
            rows.append([label, f"{r['value']:.6f}", f"{extra:,.0f}", f"{extra / logits_mib:.3f}", mean_std(r["seconds"]),
                         f"{statistics.mean(r['seconds']) / base:.2f}x"])
    report = (
        f"## Peers: forward KL from a top-K teacher ({time.strftime('%Y-%m-%d')}, {time.perf_counter() - t0:.0f} s)\n\n"
        f"Machine: {machine()}; {args.threads} torch threads, shared with other jobs. No GPU here: Liger-Kernel's "
        "Triton kernels (its non-chunked fused-linear losses) were not run.\n\n"
        f"`python benchmarks/peers.py --n {n} --hidden {d} --vocab {v} --k {k} --repeats {args.repeats}`: N={n} "
        f"positions, d={d}, V={v}, K={k}, fp32, CPU, forward + backward of the loss and the head. Every value "
        "below was checked equal to plain PyTorch's (1e-4 relative).\n\n"
        + table(["implementation", "KL value", "extra MiB (peak − dh − dW)", "extra × logits", "s/step, mean ± std",
                 "time vs plain"], rows)
        + f"\n\nThe logits [N, V] are {logits_mib:,.0f} MiB in fp32. torchtune's input includes the teacher's full "
        "logits (allocated before the measurement, like h); Liger reads a teacher head (here [V, K+1], one-hot) "
        "and computes the teacher's logits chunk by chunk (1024 rows, its default), as it would a real teacher's.\n"
        + "".join(f"\nNot run: {s}." for s in skipped)
    )
    print(report)
    if not args.no_write:
        update_results("peers", report)


if __name__ == "__main__":
    main()
