"""The embedded default, end to end: teacher -> one cache -> several students -> a table.

Everything is built on the spot (no download) and sized for 2 CPU cores:
1. a tiny teacher (byte-level BPE tokenizer + small Llama) trained on generated text where
   knowledge matters: made-up capitals, sums, and multilingual lines;
2. its top-k cache over the students' training set, written once;
3. students of one size, trained on the same budget from that cache: SFT and KL with the
   teacher's tokenizer, SFT, ULD and MultiLevelOT with a different (SentencePiece-style
   BPE) tokenizer;
4. held-out bits per character and exact-match accuracy of every student and the teacher.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from logitcache.pipeline.teacher.data import TextTemplate
from logitcache.pipeline.teacher.run import TeacherConfig, TeacherResult, run_teacher
from logitcache.pipeline.tiny import (
    TinyModelConfig,
    build_tiny_model,
    build_tiny_teacher,
    generate_corpus,
    train_metaspace_bpe_tokenizer,
    write_demo_dataset,
)


@dataclass
class DemoConfig:
    out: str = "demo-out"
    examples: int = 1024  # students' training set (the cache covers it)
    eval_examples: int = 200  # held-out set
    teacher_steps: int = 600
    student_steps: int = 300
    student_batch_size: int = 16
    student_lr: float = 3e-3
    top_k: int = 64
    seed: int = 0
    students: list[tuple[str, str, str]] = field(
        default_factory=lambda: [
            # (name, tokenizer, loss)
            ("sft-bpe", "teacher", "sft"),
            ("kl-bpe", "teacher", "kl"),
            ("sft-sp", "sp", "sft"),
            ("uld-sp", "sp", "uld"),
            ("mlot-sp", "sp", "mlot"),
        ]
    )


@dataclass
class DemoRow:
    name: str
    tokenizer: str
    loss: str
    alignment: str
    aligned: float | None
    train_seconds: float
    bits_per_char: float
    accuracy: float | None


@dataclass
class DemoPaths:
    teacher: Path
    data: Path
    heldout: Path
    cache: Path
    students: Path


def run_teacher_part(cfg: DemoConfig, progress: bool = True) -> tuple[DemoPaths, TeacherResult]:
    out = Path(cfg.out)
    paths = DemoPaths(out / "teacher", out / "train.jsonl", out / "heldout.jsonl", out / "cache", out / "students")
    if not (paths.teacher / "config.json").exists():
        build_tiny_teacher(
            paths.teacher, train_steps=cfg.teacher_steps,
            model_cfg=TinyModelConfig(hidden_size=128, num_layers=2, seed=cfg.seed), seed=cfg.seed,
        )
    if not paths.data.exists():
        write_demo_dataset(paths.data, n=cfg.examples, seed=cfg.seed + 1)
    if not paths.heldout.exists():
        write_demo_dataset(paths.heldout, n=cfg.eval_examples, seed=cfg.seed + 2)
    result = run_teacher(
        TeacherConfig(
            model=os.fspath(paths.teacher), data=os.fspath(paths.data), out=os.fspath(paths.cache), top_k=cfg.top_k,
            template=TextTemplate(prompt_field="prompt", response_field="response"), batch_size=16,
        ),
        progress=progress,
    )
    return paths, result


def _student_init(paths: DemoPaths, tokenizer_kind: str, cfg: DemoConfig) -> Path:
    """The same-size untrained student for a tokenizer, built once and shared by its runs."""
    from transformers import AutoTokenizer

    init = paths.students / f"init-{tokenizer_kind}"
    if (init / "config.json").exists():
        return init
    if tokenizer_kind == "teacher":
        from logitcache.storage import open_cache

        tok = AutoTokenizer.from_pretrained(open_cache(paths.cache).verified_tokenizer_dir(), trust_remote_code=False)
    else:
        tok = train_metaspace_bpe_tokenizer(generate_corpus(2000, cfg.seed + 7), vocab_size=400)
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=64, num_layers=2, seed=cfg.seed + 1))
    tmp = init.with_name(init.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp)
    tmp.rename(init)
    return init


def run_students(cfg: DemoConfig, paths: DemoPaths, progress: bool = True) -> list[DemoRow]:
    from logitcache.pipeline.student.evaluate import EvalConfig, evaluate
    from logitcache.pipeline.student.train import TrainConfig, run_train

    template = TextTemplate(prompt_field="prompt", response_field="response")

    def held_out(model_dir: Path):
        return evaluate(EvalConfig(model=os.fspath(model_dir), data=os.fspath(paths.heldout), template=template))

    rows = []
    t = held_out(paths.teacher)
    rows.append(DemoRow("teacher", "teacher (BPE 512)", "-", "-", None, 0.0, t.bits_per_char, t.accuracy))
    for name, tok_kind, loss in cfg.students:
        init = _student_init(paths, tok_kind, cfg)
        out = paths.students / name
        tcfg = TrainConfig(
            student=os.fspath(init), cache=os.fspath(paths.cache), out=os.fspath(out), loss=loss,
            max_steps=cfg.student_steps, batch_size=cfg.student_batch_size, learning_rate=cfg.student_lr,
            save_steps=cfg.student_steps, logging_steps=max(cfg.student_steps // 5, 1), seed=cfg.seed,
            progress=progress, shuffle_buffer=256,
        )
        done = out / "logitcache_train_config.json"
        if done.exists():
            seconds, aligned = 0.0, None  # trained by an earlier run of the demo
        else:
            tcfg.resume = out.exists()
            r = run_train(tcfg)
            seconds, aligned = r.seconds, (r.feature_stats or {}).get("fraction_matched")
        e = held_out(out)
        tok_label = "teacher (BPE 512)" if tok_kind == "teacher" else "SentencePiece-style BPE 400"
        rows.append(DemoRow(name, tok_label, loss, tcfg.resolved_alignment() if loss != "sft" else "-",
                            aligned if loss != "sft" else None, seconds, e.bits_per_char, e.accuracy))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    head = "| model | tokenizer | loss | alignment | aligned | train s | held-out bits/char | exact match |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        aligned = f"{r.aligned:.0%}" if r.aligned is not None else "-"
        acc = f"{r.accuracy:.1%}" if r.accuracy is not None else "-"
        secs = f"{r.train_seconds:.0f}" if r.train_seconds else "-"
        lines.append(f"| {r.name} | {r.tokenizer} | {r.loss} | {r.alignment} | {aligned} | {secs} | {r.bits_per_char:.3f} | {acc} |")
    return "\n".join(lines)
