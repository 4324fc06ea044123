"""The GPU benchmarks of issue 17 §4, in one run of at most 10 minutes on one GPU (an H200 here).

1. Teacher stage: tokens/s of stage 1 (``run_teacher``, hf engine, bf16, k=64, writing a real
   cache) against a bare bf16 forward of the same ~1B-parameter random-init Llama over the same
   length-sorted batches (benchmarks/stage1.py's ``bare_forward_seconds``). Goal: ≥ 0.9.
2. Student step: SFT with ``F.cross_entropy`` vs KL from a top-64 teacher through the logits
   (``losses.fused.ce_kd_loss``) and from hidden states + head (``losses.fused_linear``), on the
   same ~1B Llama in bf16: step time (forward + backward + AdamW, rounds interleaved) and peak
   GPU memory (``torch.cuda.max_memory_allocated``).
3. Peers that need a GPU: Liger-Kernel's ``LigerFusedLinearJSD(jsd_beta=0)`` (Triton kernels) and
   ``LigerFusedLinearJSDLoss(beta=0)`` (chunked torch, compiled and eager), same-vocabulary
   forward KL from top-K, at values checked equal to plain PyTorch's (benchmarks/peers.py's cases,
   run on the GPU).

On the device machine (the repo root; its ``python3`` holds torch; ``$OUT`` comes back), with
``carry: [".whl"]`` and ``timeout_s: 600``, this one line:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. && PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out-json $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

Then here, from the files that came back: ``python benchmarks/gpu.py --from-json FILES_AT/gpu.json``
writes the section "gpu" of benchmarks/RESULTS.md (edits to RESULTS.md on that machine are lost).

What travels as wheels. That machine has torch, transformers, tokenizers, pyarrow, numpy, typer,
rich, pyyaml, accelerate, fsspec, pandas, xxhash, huggingface-hub, filelock, tqdm (KINDS.md), but
not ``datasets`` (stage 1 reads its input through it) nor its needs ``dill`` and ``multiprocess``,
nor ``liger_kernel`` (part 3). Without them part 1 or part 3 records one line and the rest runs.
Once, here, in the repo root (versions as in our venv; ``multiprocess`` is per Python version):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger_kernel==0.8.5

``datasets`` 5.2 asks for pyarrow ≥ 24 and fsspec ≤ 2026.9.0; ``--no-deps`` does not check what is
there, so if part 1 fails importing ``datasets``, pick the ``datasets`` release that matches
``python3 -m pip show pyarrow fsspec`` there. Of pyproject.toml's core dependencies only ``datasets``
is missing there; ``zstandard`` is not one (pyarrow writes the zstd Parquet), and nothing here needs
``mistral_common``: the teacher's tokenizer is a byte-level BPE trained in the run (the model's
vocabulary is 32000 regardless). The four wheels are about 1.8 MB.

Here, without a GPU: ``python benchmarks/gpu.py --smoke --no-write`` runs every part at tiny
sizes on the CPU (under a minute). ``--budget-s`` (default 540) skips a part, with a recorded
line, when the time spent plus its estimate would pass it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, update_results  # noqa: E402

# The device machine reaches no network: a hub look-up there would wait on a timeout, not fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@dataclass(frozen=True)
class Llama:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int


# ~0.95B parameters (822M in the 16 blocks, 131M in the untied embedding and head).
LLAMA_1B = Llama(hidden=2048, layers=16, heads=32, intermediate=5632, vocab=32000)
LLAMA_SMOKE = Llama(hidden=64, layers=2, heads=4, intermediate=128, vocab=1000)

# Rough seconds per part on the H200 (the model's build and save included), for the budget:
# a part starts only if the time spent plus its estimate stays within --budget-s.
ESTIMATES = {"teacher": 150, "steps": 90, "peers": 150}
K = 64


@dataclass
class Sizes:
    """What each part runs at: full (the GPU) or smoke (tiny, any device)."""

    llama: Llama
    records: int  # teacher stage: records of ``lines`` generated Q/A lines (~1k tokens each in full)
    lines: int
    teacher_batch: int
    batch: int  # student step: B x T
    seq: int
    rounds: int
    peer_n: int  # peers: positions, hidden size, vocabulary
    peer_d: int
    peer_v: int
    peer_repeats: int


# Teacher: 2048 records of ~1k tokens (~2M tokens, some seconds of a bare forward on an H200), so
# that the pipeline's fixed costs (its first window is read before the GPU starts) weigh little.
FULL = Sizes(LLAMA_1B, records=2048, lines=40, teacher_batch=16, batch=8, seq=1024, rounds=30,
             peer_n=8192, peer_d=2048, peer_v=32000, peer_repeats=10)
SMOKE = Sizes(LLAMA_SMOKE, records=16, lines=4, teacher_batch=4, batch=2, seq=64, rounds=2,
              peer_n=64, peer_d=32, peer_v=1000, peer_repeats=2)


def build_llama(shape: Llama, device: str, dtype: str = "bfloat16", tokenizer=None):
    """A randomly initialised LlamaForCausalLM of ``shape`` (untied head), built on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=2048, tie_word_embeddings=False, **ids,
    )
    torch.manual_seed(0)
    # Built in place on the device and in its dtype: no fp32 CPU copy of 1B parameters first.
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()


def sync(device: str) -> None:
    """Wait for the device's queued kernels (CUDA is asynchronous) before reading a clock."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def params_b(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e9


# --- 1. teacher stage vs bare forward -------------------------------------------------------
def teacher_stage(work: Path, device: str, sizes: Sizes) -> tuple[str, dict]:
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        return ("### 1. Teacher stage vs bare forward\n\nNot run: `datasets` is not installed (stage 1 reads its "
                "input through it); carry its wheels, see the docstring of benchmarks/gpu.py.\n"), {}
    import torch

    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import TeacherConfig, run_teacher
    from logitcache.pipeline.tiny import generate_corpus, train_bpe_tokenizer
    from stage1 import bare_forward_seconds
    from stage2 import write_long_records

    shape = sizes.llama
    tok = train_bpe_tokenizer(generate_corpus(2000), 512)
    model_dir = work / "teacher"
    model = build_llama(shape, device, tokenizer=tok)
    billions = params_b(model)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    data = write_long_records(work / "long.jsonl", sizes.records, sizes.lines)
    texts = [json.loads(line)["text"] for line in data.read_text(encoding="utf-8").splitlines()]
    # The bare forward first, warmed up: the pipeline after it then finds CUDA and cuBLAS
    # initialised in this process too, so neither pays the one-time start-up.
    secs, tokens = bare_forward_seconds(model_dir, texts, sizes.teacher_batch, device=device, dtype="bfloat16",
                                        warmup=True)
    bare = tokens / secs
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    r = run_teacher(
        TeacherConfig(model=str(model_dir), data=str(data), out=str(work / "cache"), top_k=K,
                      batch_size=sizes.teacher_batch, template=TextTemplate(text_field="text"),
                      device=device, dtype="bfloat16"),
        progress=False,
    )
    ratio = r.tokens_per_second / bare
    rows = [[f"{r.manifest.num_tokens:,}", f"{r.tokens_per_second:,.0f}", f"{bare:,.0f}", f"{ratio:.2f}",
             f"{r.overhead:.1%}", f"{r.manifest.num_bytes / r.manifest.num_tokens:.1f}"]]
    out = (
        f"### 1. Teacher stage vs bare forward (random-init Llama, {billions:.2f}B parameters: hidden {shape.hidden}, "
        f"{shape.layers} layers, {shape.heads} heads, intermediate {shape.intermediate}, V={shape.vocab}; bf16, "
        f"k={K}, {sizes.records} records, batch {sizes.teacher_batch})\n\n"
        + table(["tokens", "stage 1 tokens/s (run_teacher, hf)", "bare bf16 forward tokens/s", "stage 1 / bare (goal ≥ 0.9)",
                 "overhead beyond the engine", "bytes/token on disk"], rows)
        + "\n\nStage 1 is `run_teacher` with its defaults (score mode, v1 codec, the τ=2 log-normaliser and the "
        "word-start log-mass per position), reading JSON lines, tokenizing with offsets and writing zstd Parquet "
        "beside the GPU; its time starts after the model is loaded. 'Bare' is `model(**batch)` alone over the "
        "same length-sorted batches (full [B, T, V] logits, no softmax or top-k), after one warm-up batch. The "
        f"tokenizer is a byte-level BPE of {len(tok)} entries (the model's vocabulary is {shape.vocab} regardless: the "
        "head and the top-k work are full size); a random-init model's near-flat distributions make bytes/token "
        "high.\n"
    )
    return out, {"stage1_tokens_per_s": r.tokens_per_second, "bare_tokens_per_s": bare, "ratio": ratio,
                 "tokens": r.manifest.num_tokens, "params_b": billions}


# --- 2. student step: SFT vs KD, with and without fused-linear -------------------------------
def student_steps(device: str, sizes: Sizes, deadline: float) -> tuple[str, dict]:
    import torch

    from logitcache.losses import FusedLoss, ce_kd_loss, fused_linear_ce_kd_loss
    from logitcache.pipeline.student.train import causal_ce

    shape, B, T = sizes.llama, sizes.batch, sizes.seq
    student = build_llama(shape, device).train()
    billions = params_b(student)
    V = shape.vocab
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    # A top-K teacher: K distinct ids per position (one per stride of the vocabulary), log-probs
    # sorted as a cache stores them, holding 90% of the mass.
    ids = (torch.arange(K) * (V // K) + torch.randint(0, V // K, (B, T, 1), generator=g)).to(device)
    t_lp = (torch.log_softmax(torch.randn(B, T, K, generator=g) * 2, dim=-1).sort(-1, descending=True).values
            + math.log(0.9)).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    head = student.get_output_embeddings()

    def logits_path(kind: str):
        def loss():
            logits = student(input_ids=input_ids, attention_mask=mask).logits
            if kind == "ce":
                return causal_ce(logits, input_ids)
            return ce_kd_loss(logits, input_ids, t_lp, ids, mask, FusedLoss("kl"))[0]
        return loss

    def linear_path(kind: str):
        def loss():
            hidden = student.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            return fused_linear_ce_kd_loss(hidden, head.weight, head.bias, input_ids, t_lp, ids, mask, FusedLoss(kind))[0]
        return loss

    cases = {
        "SFT, logits + F.cross_entropy": logits_path("ce"),
        "KL, logits + fused CE+KL (losses.fused)": logits_path("kl"),
        "SFT, fused-linear": linear_path("sft"),
        "KL, fused-linear (losses.fused_linear)": linear_path("kl"),
    }
    cuda = torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {n: [] for n in cases}
    peaks: dict[str, int] = {n: 0 for n in cases}
    base = 0

    def step(name: str) -> float:
        nonlocal base
        sync(device)
        if cuda:
            base = torch.cuda.memory_allocated()  # parameters and AdamW's state: the same for every case
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        cases[name]().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - t0
        if cuda:
            peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
        return seconds

    for name in cases:  # warm-up (AdamW's state is created here)
        step(name)
    rounds = 0
    for _ in range(sizes.rounds):
        if rounds >= 3 and time.perf_counter() > deadline:
            break  # out of budget: fewer rounds, said in the table's title
        for name in cases:  # interleaved: machine noise hits every case alike
            times[name].append(step(name))
        rounds += 1
    ref = statistics.median(times["SFT, logits + F.cross_entropy"])
    gib = 2**30
    rows, figures = [], {}
    for name, ts in times.items():
        med = statistics.median(ts)
        spread = f"{statistics.mean(ts) * 1000:,.1f} ± {statistics.stdev(ts) * 1000:,.1f}" if len(ts) > 1 else "–"
        mem = [f"{peaks[name] / gib:,.2f}", f"{(peaks[name] - base) / gib:,.2f}"] if cuda else ["n/a", "n/a"]
        rows.append([name, f"{med * 1000:,.1f}", spread, f"{med / ref:.3f}x", *mem])
        figures[name] = {"median_s": med, "times_s": ts, "peak_bytes": peaks[name] if cuda else None}
    logits_gib = B * T * V * 2 / gib
    out = (
        f"### 2. Student step, KD vs SFT (random-init Llama, {billions:.2f}B parameters, bf16 weights and AdamW; "
        f"batch {B} x {T} random tokens, top-{K} teacher; {rounds} interleaved rounds after a warm-up)\n\n"
        + table(["loss", "ms/step (fwd+bwd+AdamW), median", "mean ± std", "vs SFT with F.cross_entropy (medians)",
                 "peak GiB (max_memory_allocated)", "peak above weights + AdamW state, GiB"], rows)
        + f"\n\nOne bf16 [B, T, V] logits tensor is {logits_gib:,.2f} GiB; `F.cross_entropy` is called on it "
        "upcast to fp32 (`causal_ce`, as the trainer's SFT), the fused pass computes in fp32 block by block. "
        "Fused-linear takes `model.model(...)`'s last hidden states and the head's weight: no [B, T, V] tensor "
        "exists. Times are wall-clock around `torch.cuda.synchronize()`; peak memory is the maximum over the "
        "rounds of each case's step, the warm-up included.\n"
    )
    return out, {"params_b": billions, "rounds": rounds, "cases": figures, "base_bytes": base if cuda else None}


# --- 3. peers that need a GPU -----------------------------------------------------------------
# benchmarks/peers.py's child (its cases and the teacher head that lets Liger read a top-K
# teacher), run on ``DEVICE`` in ``DTYPE``: everything the child creates lands there through
# torch's defaults. Then the GPU-only Liger paths, and a memory/time tail that reads the GPU's
# allocator instead of the process's resident memory.
def peers_child(device: str, dtype: str) -> str:
    from fused_linear import MEASURE, PRELUDE
    from peers import CHILD

    if not (CHILD.startswith(PRELUDE) and CHILD.endswith(MEASURE)):
        raise RuntimeError("benchmarks/peers.py's CHILD is no longer PRELUDE + cases + MEASURE: update peers_child")
    body = CHILD[len(PRELUDE) : len(CHILD) - len(MEASURE)]
    setup = (f"DEVICE = torch.device({device!r})\ntorch.set_default_device(DEVICE)\n"
             f"torch.set_default_dtype(torch.{dtype})\n")
    return PRELUDE + setup + body + LIGER_GPU + GPU_MEASURE


LIGER_GPU = r"""
if name == "liger-triton":
    from liger_kernel.transformers import LigerFusedLinearJSD

    triton_jsd = LigerFusedLinearJSD(jsd_beta=0.0)  # no labels: the mean over every row, as the chunked loss here
    t_hidden, t_head = _teacher_head()
    liger = lambda x, w_, th, tw, y: triton_jsd(x, w_, th, tw, None)
    name = "liger"  # step() then calls it as the chunked loss, on the same rows
elif name == "liger-compiled":
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=True)
    t_hidden, t_head = _teacher_head()
    name = "liger"
    for t in (N // B, 8, N // B):  # compile for the timed shape, then the warm-up's (dynamic), outside the timing
        step(t)
"""

GPU_MEASURE = r"""
cuda = DEVICE.type == "cuda"


def sync():
    if cuda:
        torch.cuda.synchronize()


step(8)  # warm-up on 8 positions per sequence
sync()
if cuda:
    torch.cuda.reset_peak_memory_stats()
before = torch.cuda.memory_allocated() if cuda else 0
seconds, peak = [], 0
for r in range(repeats):
    sync()
    t0 = time.perf_counter()
    value = float(step())
    sync()
    seconds.append(time.perf_counter() - t0)
    if r == 0 and cuda:
        peak = torch.cuda.max_memory_allocated()
print(json.dumps({"peak_extra_mib": (peak - before) / 2**20 if cuda else None, "seconds": seconds, "value": value}))
"""

PEER_CASES = [
    ("plain", "plain PyTorch: logits, log_softmax, KL at the teacher ids"),
    ("fused", "ours: fused pass over the logits (losses.fused)"),
    ("fused-linear", "ours: fused-linear from hidden states (losses.fused_linear)"),
    ("liger-triton", "Liger-Kernel LigerFusedLinearJSD(jsd_beta=0), Triton kernels"),
    ("liger-compiled", "Liger-Kernel LigerFusedLinearJSDLoss(beta=0), chunked, torch.compile (its default)"),
    ("liger", "Liger-Kernel LigerFusedLinearJSDLoss(beta=0), chunked, compiled=False"),
]


def peers_gpu(device: str, sizes: Sizes, dtype: str, deadline: float) -> tuple[str, dict]:
    import torch

    from fused_linear import mean_std, measure

    n, v, d = sizes.peer_n, sizes.peer_v, sizes.peer_d
    cuda = torch.device(device).type == "cuda"
    notes, cases = [], list(PEER_CASES)
    try:
        import liger_kernel  # noqa: F401
    except Exception as e:  # a missing or broken install: the other rows still run
        notes.append(f"Liger-Kernel not run: `import liger_kernel` failed ({type(e).__name__}: {e}); carry its wheel, "
                     "see the docstring of benchmarks/gpu.py")
        cases = [c for c in cases if not c[0].startswith("liger")]
    if not cuda:
        # Triton kernels need CUDA; torch.compile on a CPU would time a C++ compiler.
        notes.append("Liger's Triton and compiled paths not run: no CUDA device")
        cases = [c for c in cases if c[0] not in ("liger-triton", "liger-compiled")]
    child = peers_child(device, dtype)
    results = {}
    for name, label in cases:
        if results and time.perf_counter() > deadline:
            notes.append(f"{label}: not run, out of the time budget")
            continue
        try:
            results[name] = measure(name, n, v, d, K, sizes.peer_repeats, 4 if cuda else 1, child=child)
        except RuntimeError as e:  # one peer failing is a line in the report, not the end of the run
            notes.append(f"{label}: failed: {str(e).strip().splitlines()[-1]}")
        print(f"{label}: {results.get(name)}", file=sys.stderr, flush=True)
    if "plain" not in results:
        return "### 3. Peers on the GPU\n\nNot run: the plain PyTorch reference failed.\n" + "".join(
            f"\n{s}." for s in notes), {}
    ref = results["plain"]["value"]
    # bf16 logits round at 2^-8 relative: the implementations differ by that much in summation order.
    tol = 1e-4 if dtype == "float32" else 2e-2
    size = 4 if dtype == "float32" else 2
    logits_mib, grads_mib = n * v * size / 2**20, (n + v) * d * size / 2**20
    base = statistics.mean(results["plain"]["seconds"])
    rows = []
    for name, label in cases:
        if name not in results:
            continue
        r = results[name]
        same = abs(r["value"] - ref) <= tol * abs(ref)
        extra = None if r["peak_extra_mib"] is None else r["peak_extra_mib"] - grads_mib
        rows.append([label, f"{r['value']:.5f}" + ("" if same else " (≠ plain)"),
                     "n/a" if extra is None else f"{extra:,.0f}", "n/a" if extra is None else f"{extra / logits_mib:.3f}",
                     mean_std([s * 1000 for s in r["seconds"]]), f"{statistics.mean(r['seconds']) / base:.2f}x"])
        if not same:
            notes.append(f"{label}: KL {r['value']!r} differs from plain PyTorch's {ref!r} beyond {tol:g} relative")
    out = (
        f"### 3. Peers on the GPU: forward KL from a top-{K} teacher (N={n} positions, d={d}, V={v}, {dtype}; "
        "forward + backward of the loss and the head)\n\n"
        + table(["implementation", "KL value", "extra MiB (peak − dh − dW)", "extra × logits", "ms/step, mean ± std",
                 "time vs plain"], rows)
        + f"\n\nbenchmarks/peers.py's cases, each in a fresh process on the GPU; values checked equal to plain "
        f"PyTorch's within {tol:g} relative. Peak = `torch.cuda.max_memory_allocated()` in the first timed step "
        f"minus the allocated memory before it (after a warm-up on 8 positions per sequence), less dh and dW "
        f"({grads_mib:,.0f} MiB), which every path returns; the logits [N, V] are {logits_mib:,.0f} MiB. "
        f"{sizes.peer_repeats} timed steps per case. Liger reads the teacher as a head: a one-hot [V, K+1] head "
        "that reproduces the top-K teacher exactly (peers.py). torchtune runs on the CPU (peers.py), not here.\n"
        + "".join(f"\n{s}." for s in notes)
    )
    return out, {name: r for name, r in results.items()}


# --- the run ---------------------------------------------------------------------------------
def render(res: dict) -> str:
    """The RESULTS.md section from a run's JSON (here or on the device machine)."""
    return (
        f"## GPU (issue 17 §4; {res['date']}, {'smoke' if res['smoke'] else 'full'} run, {res['seconds']:.0f} s)\n\n"
        f"Machine: {res['machine']}; device: {res['device_name']}.\n\n"
        f"`{res['command']}`\n\n" + "\n".join(res["sections"])
    )


def save(res: dict, out_json: Path | None) -> None:
    """The run's results as JSON at ``out_json``, and as RESULTS.md's markdown beside it (.md)."""
    if out_json is None:
        return
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1))
    out_json.with_suffix(".md").write_text(render(res))


def run(args: argparse.Namespace) -> dict:
    import torch

    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    sizes = SMOKE if args.smoke else FULL
    cuda = torch.device(args.device).type == "cuda"
    res = {
        "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if cuda else f"{args.device} (no GPU)",
        "machine": machine(), "command": "python3 benchmarks/gpu.py " + " ".join(sys.argv[1:]),
        "sizes": asdict(sizes), "sections": [], "figures": {},
    }
    parts = [
        ("teacher", lambda: teacher_stage(Path(tmp), args.device, sizes)),
        ("steps", lambda: student_steps(args.device, sizes, deadline - ESTIMATES["peers"])),
        ("peers", lambda: peers_gpu(args.device, sizes, args.peers_dtype, deadline)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in parts:
            if name not in args.parts:
                continue
            spent = time.perf_counter() - t0
            if spent + ESTIMATES[name] > args.budget_s:
                line = (f"### Part '{name}' skipped: {spent:.0f} s spent, its estimate {ESTIMATES[name]} s "
                        f"would pass the budget of {args.budget_s:.0f} s.\n")
                res["sections"].append(line)
                print(line, flush=True)
                continue
            start = time.perf_counter()
            try:
                section, figures = part()
            except Exception as e:  # one part failing on the device machine must not lose the others
                traceback.print_exc()
                section, figures = f"### Part '{name}' failed: {type(e).__name__}: {e}\n", {}
            figures["seconds"] = time.perf_counter() - start
            res["sections"].append(section)
            res["figures"][name] = figures
            print(section, flush=True)
            res["seconds"] = time.perf_counter() - t0
            save(res, args.out_json)  # after each part: a run killed at its time limit still brings back the parts done
            if cuda:
                torch.cuda.empty_cache()
    res["seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device (default cuda)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device, under a minute; writes RESULTS.md only with --write")
    ap.add_argument("--write", action="store_true", help="with --smoke: update benchmarks/RESULTS.md all the same")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--out-json", type=Path, help="also write the results here as JSON, and as markdown beside it (.md)")
    ap.add_argument("--from-json", type=Path, help="run nothing: write RESULTS.md's section from a run's --out-json file")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip parts that would end past this many seconds (default 540)")
    ap.add_argument("--parts", default="teacher,steps,peers", help="comma-separated parts to run (default all three)")
    ap.add_argument("--peers-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="dtype of part 3 (default bfloat16; float32 checks values to 1e-4 as peers.py does)")
    args = ap.parse_args()
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.from_json:
        res = json.loads(args.from_json.read_text())
    else:
        import torch

        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available() and not args.smoke:
            raise SystemExit("no CUDA device: run on a GPU machine, or --smoke")
        if args.smoke and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            args.device = "cpu"
        res = run(args)
    report = render(res)
    if not args.from_json:
        save(res, args.out_json)
    if args.from_json:
        print(report)
    else:
        print(f"total {res['seconds']:.0f} s", file=sys.stderr)
    # A smoke run's figures are not results: RESULTS.md only when asked.
    if not args.no_write and (args.write or args.from_json or not res["smoke"]):
        update_results("gpu", report)


if __name__ == "__main__":
    main()
