"""`logitcache demo`: the whole pipeline on tiny models built on the spot."""

from __future__ import annotations

from pathlib import Path

import typer

from logitcache.cli.common import quiet_libraries, user_errors
from logitcache.errors import LogitCacheError

DEMO_MLOT_K = 50  # the MultiLevelOT student ranks this many teacher tokens (TrainConfig.mlot_k)


@user_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Working directory for the models, data, cache and students."),
    examples: int = typer.Option(1024, "--examples", help="Examples in the students' training set (the cache covers them)."),
    teacher_steps: int = typer.Option(600, "--teacher-steps", help="Training steps for the tiny teacher."),
    student_steps: int = typer.Option(300, "--student-steps", help="Training steps for every student (the same budget for all)."),
    eval_examples: int = typer.Option(200, "--eval-examples", help="Examples in the held-out set."),
    top_k: int = typer.Option(64, "--top-k", "-k", help="Log-probabilities kept per position."),
    teacher_only: bool = typer.Option(False, "--teacher-only", help="Stop after writing and verifying the cache."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Teacher -> one cache -> five students -> held-out table, on tiny models built on the spot.

    Builds a tiny teacher (BPE tokenizer + small Llama) and trains it on generated facts and
    sums, writes its top-k cache once, inspects and verifies it, then trains students of one
    size on the same budget from that cache (SFT and KL with the teacher's tokenizer; SFT, ULD
    and MultiLevelOT with a SentencePiece-style BPE tokenizer) and prints held-out bits per character and
    exact-match accuracy for each and for the teacher. Nothing is downloaded; a rerun resumes.
    """
    _check_options(examples=examples, eval_examples=eval_examples, teacher_steps=teacher_steps,
                   student_steps=student_steps, top_k=top_k, teacher_only=teacher_only)
    quiet_libraries()
    from logitcache.cli.cache import inspect, verify
    from logitcache.pipeline.demo import DemoConfig, format_table, run_students, run_teacher_part

    cfg = DemoConfig(
        out=str(out), examples=examples, eval_examples=eval_examples, teacher_steps=teacher_steps,
        student_steps=student_steps, top_k=top_k,
    )
    typer.echo(f"[1/4] tiny teacher and data in {out} (built on the spot, no download)")
    paths, r = run_teacher_part(cfg, progress=progress)
    typer.echo(f"[2/4] teacher stage: {r.written} examples written, {r.tokens_per_second:,.0f} tokens/s -> {paths.cache}")
    inspect(paths.cache, example=None, tokens=12, alternatives=3)
    verify(paths.cache, fast=False)
    if teacher_only:
        return
    typer.echo(f"[3/4] {len(cfg.students)} students, {student_steps} steps each, from the one cache")
    rows = run_students(cfg, paths, progress=progress)
    typer.echo("[4/4] held-out results (lower bits/char is better)")
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    typer.echo(table)


def _check_options(*, examples: int, eval_examples: int, teacher_steps: int, student_steps: int, top_k: int,
                   teacher_only: bool) -> None:
    """Refuse numbers the demo cannot run with before it builds anything."""
    for option, value, least in [
        ("--examples", examples, 1), ("--eval-examples", eval_examples, 1), ("--teacher-steps", teacher_steps, 0),
        ("--student-steps", student_steps, 1), ("--top-k", top_k, 1),
    ]:
        if value < least:
            raise LogitCacheError(f"{option} must be at least {least} (got {value}).")
    if not teacher_only and top_k < DEMO_MLOT_K:
        raise LogitCacheError(
            f"--top-k {top_k}: the demo's MultiLevelOT student ranks the teacher's top {DEMO_MLOT_K} tokens; "
            f"use --top-k {DEMO_MLOT_K} or more, or --teacher-only."
        )
