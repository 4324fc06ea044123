"""Peak memory and time of each KD loss, forward + backward, against an SFT cross-entropy baseline.

    python benchmarks/losses_memory.py                 # N=4096 positions, Vs=32000, K=64, fp32, CPU
    python benchmarks/losses_memory.py --n 1024        # smaller, for a smoke run

Each loss runs in a fresh process: the high-water mark of its resident memory is reset right
before the loss (inputs already allocated) and read right after its backward pass, so the
figure is what the loss adds on top of the student logits, including the logits' gradient
that every loss has to produce. Prints a markdown table and writes it to RESULTS.md
(section `losses`) unless --no-write.

ULD and KL run twice: one pass over all N (``chunk_size=None``) and chunked (1024 positions,
the default). ULD is also timed against :func:`uld_full_sort`, a straightforward version that
sorts the whole student vocabulary; the two are checked equal on a small case first.
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

CHUNK = 1024


def uld_full_sort(student_logits, teacher_logprobs, mask):  # noqa: ANN001, ANN201 (tensors)
    """ULD as written in the paper, top-K teacher: full descending sort of the student's softmax, no chunks."""
    import torch

    s = torch.softmax(student_logits, dim=-1).sort(dim=-1, descending=True).values  # [N, Vs]
    t = teacher_logprobs.to(s.dtype).exp().sort(dim=-1, descending=True).values  # [N, K]
    k = t.shape[-1]
    if s.shape[-1] < k:
        s = torch.nn.functional.pad(s, (0, k - s.shape[-1]))
    t_tail = (1.0 - t.sum(dim=-1)).clamp_min(0.0)
    per_position = (s[:, :k] - t).abs().sum(dim=-1) + (s[:, k:].sum(dim=-1) - t_tail).abs()
    per_position = torch.where(mask, per_position, torch.zeros_like(per_position))
    return per_position.sum() / mask.sum().clamp_min(1).to(per_position.dtype)


def check_full_sort_reference() -> None:
    """uld_full_sort and uld_loss (chunked and not) agree to 1e-5 in float64, values and gradients."""
    import torch

    from logitcache.losses import uld_loss

    g = torch.Generator().manual_seed(0)
    for vs, k in [(50, 8), (6, 8)]:
        logits = (torch.randn(40, vs, generator=g, dtype=torch.float64) * 3).requires_grad_()
        t_lp = torch.log_softmax(torch.randn(40, 30, generator=g, dtype=torch.float64) * 3, dim=-1).topk(k).values
        mask = torch.rand(40, generator=g) > 0.3
        want = uld_full_sort(logits, t_lp, mask)
        (want_grad,) = torch.autograd.grad(want, logits)
        for chunk_size in (None, 7):
            got = uld_loss(logits, t_lp, mask, chunk_size=chunk_size)
            (got_grad,) = torch.autograd.grad(got, logits)
            assert abs(got.item() - want.item()) < 1e-5, (vs, k, chunk_size, got.item(), want.item())
            assert torch.allclose(got_grad, want_grad, rtol=0, atol=1e-5), (vs, k, chunk_size)


CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F
from logitcache.losses import ALMTargets, MLOTConfig, kl_loss, multilevel_ot_loss, uld_loss
from logitcache.pipeline.student.losses import FusedLoss, ce_kd_loss
from losses_memory import CHUNK, uld_full_sort

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
        loss = uld_loss(logits, t_lp, mask, chunk_size=None)
    elif name == "uld-chunked":
        loss = uld_loss(logits, t_lp, mask, chunk_size=CHUNK)
    elif name == "uld-fullsort":
        loss = uld_full_sort(logits, t_lp, mask)
    elif name == "fused-hybrid":
        # Teacher entries mapped to student ids, every other one unmatched (-1), as across tokenizers.
        mapped = torch.where(torch.arange(K) % 2 == 0, t_ids, -1)
        loss, _, _ = ce_kd_loss(logits.view(B, T, V), labels.view(B, T), t_lp.view(B, T, K), mapped.view(B, T, K),
                                mask.view(B, T), FusedLoss("hybrid"))
    elif name == "fused-alm":
        # Chunks of 3 positions, each debiased at its last one; a student word-start mask of 40%.
        chunk = (torch.arange(T) // 3).expand(B, T).contiguous()
        c = int(chunk.max()) + 1
        end = (torch.arange(c) * 3 + 2).clamp(max=T - 1).expand(B, c).contiguous()
        targets = ALMTargets(chunk, -torch.rand(B, c) * 8, end, -torch.rand(B, c), torch.rand(V) < 0.4)
        loss, _, _ = ce_kd_loss(logits.view(B, T, V), labels.view(B, T), t_lp.view(B, T, K), t_ids.view(B, T, K),
                                mask.view(B, T), FusedLoss("alm", weight=100.0), alm=targets)
    elif name.startswith("fused-"):
        # tempered: a stand-in of the teacher at MultiLevelOT's tau_SD = 2 (memory, not values, is measured).
        loss, _, _ = ce_kd_loss(logits.view(B, T, V), labels.view(B, T), t_lp.view(B, T, K), t_ids.view(B, T, K),
                                mask.view(B, T), FusedLoss(name[len("fused-"):]), tempered={2.0: t_lp.view(B, T, K)})
    elif name.startswith("kl-"):
        kind, _, chunked = name[3:].partition("-")
        loss = kl_loss(logits, t_lp, t_ids, mask, kind=kind, chunk_size=CHUNK if chunked else None)
    else:
        _, variant, rank = name.split("-")
        # Stand-ins of the exact teacher targets a cache gives (memory, not values, is measured).
        loss = multilevel_ot_loss(
            logits.view(B, T, V), t_lp.view(B, T, K), t_ids.view(B, T, K), mask.view(B, T),
            MLOTConfig(variant=variant, student_rank=rank),
            tempered={2.0: t_lp.view(B, T, K)}, std_logprobs=t_lp.view(B, T, K),
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
    ("uld-chunked", f"ULD chunked {CHUNK}"),
    ("uld-fullsort", "ULD, full-sort reference"),
    ("kl-forward", "KL forward"),
    ("kl-forward-chunked", f"KL forward chunked {CHUNK}"),
    ("kl-reverse", "KL reverse"),
    ("kl-jsd", "JSD (beta=0.5)"),
    ("mlot-paper-sum", "MultiLevelOT, paper"),
    ("mlot-code-sum", "MultiLevelOT, code"),
    ("mlot-paper-assignment", "MultiLevelOT, paper, student_rank=assignment"),
    ("fused-sft", "trainer's fused pass: CE only"),
    ("fused-uld", "trainer's fused pass: CE + ULD"),
    ("fused-kl", "trainer's fused pass: CE + KL forward"),
    ("fused-mlot", "trainer's fused pass: CE + MultiLevelOT, paper"),
    ("fused-hybrid", "trainer's fused pass: CE + hybrid (GOLD)"),
    ("fused-alm", "trainer's fused pass: CE + ALM, debiased"),
]


def measure(name: str, n: int, v: int, k: int, b: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(n), str(v), str(k), str(b)],
        cwd=Path(__file__).resolve().parent,  # the child imports uld_full_sort from this file
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

    check_full_sort_reference()
    logits_mib = n * v * 4 / 2**20
    rows = []
    for name, label in losses:
        r = measure(name, n, v, k, b)
        print(f"{label}: {r}", file=sys.stderr, flush=True)
        rows.append((name, label, r["peak_extra_mib"], r["peak_extra_mib"] / logits_mib, r["seconds"]))
    ce = rows[0][2]
    ref_s = next(secs for name, *_, secs in rows if name == "uld-fullsort")

    def vs_ref(name: str, secs: float) -> str:
        return f"{secs / ref_s:.2f}×" if name.startswith("uld") else ""

    lines = [
        f"## KD losses ({time.strftime('%Y-%m-%d')})\n",
        f"Machine: {machine()}\n",
        f"### Peak memory of the KD losses, forward + backward (N={n} positions, Vs={v}, K={k}, fp32, CPU, 1 thread)\n",
        "| loss | peak extra MiB | × student logits | × SFT CE | fwd+bwd s | time vs full-sort reference |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {mib:,.0f} | {ratio:.2f} | {mib / ce:.2f} | {secs:.2f} | {vs_ref(name, secs)} |"
        for name, label, mib, ratio, secs in rows
    ]
    lines.append(
        f"\nThe student logits [N, Vs] are {logits_mib:,.0f} MiB; their gradient (the same size) is part "
        "of every row. ULD/KL rows without \"chunked\" run chunk_size=None (one pass over N); chunked "
        f"rows recompute each chunk of {CHUNK} positions in backward, so beyond the gradient they hold one "
        "chunk's intermediates. The full-sort reference sorts the whole student softmax (checked equal to "
        "uld_loss to 1e-5 in float64 first); the last column is time / its time. MultiLevelOT runs on "
        f"{b} sequences of {n // b} positions; its paper variant goes through the fused pass (chunked over "
        "positions, no CE target), the code variant and the assignment ranking are not chunked. Peak extra = VmHWM after "
        "forward + backward minus VmRSS before, in a fresh process per loss (MALLOC_MMAP_THRESHOLD_=65536); "
        "time = best of 2 further runs. The hybrid row maps every other teacher entry to a student id (the rest unmatched); the ALM row has chunks of 3 positions, each debiased (its word-start log-partition over a random 40% of the vocabulary). The \"trainer's fused pass\" rows are what `logitcache train` "
        "runs: CE and the KD term together (losses.fused), so compare them with the SFT CE row plus the "
        "KD row, not with the KD row alone."
    )
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        update_results("losses", report)

if __name__ == "__main__":
    main()
