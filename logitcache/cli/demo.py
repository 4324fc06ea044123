"""`logitcache demo`: the whole pipeline on tiny models built on the spot."""

from __future__ import annotations

import time
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
    threads: int = typer.Option(
        None, "--threads", show_default=False,
        help="torch threads (default: OMP_NUM_THREADS if set, else 1: the demo's models are too small to gain from "
             "more, and extra threads stall on a busy machine). Capped at the CPUs this process may use.",
    ),
    teacher_only: bool = typer.Option(False, "--teacher-only", help="Stop after writing and verifying the cache."),
    progress: bool = typer.Option(
        True, "--progress/--no-progress",
        help="Show progress: a bar on a terminal, a line every few seconds in a log. Off: one line per finished stage.",
    ),
) -> None:
    """Teacher -> one cache -> several students -> held-out table, on tiny models built on the spot.

    Builds a tiny teacher (BPE tokenizer + small Llama) and trains it on generated facts and
    sums, writes its top-k cache once, inspects and verifies it, then trains students of one
    size on the same budget from that cache (SFT and KL with the teacher's tokenizer; SFT and
    the cross-tokenizer losses with a SentencePiece-style BPE tokenizer) and prints held-out
    bits per character, exact match and prefix match for each and for the teacher. Nothing is
    downloaded; a rerun resumes.
    """
    quiet_libraries()
    from logitcache.pipeline.demo import DemoConfig

    cfg = DemoConfig(
        out=str(out), examples=examples, eval_examples=eval_examples, teacher_steps=teacher_steps,
        student_steps=student_steps, top_k=top_k,
    )
    _check_options(cfg, threads=threads, teacher_only=teacher_only)
    from logitcache.cli.cache import show_example, show_summary, verify
    from logitcache.storage import open_cache
    from logitcache.pipeline.demo import configure_threads, evaluate_all, format_table, run_teacher_part, train_students
    from logitcache.pipeline.progress import clock

    t0, c0 = time.perf_counter(), time.process_time()
    typer.echo(f"[1/5] tiny teacher and data in {out} (built on the spot, no download)")
    typer.echo(f"  {configure_threads(threads)}")
    paths, r = run_teacher_part(cfg, progress=progress)
    typer.echo(f"[2/5] teacher stage: {r.written} examples written, {r.tokens_per_second:,.0f} tokens/s -> {paths.cache}")
    cache = open_cache(paths.cache)  # what `logitcache inspect` shows of it
    show_summary(cache, paths.cache)
    show_example(cache, tokens=12)
    verify(paths.cache, fast=False, log_every=30.0)
    if teacher_only:
        return
    typer.echo(f"[3/5] {len(cfg.students)} students, {student_steps} steps each, from the one cache")
    trained = train_students(cfg, paths, progress=progress, echo=typer.echo)
    typer.echo(f"[4/5] held-out evaluation of the teacher and {len(trained)} students, {eval_examples} examples each")
    rows = evaluate_all(cfg, paths, trained, progress=progress)
    typer.echo("[5/5] held-out results (lower bits/char is better)")
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    typer.echo(table)
    typer.echo(f"demo done in {clock(time.perf_counter() - t0)} wall, {clock(time.process_time() - c0)} CPU -> {out / 'results.md'}")


def _check_options(cfg, *, threads: int | None, teacher_only: bool) -> None:
    """Refuse numbers the demo cannot run with before it builds anything (``cfg``: a DemoConfig)."""
    for option, value, least in [
        ("--examples", cfg.examples, 1), ("--eval-examples", cfg.eval_examples, 1), ("--teacher-steps", cfg.teacher_steps, 0),
        ("--student-steps", cfg.student_steps, 1), ("--top-k", cfg.top_k, 1), ("--threads", threads, 1),
    ]:
        if value is not None and value < least:
            raise LogitCacheError(f"{option} must be at least {least} (got {value}).")
    if not teacher_only and cfg.top_k < DEMO_MLOT_K and any(s.loss == "mlot" for s in cfg.students):
        raise LogitCacheError(
            f"--top-k {cfg.top_k}: the demo's MultiLevelOT student ranks the teacher's top {DEMO_MLOT_K} tokens; "
            f"use --top-k {DEMO_MLOT_K} or more, or --teacher-only."
        )
