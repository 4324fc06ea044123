"""`logitcache eval`: held-out bits per character, prefix-match and exact-match accuracy."""

from __future__ import annotations

import json
from typing import Optional

import typer

from logitcache.cli.common import quiet_libraries, user_errors


@user_errors
def eval_(
    model: str = typer.Option(..., "--model", "-m", help="Model directory or hub name (a student, or the teacher)."),
    data: str = typer.Option(..., "--data", "-d", help="Held-out data (same formats as `teacher --data`)."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field holding the whole text (loss only)."),
    target_field: Optional[str] = typer.Option(None, "--target-field", help="With --text-field: field holding the spans scored, [start, end] character offsets into the text (as `logitcache teacher --target-field`)."),
    prompt_field: Optional[str] = typer.Option(None, "--prompt-field", help="Field holding the prompt (with --response-field: loss on the response, exact match)."),
    response_field: Optional[str] = typer.Option(None, "--response-field", help="Field holding the reference response."),
    separator: str = typer.Option("", "--separator", help="Text between prompt and response (as used for the cache)."),
    messages_field: Optional[str] = typer.Option(None, "--messages-field", help="Field holding a chat; every assistant turn is scored, the last one is the answer."),
    split: str = typer.Option("train", "--split", help="Dataset split."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Sequences per forward pass."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N records only."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Greedy tokens per answer (default: longest answer + 4)."),
    accuracy: bool = typer.Option(True, "--accuracy/--no-accuracy", help="Also generate greedy answers for exact match."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code to run (off by default: it is code from the model's author)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal. Off a terminal, or with --no-progress, a plain line every --log-every seconds instead (on stderr)."),
    log_every: float = typer.Option(30.0, "--log-every", help="Seconds between plain progress lines; 0: after every batch."),
) -> None:
    """Held-out loss per character (bits/char, comparable across tokenizers) and exact-match accuracy."""
    quiet_libraries()
    from logitcache.pipeline.student.evaluate import EvalConfig, evaluate
    from logitcache.pipeline.records import TextTemplate

    r = evaluate(
        EvalConfig(
            model=model, data=data, split=split, batch_size=batch_size, limit=limit,
            max_new_tokens=max_new_tokens, accuracy=accuracy, device=device,
            trust_remote_code=trust_remote_code, progress=progress, log_every=log_every,
            template=TextTemplate(text_field=text_field, prompt_field=prompt_field, response_field=response_field,
                                  messages_field=messages_field, separator=separator, target_field=target_field),
        )
    )
    res = {"model": model, "examples": r.examples, "chars": r.chars, "bits_per_char": r.bits_per_char,
           "char_perplexity": r.char_perplexity, "accuracy": r.accuracy, "exact_match": r.exact_match,
           "answered": r.answered}
    if as_json:
        typer.echo(json.dumps(res))
        return
    acc = (f", prefix match {r.accuracy:.1%}, exact match (stopping included) {r.exact_match:.1%} of {r.answered}"
           if r.accuracy is not None else "")
    typer.echo(f"{model}: {r.bits_per_char:.4f} bits/char (char perplexity {r.char_perplexity:.3f}) over {r.chars} chars of {r.examples} examples{acc}")
