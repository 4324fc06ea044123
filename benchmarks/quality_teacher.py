"""The quality benchmark's teacher: a tiny Llama with the real Mistral-7B tokenizer, trained
on the teacher-train windows once and kept in the benchmark's cache directory.

Plain AdamW on next-token cross-entropy, cosine learning rate after a linear warm-up,
gradient clipping at 1. The windows (each <s> ... </s>, as the cache's rows are) are packed
back to back, in a seeded random order reshuffled every epoch, into rows of ``seq`` tokens:
no padding, which on 2 CPU cores would cost a quarter of every step. The run is a function
of its config; a checkpoint every 50 steps lets a killed run continue where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TeacherSpec:
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    steps: int = 300
    batch: int = 4  # packed rows of `seq` tokens
    seq: int = 512
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    max_positions: int = 1024
    # "mistral-v1": the real Mistral-7B v1 SentencePiece tokenizer (V=32000); "bpe-N": a byte-level
    # BPE of N pieces trained on the teacher-train windows (quality.py --multi-teacher's second teacher)
    tokenizer: str = "mistral-v1"

    def key(self, data_digest: str) -> str:
        blob = json.dumps({**asdict(self), "data": data_digest}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


CACHE_DIR = Path(__file__).resolve().parent / ".quality-cache"


def teacher_dir(cache_dir: Path, spec: TeacherSpec, data_digest: str) -> Path:
    return cache_dir / f"teacher-{spec.key(data_digest)}"


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def mistral_tokenizer(folder: Path):
    from logitcache.pipeline.tiny import load_mistral_tokenizer, mistral_model_file

    if mistral_model_file() is None:
        raise SystemExit("the quality benchmark needs mistral_common (pip install mistral_common sentencepiece protobuf)")
    return load_mistral_tokenizer(folder)


def train_teacher(spec: TeacherSpec, windows: list[str], out: Path, log=print) -> dict:
    """Train the teacher into ``out`` (model + tokenizer + teacher_info.json); returns the info."""
    import torch

    from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_model

    info_file = out / "teacher_info.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer.startswith("bpe-"):
        from logitcache.pipeline.tiny import train_bpe_tokenizer

        tok = train_bpe_tokenizer(windows, int(spec.tokenizer.split("-")[1]), chat_template=False)
    else:
        tok = mistral_tokenizer(work / "tokenizer")
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=spec.hidden, num_layers=spec.layers,
                                                   num_heads=spec.heads, max_positions=spec.max_positions,
                                                   seed=spec.seed))
    n_params = sum(p.numel() for p in model.parameters())
    n_body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    encoded = [ids[: spec.max_positions - 1] + [tok.eos_token_id] for ids in tok(windows)["input_ids"]]
    need = spec.steps * spec.batch * spec.seq
    stream: list[int] = []
    rng = random.Random(spec.seed)
    while len(stream) < need:
        perm = list(range(len(encoded)))
        rng.shuffle(perm)
        for i in perm:
            stream += encoded[i]
    stream = stream[:need]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        frac = (step - spec.warmup) / max(spec.steps - spec.warmup, 1)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    ckpt = work / "checkpoint.pt"
    start, seconds_before = 0, 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, seconds_before = state["step"], state["seconds"]
        log(f"teacher: resuming at step {start}/{spec.steps}")
    log(f"teacher: Llama hidden {spec.hidden} x {spec.layers} layers, {n_params / 1e6:.1f}M parameters "
        f"({n_body / 1e6:.2f}M without embeddings), {spec.tokenizer} tokenizer V={len(tok)}; {len(encoded)} windows, "
        f"{sum(map(len, encoded))} tokens; {spec.steps} steps of {spec.batch} x {spec.seq} packed tokens")
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    running, n_running = 0.0, 0
    for step in range(start, spec.steps):
        a = step * spec.batch * spec.seq
        ids = torch.tensor(stream[a : a + spec.batch * spec.seq], dtype=torch.long).view(spec.batch, spec.seq)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += float(loss.detach())
        n_running += 1
        done = step + 1
        if done % 10 == 0 or done == spec.steps:
            elapsed = time.perf_counter() - t0
            per_step = elapsed / (done - start)
            log(f"teacher step {done}/{spec.steps}  loss {running / n_running:.3f}  {per_step:.2f} s/step  "
                f"elapsed {_fmt(seconds_before + elapsed)}  ETA {_fmt(per_step * (spec.steps - done))}")
            running, n_running = 0.0, 0
        if done % 50 == 0 and done < spec.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done,
                        "seconds": seconds_before + time.perf_counter() - t0}, ckpt)
    model.eval()
    seconds = seconds_before + time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0  # of this process's part of the run
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    tok.save_pretrained(final)
    model.save_pretrained(final)
    info = {"spec": asdict(spec), "train_seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "parameters": n_params,
            "non_embedding_parameters": n_body, "train_tokens": need,
            "vocab": len(tok)}
    (final / "teacher_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    final.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return info


if __name__ == "__main__":
    # Train the full benchmark's teacher alone (e.g. in the background): python benchmarks/quality_teacher.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality_data import make_splits  # noqa: E402

    splits = make_splits()
    spec = TeacherSpec()
    out = teacher_dir(CACHE_DIR, spec, splits.digest())
    info = train_teacher(spec, splits.teacher, out, log=lambda m: print(m, flush=True))
    print(json.dumps(info), flush=True)
