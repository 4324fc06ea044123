"""Peak memory and time of CE + KD from hidden states (losses.fused_linear) against the logits paths.

    python benchmarks/fused_linear.py                        # N=4096, d=2048, V=32000 and 128000, fp32, CPU
    python benchmarks/fused_linear.py --n 512 --vocab 32000  # a smoke run

Each case runs in a fresh process: the inputs (hidden states [N, d] and head weight [V, d] as
leaves, a top-K teacher, labels) are allocated, the high-water mark of resident memory is reset,
one forward + backward runs (after a warm-up on 8 positions per sequence: one-time allocations
such as BLAS buffers are not the loss's), and the mark is read. "extra" is that peak minus the resident memory
before, minus the gradients dh [N, d] and dW [V, d] that every path returns (they are the
training step's, not the loss's); with MALLOC_MMAP_THRESHOLD_=65536 large tensors are unmapped on
free, so resident memory follows live tensors (torch's CPU allocator keeps no cache). Time: the
mean ± std of ``--repeats`` steps in the same process, the measured one first. The cases:

- ``logits + F.cross_entropy``: SFT as a plain model computes it (logits, then torch's CE).
- ``logits + fused CE+KL``: the logits, then the trainer's fused pass over them (losses.fused).
- ``fused-linear CE`` / ``fused-linear CE+KL``: losses.fused_linear from h and W, block by block.
- ``--coupled``: ``logits + fused CE+MLOT`` / ``CE+ALM`` against ``fused-linear CE+MLOT`` / ``CE+ALM``,
  the losses that couple positions (MultiLevelOT "paper", k=50; ALM debiased, one chunk per position),
  from the logits (losses.fused) and from h and W (losses.fused_linear_coupled).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, update_results  # noqa: E402

# The head of every child: its arguments and torch's settings.
PRELUDE = r"""
import json, sys, time
import torch
import torch.nn.functional as F

name = sys.argv[1]
N, V, D, K, repeats, threads = map(int, sys.argv[2:8])
torch.manual_seed(0)
torch.set_num_threads(threads)
"""

# The tail of every child: step(t) runs forward + backward on t positions per sequence and
# returns the loss; warm up on 8, then time ``repeats`` steps, the peak read after the first.
MEASURE = r"""
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])  # KiB


step(8)  # warm-up on 8 positions per sequence: one-time allocations (thread pools, BLAS buffers) are not the loss's
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
seconds = []
for r in range(repeats):
    t0 = time.perf_counter()
    value = float(step())
    seconds.append(time.perf_counter() - t0)
    if r == 0:
        peak = status("VmHWM:")
print(json.dumps({"peak_extra_mib": (peak - before) / 1024, "seconds": seconds, "value": value}))
"""

CHILD = PRELUDE + r"""
from logitcache.losses import ALMTargets, FusedLoss, MLOTConfig, ce_kd_loss, fused_linear_ce_kd_loss

B = 4
h = (torch.randn(B, N // B, D) / D**0.5).requires_grad_()
w = (torch.randn(V, D) * 0.5).requires_grad_()
labels = torch.randint(0, V, (B, N // B))
# A top-K teacher: K distinct ids per position (one per stride of the vocabulary), 90% of the mass.
ids = (torch.arange(K) * (V // K) + torch.randint(0, V // K, (B, N // B, 1))).contiguous()
t_lp = torch.log_softmax(torch.randn(B, N // B, K) * 2, dim=-1) + torch.log(torch.tensor(0.9))
mask = torch.ones(B, N // B, dtype=torch.bool)
# MultiLevelOT's tempered teacher (tau_SD = 2) and ALM's chunks: one per position, debiased.
tempered = {2.0: torch.log_softmax(t_lp / 2, dim=-1)}
chunk_ll, chunk_ws = -torch.rand(B, N // B) * 5, -torch.rand(B, N // B)
word_starts = torch.rand(V) < 0.3
SPECS = {"mlot": FusedLoss("mlot", mlot=MLOTConfig(k=50)), "alm": FusedLoss("alm")}


def coupled_inputs(t):
    end = (torch.arange(t) + 1).clamp(max=t - 1).expand(B, t)
    alm = ALMTargets(torch.arange(t).expand(B, t), chunk_ll[:, :t], end, chunk_ws[:, :t], word_starts)
    return {"tempered": {tau: lp[:, :t] for tau, lp in tempered.items()}, "alm": alm}


def step(t=N // B):
    h.grad = w.grad = None
    x, y, lp, i, m = h[:, :t], labels[:, :t], t_lp[:, :t], ids[:, :t], mask[:, :t]
    if name == "ce":
        loss = F.cross_entropy(F.linear(x, w).flatten(0, 1)[:-1], y.flatten()[1:])
    elif name == "fused-kl":
        loss, _, _ = ce_kd_loss(F.linear(x, w), y, lp, i, m, FusedLoss("kl"))
    elif name in ("fused-mlot", "fused-alm"):
        loss, _, _ = ce_kd_loss(F.linear(x, w), y, lp, i, m, SPECS[name[6:]], **coupled_inputs(t))
    elif name in ("linear-mlot", "linear-alm"):
        loss, _, _ = fused_linear_ce_kd_loss(x, w, None, y, lp, i, m, SPECS[name[7:]], **coupled_inputs(t))
    else:
        spec = FusedLoss("sft" if name == "linear-sft" else "kl")
        loss, _, _ = fused_linear_ce_kd_loss(x, w, None, y, lp, i, m, spec)
    loss.backward()
    h.grad = w.grad = None
    return loss.detach()
""" + MEASURE

CASES = [
    ("ce", "logits + F.cross_entropy (SFT)"),
    ("fused-kl", "logits + fused CE+KL (losses.fused)"),
    ("linear-sft", "fused-linear CE"),
    ("linear-kl", "fused-linear CE+KL"),
]
# --coupled: the losses that couple positions (slow at the default sizes: one more pass over the
# head than the others, in smaller blocks).
COUPLED_CASES = [
    ("fused-mlot", "logits + fused CE+MLOT (losses.fused)"),
    ("linear-mlot", "fused-linear CE+MLOT (two passes)"),
    ("fused-alm", "logits + fused CE+ALM (losses.fused)"),
    ("linear-alm", "fused-linear CE+ALM (two passes)"),
]


def measure(name: str, n: int, v: int, d: int, k: int, repeats: int, threads: int, child: str = CHILD) -> dict:
    """Run case ``name`` of ``child`` in a fresh process: its peak extra MiB, step seconds and loss value."""
    r = subprocess.run(
        [sys.executable, "-c", child, name, str(n), str(v), str(d), str(k), str(repeats), str(threads)],
        capture_output=True, text=True, check=False,  # a failure is reported with its stderr below
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="positions (default 4096)")
    ap.add_argument("--hidden", type=int, default=2048, help="d, the hidden size (default 2048)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000], help="vocabularies (default 32000 128000)")
    ap.add_argument("--k", type=int, default=64, help="teacher top-K (default 64)")
    ap.add_argument("--repeats", type=int, nargs="+", default=[3, 1],
                    help="timed steps per case, one number per --vocab (default 3 1; the first is the measured one)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--coupled", action="store_true", help="also MultiLevelOT and ALM, from the logits and from h and W")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    n, d = args.n, args.hidden
    rows = []
    cases = CASES + (COUPLED_CASES if args.coupled else [])
    repeats = dict(zip(args.vocab, args.repeats + args.repeats[-1:] * len(args.vocab)))
    for v in args.vocab:
        logits_mib = n * v * 4 / 2**20
        grads_mib = (n + v) * d * 4 / 2**20
        results = {}
        for name, label in cases:
            r = results[name] = measure(name, n, v, d, args.k, repeats[v], args.threads)
            print(f"V={v} {label}: {r}", file=sys.stderr, flush=True)
        base = statistics.mean(results["ce"]["seconds"])
        for name, label in cases:
            r = results[name]
            extra = r["peak_extra_mib"] - grads_mib
            rows.append([f"{v:,}", label, f"{r['peak_extra_mib']:,.0f}", f"{extra:,.0f}", f"{extra / logits_mib:.3f}",
                         mean_std(r["seconds"]), f"{statistics.mean(r['seconds']) / base:.2f}x"])
    report = (
        f"## Fused-linear CE + KD (losses.fused_linear; {time.strftime('%Y-%m-%d')}, {time.perf_counter() - t0:.0f} s)\n\n"
        f"Machine: {machine()}; {args.threads} torch threads, shared with other jobs.\n\n"
        f"`python benchmarks/fused_linear.py --n {n} --hidden {d} --vocab {' '.join(map(str, args.vocab))} "
        f"--repeats {' '.join(map(str, args.repeats))}{' --coupled' if args.coupled else ''}`: N={n} positions (4 sequences), d={d}, K={args.k}, fp32, CPU, forward + backward "
        "of the loss and the head (no model body). Goal: extra ≤ 0.1× the logits.\n\n"
        + table(["V", "path", "peak MiB", "extra MiB (peak − dh − dW)", "extra × logits", "s/step, mean ± std",
                 "time vs F.cross_entropy"], rows)
        + "\n\nPeak = VmHWM after the first forward + backward minus VmRSS before it, in a fresh process "
        "per case (MALLOC_MMAP_THRESHOLD_=65536), after a warm-up step on 8 positions per sequence. dh [N, d] and dW [V, d] "
        f"({', '.join(f'V={v:,}: {(n + v) * d * 4 / 2**20:,.0f} MiB' for v in args.vocab)}) are subtracted: every path "
        "returns them. The logits [N, V] in fp32 are "
        f"{', '.join(f'V={v:,}: {n * v * 4 / 2**20:,.0f} MiB' for v in args.vocab)}; the logits paths hold them and "
        "their gradient. Time: mean ± std of the timed steps (the measured one first), same process; a single "
        "number where one step was timed.\n"
    )
    print(report)
    if not args.no_write:
        update_results("fused-linear", report)


if __name__ == "__main__":
    main()
