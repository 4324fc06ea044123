"""Stage-2 benchmarks: KD step time vs SFT step time, and reader throughput.

    python benchmarks/stage2.py [--quick] [--no-write]

One student and one batch for every loss, steps interleaved round-robin so that machine
noise hits all losses alike; reader throughput on one thread (raw rows, and full student
batches: retokenize, align, collate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, update_results  # noqa: E402


STUDENTS = {
    # name: (hidden, layers, heads, intermediate); both with the 32k Mistral vocabulary
    "small": (256, 4, 4, 512),
    "100m": (768, 8, 12, 2048),  # ~100M parameters with V=32000 (49M of them in embeddings + head)
}


def write_long_records(path: Path, n: int, lines_per_record: int, seed: int = 5) -> Path:
    """A JSON-lines file of ``n`` records, each ``lines_per_record`` generated Q/A lines in a "text" field."""
    from logitcache.pipeline.tiny import generate_corpus

    lines = generate_corpus(n * lines_per_record, seed=seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(0, len(lines), lines_per_record):
            f.write(json.dumps({"text": "\n".join(lines[i : i + lines_per_record])}, ensure_ascii=False) + "\n")
    return path


def build(work: Path, quick: bool, student_size: str = "small", records_lines: int = 12):
    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import TeacherConfig, run_teacher
    from logitcache.pipeline.tiny import (
        TinyModelConfig, build_tiny_teacher, generate_corpus, load_mistral_tokenizer,
        mistral_model_file, train_bpe_tokenizer,
    )

    if mistral_model_file() is not None:
        tok, tok_name = load_mistral_tokenizer(work / "tok"), "Mistral-7B (V=32000)"
    else:
        tok, tok_name = train_bpe_tokenizer(generate_corpus(2000), 512), "byte-level BPE (V=512)"
    teacher = build_tiny_teacher(work / "teacher", tokenizer=tok, train_steps=20 if quick else 100,
                                 model_cfg=TinyModelConfig(hidden_size=128))
    # Long records (a dozen Q/A lines each) so that a batch has realistic numbers of positions.
    data = write_long_records(work / "long.jsonl", 64, records_lines)
    cache = work / "cache"
    for codec, out in (("v1", cache), ("compact", work / "cache-compact")):
        run_teacher(TeacherConfig(model=str(teacher), data=str(data), out=str(out), top_k=64, codec=codec,
                                  template=TextTemplate(text_field="text"), batch_size=8), progress=False)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter = (128, 2, 4, 256) if quick else STUDENTS[student_size]
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    ))
    student_cfg = TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads)
    return tok, tok_name, cache, student, student_cfg


def step_times(tok, cache: Path, student, batch_size: int, rounds: int, max_length: int | None = None,
               only: list[str] | None = None) -> tuple[list[list], dict]:
    import torch

    from logitcache.losses import ALMTargets, fused_linear_ce_kd_loss
    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.dataset import LogitCacheDataset
    from logitcache.pipeline.token_bytes import word_start_mask
    from logitcache.pipeline.student.train import (
        TEACHER_EXTRAS, TrainConfig, batch_loss, causal_ce, fused_loss_of, teacher_targets,
    )
    from logitcache.storage import open_cache

    # "chunk" = offset alignment plus ALM's chunks, so one batch serves every loss; debiased chunks (ALM's default; the cache's word-start column), which the KD losses ignore.
    ds = LogitCacheDataset(cache, tok, alignment="chunk", shuffle=False, max_length=max_length, alm_merge_threshold=0.1)
    it = iter(ds)
    batch = KDCollator(pad_token_id=tok.pad_token_id or 0)([next(it) for _ in range(batch_size)])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    # What `logitcache train --loss X` runs (the fused CE + KD pass), plus two references: SFT
    # with torch's F.cross_entropy (what a plain Trainer computes) and ULD as CE, then the
    # standalone uld_loss (the two-step path the trainer used before fusing).
    # "τ=2": --kd-temperature 2 (exact tempered teacher from the cache's lse_tau, one more
    # log-partition in the fused pass).
    runs = {
        "sft": "sft", "kl": "kl", "uld": "uld", "mlot": "mlot",
        "sft, F.cross_entropy": None, "uld, CE then uld_loss": "uld",
        "uld, τ=2": "uld", "kl, τ=2": "kl", "hybrid": "hybrid", "alm": "alm",
        # `--fused-linear` (the default where the head allows it): from the last hidden states.
        "sft, fused-linear": "sft", "kl, fused-linear": "kl", "uld, fused-linear": "uld",
    }
    if only:
        # The two SFT rows are the ratios' denominators: always timed.
        runs = {n: v for n, v in runs.items() if n in only or n in ("sft", "sft, F.cross_entropy")}
    temperatures = open_cache(cache).manifest.temperatures
    extras = {k: batch[k] for k in TEACHER_EXTRAS if k in batch}
    times: dict[str, list[float]] = {name: [] for name in runs}
    alm_targets = ALMTargets(batch["alm_chunk"], batch["alm_teacher_ll"], batch["alm_end"], batch["alm_teacher_ws"],
                             torch.from_numpy(word_start_mask(tok, student.config.vocab_size)))

    def step(name: str) -> None:
        if "fused-linear" in name:
            cfg = TrainConfig(student="", cache="", out="", loss=runs[name])
            hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            head = student.get_output_embeddings()
            loss, _, _ = fused_linear_ce_kd_loss(hidden, head.weight, head.bias, batch["labels"], batch["teacher_logprobs"],
                                                 batch["teacher_ids"], batch["kd_mask"], fused_loss_of(cfg))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if runs[name] is None:
            loss = causal_ce(out.logits, batch["labels"])
        else:
            cfg = TrainConfig(student="", cache="", out="", loss=runs[name], kd_temperature=2.0 if "τ=2" in name else 1.0)
            fused = None if "then" in name else fused_loss_of(cfg)
            tempered, std_lp = teacher_targets(cfg, batch["teacher_logprobs"], extras, temperatures)
            # The student shares the teacher's tokenizer, so the hybrid's vocabulary map is the
            # identity (teacher ids are the student ids) and every teacher entry is matched.
            loss, _, _ = batch_loss(cfg, out.logits, batch["labels"], batch["teacher_logprobs"],
                                    batch["teacher_ids"], batch["kd_mask"], fused, tempered, std_lp,
                                    alm=alm_targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in runs:  # warm-up
        step(name)
    for _ in range(rounds):
        for name in runs:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    sft = statistics.median(times["sft"])
    plain = statistics.median(times["sft, F.cross_entropy"])
    rows = [
        [n, f"{statistics.median(times[n]) * 1000:,.0f}", f"{min(times[n]) * 1000:,.0f}–{max(times[n]) * 1000:,.0f}",
         f"{statistics.median(times[n]) / sft:.2f}x", f"{statistics.median(times[n]) / plain:.2f}x"]
        for n in runs
    ]
    info = {"rounds": rounds, "B": batch_size, "T": int(batch["input_ids"].shape[1]), "N": int(batch["kd_mask"].sum())}
    return rows, info


def reader_throughput(tok, cache: Path) -> list[list]:
    import torch

    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.dataset import LogitCacheDataset
    from logitcache.storage import open_cache

    torch.set_num_threads(1)
    teacher_tokens = open_cache(cache).manifest.num_tokens
    rows = []
    compact = cache.with_name("cache-compact")
    for label, path, tokenizer in [
        ("decode shards to numpy (raw rows), v1", cache, None),
        ("decode shards to numpy (raw rows), compact codec", compact, None),
        ("student batches: retokenize + align + collate (v1)", cache, tok),
    ]:
        best = float("inf")
        for _ in range(3):
            ds = LogitCacheDataset(path, tokenizer, alignment="offset", shuffle=False)
            collate = KDCollator(pad_token_id=tok.pad_token_id or 0)
            t0 = time.perf_counter()
            buf = []
            for ex in ds:
                if tokenizer is not None:
                    buf.append(ex)
                    if len(buf) == 8:
                        collate(buf)
                        buf = []
            best = min(best, time.perf_counter() - t0)
        rows.append([label, f"{teacher_tokens / best:,.0f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--student", choices=sorted(STUDENTS), default="small",
                    help="small: 18.7M parameters, 4 x ~334 tokens; 100m: ~100M parameters, 4 x 512 tokens")
    ap.add_argument("--only", default="", help="time only these rows, ';'-separated (row names hold commas: 'kl;kl, fused-linear'), "
                    "besides the two SFT rows; the reader is skipped")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6 for 100m, 8 for small)")
    args = ap.parse_args()
    only = [n.strip() for n in args.only.split(";") if n.strip()]
    t0 = time.perf_counter()
    big = args.student == "100m"
    with tempfile.TemporaryDirectory() as tmp:
        tok, tok_name, cache, student, scfg = build(Path(tmp), args.quick, args.student, records_lines=24 if big else 12)
        rounds = args.rounds or (3 if args.quick else (6 if big else 8))
        steps, info = step_times(tok, cache, student, batch_size=4, rounds=rounds,
                                 max_length=512 if big else None, only=only)
        reader = [] if only else reader_throughput(tok, cache)
    params = sum(p.numel() for p in student.parameters()) / 1e6
    report = (
        f"## Stage 2 ({time.strftime('%Y-%m-%d')}, {'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s)\n\n"
        f"Machine: {machine()}\n\n"
        f"### Step time, KD vs SFT (same student and batch; {info['rounds']} interleaved rounds; fp32, CPU)\n\n"
        f"Student: Llama, hidden {scfg.hidden_size}, {scfg.num_layers} layers, {params:.1f}M parameters, tokenizer {tok_name}; "
        f"batch {info['B']} x {info['T']} tokens, {info['N']} KD positions, cache k=64, offset alignment "
        "(same tokenizer, so every target is aligned), MultiLevelOT paper variant (k=50).\n\n"
        + "`sft`/`kl`/`uld`/`mlot`: what `logitcache train --loss X` runs (one fused CE + KD pass over "
        "the logits). The last two rows are references: SFT with torch's `F.cross_entropy`, and ULD "
        "computed as CE followed by the standalone chunkable `uld_loss`. `uld, τ=2`/`kl, τ=2`: "
        "`--kd-temperature 2` (the teacher exact at 2 from the cache's log-partition; the fused pass "
        "computes a second log-partition and softmax). `hybrid`, `alm`: `--loss hybrid` (here with the "
        "identity vocabulary map, as the student shares the teacher's tokenizer: every teacher entry is matched, "
        "the dense pass is the same as across tokenizers) and `--loss alm` (chunks from offset boundaries, debiased: the word-start log-partition is one more dense term).\n\n"
        + "`X, fused-linear`: `--fused-linear` (the default where the head allows it), the loss from the "
        "last hidden states and the head, block by block, no [N, V] logits (losses.fused_linear).\n\n"
        + table(["loss", "ms/step (fwd+bwd+AdamW), median", "range", "vs SFT (medians)", "vs SFT with F.cross_entropy"], steps)
        + "\n\n### Reader throughput (one thread; teacher tokens per second)\n\n"
        + table(["what", "tokens/s"], reader)
        + "\n"
    )
    print(report)
    if not args.no_write:
        update_results("stage2" if not big else "stage2-100m", report)


if __name__ == "__main__":
    main()
