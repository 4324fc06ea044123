"""`logitcache demo`: the whole pipeline on a tiny model built on the spot."""

from __future__ import annotations

from pathlib import Path

import typer

from logitcache.cli.common import quiet_libraries, user_errors


@user_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Working directory for the tiny teacher, data and cache."),
    examples: int = typer.Option(256, "--examples", help="Examples in the generated dataset."),
    train_steps: int = typer.Option(300, "--train-steps", help="Training steps for the tiny teacher (0: random weights)."),
    top_k: int = typer.Option(64, "--top-k", "-k", help="Log-probabilities kept per position."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Build a tiny teacher (BPE tokenizer + small Llama, trained briefly), write its cache, inspect and verify it.

    Nothing is downloaded. Rerunning reuses the teacher and resumes the cache.
    """
    quiet_libraries()
    from logitcache.cli.cache import inspect, verify
    from logitcache.pipeline.demo import DemoConfig, run_demo

    typer.echo(f"[1/3] tiny teacher and data in {out} (built on the spot, no download)")
    paths, r = run_demo(DemoConfig(out=str(out), examples=examples, train_steps=train_steps, top_k=top_k), progress=progress)
    typer.echo(f"[2/3] teacher stage: {r.written} examples written, {r.tokens_per_second:,.0f} tokens/s -> {paths.cache}")
    inspect(paths.cache, example=None, tokens=12, alternatives=3)
    typer.echo("[3/3] verify")
    verify(paths.cache, fast=False)
