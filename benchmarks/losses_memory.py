"""Peak memory and time of each KD loss, forward + backward, against an SFT cross-entropy baseline.

    python benchmarks/losses_memory.py                 # N=4096 positions, Vs=32000, K=64, fp32, CPU
    python benchmarks/losses_memory.py --n 1024        # smaller, for a smoke run

Each loss runs in a fresh process: the high-water mark of its resident memory is reset right
before the loss (inputs already allocated) and read right after its backward pass, so the
figure is what the loss adds on top of the student logits, including the logits' gradient
that every loss has to produce. Prints a markdown table and writes it to RESULTS.md
(section `losses`) unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, update_results  # noqa: E402

CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F
from logitcache.losses import MLOTConfig, kl_loss, multilevel_ot_loss, uld_loss

name = sys.argv[1]
N, V, K, B = map(int, sys.argv[2:6])
T = N // B
torch.manual_seed(0)
torch.set_num_threads(1)


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])  # KiB


# Inputs, allocated before the measurement as they would be in training: the student logits
# (a leaf standing in for the LM head's output), a top-K cache of a random teacher, labels.
logits = torch.randn(N, V).requires_grad_()
with torch.no_grad():
    lps, idss = [], []
    for a in range(0, N, 256):
        lp, ids = torch.log_softmax(torch.randn(min(256, N - a), V) * 3, dim=-1).topk(K, dim=-1)
        lps.append(lp)
        idss.append(ids)
    t_lp, t_ids = torch.cat(lps), torch.cat(idss)
labels = torch.randint(0, V, (N,))
mask = torch.ones(N, dtype=torch.bool)


def step():
    if name == "ce":
        loss = F.cross_entropy(logits, labels)
    elif name == "uld":
        loss = uld_loss(logits, t_lp, mask)
    elif name.startswith("kl-"):
        loss = kl_loss(logits, t_lp, t_ids, mask, kind=name[3:])
    else:
        _, variant, rank = name.split("-")
        loss = multilevel_ot_loss(
            logits.view(B, T, V), t_lp.view(B, T, K), t_ids.view(B, T, K), mask.view(B, T),
            MLOTConfig(variant=variant, student_rank=rank),
        )
    loss.backward()


# Reset the high-water mark (Linux >= 4.0) so the import and input peaks do not hide ours.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
step()
peak = status("VmHWM:")
seconds = []
for _ in range(2):
    logits.grad = None
    t0 = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - t0)
print(json.dumps({"peak_extra_mib": (peak - before) / 1024, "seconds": min(seconds)}))
"""

LOSSES = [
    ("ce", "SFT cross-entropy (baseline)"),
    ("uld", "ULD"),
    ("kl-forward", "KL forward"),
    ("kl-reverse", "KL reverse"),
    ("kl-jsd", "JSD (beta=0.5)"),
    ("mlot-paper-sum", "MultiLevelOT, paper"),
    ("mlot-code-sum", "MultiLevelOT, code"),
    ("mlot-paper-assignment", "MultiLevelOT, paper, student_rank=assignment"),
]


def measure(name: str, n: int, v: int, k: int, b: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(n), str(v), str(k), str(b)],
        capture_output=True, text=True, check=False,  # a failure is reported with its stderr below
        # Fixed mmap threshold: large tensors are mapped and unmapped, so RSS tracks live tensor
        # memory instead of what glibc's heap keeps after a free.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="positions (default 4096)")
    ap.add_argument("--vocab", type=int, default=32000, help="student (and teacher) vocabulary (default 32000)")
    ap.add_argument("--k", type=int, default=64, help="teacher top-K in the cache (default 64)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--sequences", type=int, default=8, help="MultiLevelOT: N split into this many sequences (default 8)")
    args = ap.parse_args()
    n, v, k, b = args.n, args.vocab, args.k, args.sequences
    if n % b:
        ap.error("--n must be a multiple of --sequences")
    try:
        import scipy  # noqa: F401
        losses = LOSSES
    except ImportError:
        losses = [x for x in LOSSES if not x[0].endswith("assignment")]

    logits_mib = n * v * 4 / 2**20
    rows = []
    for name, label in losses:
        r = measure(name, n, v, k, b)
        rows.append((label, r["peak_extra_mib"], r["peak_extra_mib"] / logits_mib, r["seconds"]))
    ce = rows[0][1]

    lines = [
        f"## KD losses ({time.strftime('%Y-%m-%d')})\n",
        f"Machine: {machine()}\n",
        f"### Peak memory of the KD losses, forward + backward (N={n} positions, Vs={v}, K={k}, fp32, CPU, 1 thread)\n",
        "| loss | peak extra MiB | × student logits | × SFT CE | fwd+bwd s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {label} | {mib:,.0f} | {ratio:.2f} | {mib / ce:.2f} | {secs:.2f} |" for label, mib, ratio, secs in rows]
    lines.append(
        f"\nThe student logits [N, Vs] are {logits_mib:,.0f} MiB; their gradient (the same size) is part "
        f"of every row. MultiLevelOT runs on {b} sequences of {n // b} positions. Peak extra = VmHWM after "
        "forward + backward minus VmRSS before, in a fresh process per loss (MALLOC_MMAP_THRESHOLD_=65536); "
        "time = best of 2 further runs."
    )
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        update_results("losses", report)

if __name__ == "__main__":
    main()
