"""`logitcache teacher`: stage 1, write a cache."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from logitcache.cli.common import (
    RESUME_TEACHER,
    Stages,
    command_line,
    options_with_config,
    quiet_libraries,
    shard_bytes,
    user_errors,
)
from logitcache.errors import LogitCacheError
from logitcache.storage.manifest import load_manifest
from logitcache.storage.remote import is_url, local_path


@user_errors(interrupted=RESUME_TEACHER)
def teacher(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Teacher: a model directory or a hub name (any AutoModelForCausalLM with a fast tokenizer)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Input: a .jsonl/.json/.parquet/.csv/.arrow/.txt file, a directory of them, or a hub dataset name."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Cache directory to write, or a URL (s3://bucket/cache, gs://, az://, hf://datasets/ORG/NAME; pip install 'logitcache\\[s3]' etc.): then it is written in --local-cache and each shard uploaded, manifest last. An existing cache with the same settings is resumed (also after a crash or a full disk). One run at a time: a second run on the same directory refuses (on a URL, while its lease object is live)."),
    local_cache: Optional[Path] = typer.Option(None, "--local-cache", help="With a URL as --out: the local directory where the cache is written before upload; it holds a full local copy of the cache. Default: $LOGITCACHE_STAGING/<slug of the URL>, else ~/.cache/logitcache/staging/<slug of the URL>."),
    top_k: int = typer.Option(64, "--top-k", "-k", help="Log-probabilities kept per position (sorted, over the full vocabulary)."),
    # \\[: rich markup would take [vllm] for a style tag and print only 'logitcache'.
    engine: str = typer.Option("hf", "--engine", help="hf (transformers, CPU or GPU) or vllm (GPU; pip install 'logitcache\\[vllm]')."),
    mode: str = typer.Option("score", "--mode", help="score: teacher-forced over the given text; generate: the teacher writes the response to each prompt, then its own distribution along it is stored."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field holding the whole text (every token is a target, unless --target-field says which)."),
    target_field: Optional[str] = typer.Option(None, "--target-field", help="With --text-field: field holding the target spans, a list of [start, end] character offsets into the text (sorted, not overlapping); CE and KD apply only inside them. A record without one is skipped as 'no target'."),
    prompt_field: Optional[str] = typer.Option(None, "--prompt-field", help="Field holding the prompt (with --response-field)."),
    response_field: Optional[str] = typer.Option(None, "--response-field", help="Field holding the response (with --prompt-field)."),
    separator: str = typer.Option("", "--separator", help="Text put between prompt and response."),
    messages_field: Optional[str] = typer.Option(None, "--messages-field", help="Field holding a chat [{role, content}] (system, user, assistant, tool; tool calls where the template renders them), rendered with the tokenizer's chat template: every assistant turn is a target, through its end-of-turn marker; everything else is context. Generate mode: the teacher writes the last assistant turn afresh."),
    message_train_field: Optional[str] = typer.Option(None, "--message-train-field", help="With --messages-field: the per-message key whose false value keeps an assistant turn out of the targets (default: train, as in {\"role\": \"assistant\", \"content\": ..., \"train\": false})."),
    id_field: Optional[str] = typer.Option(None, "--id-field", help="Field holding a unique example id (default: 'id' if present, else a hash of the text)."),
    split: str = typer.Option("train", "--split", help="Dataset split (hub datasets and directories)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Sequences per forward pass."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Longer examples are truncated to this many tokens (text cut to match) and flagged `truncated`. Default: the model's context length."),
    max_chars: Optional[int] = typer.Option(None, "--max-chars", help="Skip (and count in the manifest) records whose text, prompt and response as rendered, is longer than N characters, before any tokenizing. Default: no limit while a context length (--max-length or the model's) bounds the work per record, which then cuts huge records instead; 1,000,000 where none does (tokenizing ten million characters can take gigabytes), so that no one record can exhaust memory."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Process only the first N records (a rerun with a larger N continues)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Model revision (hub models)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code to run (off by default: it is code from the model's author)."),
    shard_size_mb: float = typer.Option(256.0, "--shard-size-mb", help="Target size of one Parquet shard."),
    codec: str = typer.Option("v1", "--codec", help="v1: fp16 log-probs + int32 ids (readable by any Parquet tool); compact: log-probs quantised within 0.008 nats and ids ranked by frequency, about 0.5-0.65x the size (read it with logitcache)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Generate mode: longest response in tokens."),
    temperature: float = typer.Option(1.0, "--temperature", help="Generate mode: sampling temperature (0: greedy). Stored log-probs are always at temperature 1."),
    top_p: float = typer.Option(1.0, "--top-p", help="Generate mode: nucleus sampling."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed: of generate mode's responses, and of --sample's draws."),
    truncate_prompts: bool = typer.Option(False, "--truncate-prompts", help="Generate mode: cut prompts too long for the context from the left instead of skipping (and counting) them."),
    num_parts: Optional[int] = typer.Option(None, "--num-parts", help="Cluster run: split the data into N parts, one job each (default: SLURM_ARRAY_TASK_COUNT, else 1). Part I is written to OUT/part-I-of-N, about 1/N of the data; `logitcache merge` joins the parts into one cache."),
    part_index: Optional[int] = typer.Option(None, "--part-index", help="Cluster run: the part this job writes, 0..N-1 (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)."),
    # The old names read as dataloader workers (issue 14 §4); still accepted for existing scripts.
    num_workers: Optional[int] = typer.Option(None, "--num-workers", hidden=True),
    worker_index: Optional[int] = typer.Option(None, "--worker-index", hidden=True),
    ray: bool = typer.Option(False, "--ray", help="Run the N parts of --num-parts as Ray tasks (pip install 'logitcache\\[ray]'), each exactly as one Slurm array task, retried when it fails (a retried part resumes its part), then merged into --out. The parts are written to OUT-parts and kept. --out must be storage that every node reaches (a shared filesystem or a URL)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: the cluster to run on. auto: the running cluster (under `ray job submit`, or after `ray start`); local: a new Ray instance on this machine; or HEAD:6379 / ray://HEAD:10001. Default: RAY_ADDRESS, else a Ray instance running here, else a new one."),
    gpus_per_part: Optional[float] = typer.Option(None, "--gpus-per-part", help="With --ray: GPUs Ray reserves for each part; it sets the task's CUDA_VISIBLE_DEVICES to them. Default: --tensor-parallel-size with --engine vllm, 0 (CPU) with hf; a fraction shares a GPU between parts (hf)."),
    cpus_per_part: float = typer.Option(1.0, "--cpus-per-part", help="With --ray: CPUs Ray reserves for each part (tokenizing, writing; torch uses as many threads)."),
    part_retries: int = typer.Option(3, "--part-retries", help="With --ray: further attempts of a part whose task fails (a killed worker, a lost node, out of memory); each resumes the part. Bad input is not retried."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization", help="vllm: share of GPU memory to use."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="vllm: context length (default --max-length or the model's)."),
    eos: bool = typer.Option(True, "--eos/--no-eos", help="Append the tokenizer's end-of-sequence token to every example that ended (not truncated, not cut at --max-new-tokens), so its last position holds the teacher's prediction of the end; not when the text already ends with it."),
    temperatures: Optional[str] = typer.Option(None, "--temperatures", help="Extra temperatures (comma-separated, e.g. 2,4) whose full-vocabulary log-normaliser is stored per position, so the top-k is exact at them in stage 2 (4 bytes per position each); 1 is always there. 'none' for no extra. Default: 2 with --engine hf, none with vllm (which cannot give it)."),
    logit_stats: bool = typer.Option(False, "--logit-stats/--no-logit-stats", help="Also store per position the logits' mean and std over the full vocabulary and the log-normaliser of logits / (std + 1e-4) (12 bytes per position; MultiLevelOT's code variant needs them)."),
    word_start: Optional[bool] = typer.Option(None, "--word-start/--no-word-start", help="Also store per position the log of the teacher's probability that the next token starts a word (whitespace-initial or special tokens; 4 bytes per position): ALM's chunk debiasing (`logitcache train --loss alm --alm-mode debias`, its default) needs it. Default: on with --engine hf, off with vllm (which cannot give it)."),
    sample: int = typer.Option(0, "--sample", help="Also store per position N draws from the teacher's distribution (hf; ids + counts, about 5 bytes per distinct id): `logitcache train --kd-targets sample` distils from them without the top-k's bias (Random Sampling KD). With --top-k 0, the draws alone. Seeded by --seed and the example id: a rerun draws the same. 0: none."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal. Off a terminal (a log file under Slurm or nohup), or with --no-progress, a plain line every --log-every seconds instead."),
    log_every: float = typer.Option(30.0, "--log-every", help="Seconds between plain progress lines (examples and tokens done, tokens/s, time left), printed on stderr; 0: after every window of batches."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options, keyed by name (top_k: 64); flags given on the command line win. examples/teacher.yaml lists them all."),
) -> None:
    """Run a teacher over a dataset and write its top-k logit cache (stage 1).

    Example:

        logitcache teacher --model ./teacher --data train.jsonl --prompt-field prompt
        --response-field response --out cache/ --top-k 64
    """
    if config is not None:  # fill in what the command line left out, then run as if it had all been typed
        # (the undecorated function: this call already runs inside user_errors)
        return teacher.__wrapped__(**options_with_config(ctx, config), ctx=ctx)
    missing = [flag for flag, value in (("--model", model), ("--data", data), ("--out", out)) if value is None]
    if missing:
        raise LogitCacheError(f"missing {', '.join(missing)} (on the command line or in --config).")
    size = shard_bytes(shard_size_mb)
    num_parts = _renamed(num_workers, "--num-workers", num_parts, "--num-parts")
    part_index = _renamed(worker_index, "--worker-index", part_index, "--part-index")
    on_ray = _ray_options(ray, num_parts, part_index, ray_address=ray_address, gpus_per_part=gpus_per_part,
                          cpus_per_part=cpus_per_part, part_retries=part_retries)
    quiet_libraries()
    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.engine import GenerationConfig
    from logitcache.pipeline.teacher.run import TOO_LONG, TeacherConfig, run_teacher
    from logitcache.storage.parts import merge_command

    cfg = TeacherConfig(
        model=model, data=data, out=_out_text(out), top_k=top_k, engine=engine, mode=mode,
        template=TextTemplate(
            text_field=text_field, prompt_field=prompt_field, response_field=response_field,
            messages_field=messages_field, separator=separator, id_field=id_field, target_field=target_field,
            message_train_field=message_train_field,
        ),
        split=split, batch_size=batch_size, max_length=max_length, max_chars=max_chars, dtype=dtype, device=device,
        limit=limit, revision=revision, trust_remote_code=trust_remote_code,
        shard_bytes=size, codec=codec,
        generation=GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed),
        truncate_prompts=truncate_prompts,
        # On Ray, each task gets its part (pipeline/teacher/ray_parts.py).
        num_workers=None if on_ray else num_parts, worker_index=None if on_ray else part_index,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len, eos=eos, temperatures=parse_temperatures(temperatures), logit_stats=logit_stats,
        word_start=word_start, log_every=log_every, sample=sample,
        local_cache=None if local_cache is None else str(local_cache),
    )
    if on_ray is not None:
        return _teacher_on_ray(cfg, on_ray, log_every)
    try:
        r = run_teacher(cfg, progress=progress)
    except KeyboardInterrupt as e:
        e.args = (_kept(cfg),)
        raise
    m = r.manifest
    parts = [f"wrote {r.written} examples ({r.tokens} tokens) in {r.seconds:.1f}s, {r.tokens_per_second:,.0f} tokens/s"]
    if r.already_done:
        parts.append(f"{r.already_done} already in the cache")
    if r.skipped:
        parts.append("skipped " + ", ".join(f"{n} {why}" + (f" ({m.max_chars:,} characters)" if why == TOO_LONG else "")
                                            for why, n in r.skipped.items()))
    if r.truncated - r.unfinished:
        parts.append(f"{r.truncated - r.unfinished} truncated to {m.max_length} tokens")
    if r.unfinished:
        parts.append(f"{r.unfinished} responses cut at --max-new-tokens (stored without an end, flagged truncated)")
    if r.retokenized:
        parts.append(f"{r.retokenized} generated responses re-tokenize differently (stored: the canonical tokenization)")
    typer.echo("; ".join(parts))
    bpt = m.num_bytes / m.num_tokens if m.num_tokens else 0.0
    state = "complete" if r.complete else "partial (rerun to continue)"
    if m.worker:  # one part of a split run must not pass for the whole cache
        index, count = m.worker["index"], m.worker["count"]
        state = f"part {index + 1} of {count} (about 1/{count} of the data), {state}"
    typer.echo(f"cache {r.out}: {m.num_examples} examples, {m.num_tokens} tokens, {bpt:.1f} bytes/token, {state}")
    if m.worker:
        typer.echo(f"once all {count} parts are complete, join them into one cache with {merge_command(cfg.out)}")


def _out_text(out: str) -> str:
    """--out as the run records it: a URL as given, a path as ``str(Path(...))`` always gave it."""
    return out if is_url(out) else str(Path(local_path(out)))


def _renamed(old: Optional[int], old_flag: str, new: Optional[int], new_flag: str) -> Optional[int]:
    """The value of a renamed option, given by its old name (with a deprecation line) or its new one."""
    if old is None:
        return new
    if new is not None:
        raise LogitCacheError(f"{old_flag} is the old name of {new_flag}; give {new_flag} only.")
    typer.echo(f"warning: {old_flag} is deprecated (it reads as dataloader workers); use {new_flag}.", err=True)
    return old


# The options that mean something only with --ray, by flag: left at their defaults without it.
_RAY_ONLY = {"--ray-address": None, "--gpus-per-part": None, "--cpus-per-part": 1.0, "--part-retries": 3}


def _ray_options(ray: bool, num_parts: Optional[int], part_index: Optional[int], **given):
    """The RayOptions of a `--ray` run (None without --ray), or one line naming the conflict."""
    from logitcache.pipeline.teacher.ray_parts import RayOptions

    if not ray:
        stray = [flag for flag, default in _RAY_ONLY.items() if given[flag[2:].replace("-", "_")] != default]
        if stray:
            raise LogitCacheError(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} for Ray runs; add --ray.")
        return None
    if part_index is not None:
        raise LogitCacheError(
            "--ray runs every part as a task of its own; --part-index is for one job per part (Slurm): drop it."
        )
    if num_parts is None:
        raise LogitCacheError("--ray needs --num-parts N: the data is split into N parts, one Ray task each.")
    return RayOptions(num_parts=num_parts, address=given["ray_address"], gpus_per_part=given["gpus_per_part"],
                      cpus_per_part=given["cpus_per_part"], part_retries=given["part_retries"])


def _teacher_on_ray(cfg, opts, log_every: float) -> None:
    """`teacher --ray`: every part as a Ray task, then the merge (``cfg``: the TeacherConfig)."""
    from logitcache.pipeline.teacher.ray_parts import parts_dir_for, run_on_ray

    try:
        with Stages("merge", log_every) as stages:
            r = run_on_ray(cfg, opts, on_merge=stages.update)
    except KeyboardInterrupt as e:
        where = parts_dir_for(cfg.out) if opts.num_parts > 1 else cfg.out
        e.args = (f"the shards every part finished are kept in {where}; to resume, run: {command_line()}",)
        raise
    retried = [f"part {p.index + 1} ({p.attempts - 1}x)" for p in r.parts if p.attempts > 1]
    typer.echo(
        f"ran {len(r.parts)} part{'s' if len(r.parts) != 1 else ''} on Ray in {r.seconds:.1f}s: {sum(p.written for p in r.parts)} examples "
        f"({sum(p.tokens for p in r.parts)} tokens) written, {sum(p.already_done for p in r.parts)} already there; "
        f"{r.retries} {'retry' if r.retries == 1 else 'retries'}" + (f" ({', '.join(retried)})" if retried else "")
    )
    if r.parts_dir is None:
        typer.echo(f"cache {r.out}: one part, written in place, complete")
    elif r.merge is None:
        typer.echo(f"the merged cache staged before was complete; uploaded it to {r.out}")
    else:
        typer.echo(r.merge.summary() + f"; the parts stay in {r.parts_dir} (remove them when done)")


def _kept(cfg) -> str:
    """What a stopped run leaves, and the command that resumes it (``cfg``: its TeacherConfig)."""
    if is_url(cfg.out):  # what the remote manifest lists is whole there; the staging may be ahead
        kept = f"what {cfg.out_target()}/manifest.json lists is kept there"
    else:
        kept = _kept_locally(cfg.out_dir())
    # A Slurm array task takes its worker from the environment: spelled out, the command
    # resumes this part from anywhere, not only from within the same array.
    index, count = cfg.worker()
    spelled = []
    if count > 1 and cfg.num_workers is None:
        spelled += ["--num-parts", str(count)]
    if count > 1 and cfg.worker_index is None:
        spelled += ["--part-index", str(index)]
    return f"{kept}; to resume, run: {command_line(spelled)}"


def _kept_locally(out: Path) -> str:
    try:
        m = load_manifest(out)
    except (LogitCacheError, OSError):  # stopped before the cache was created
        return f"nothing is written to {out} yet"
    return f"{m.num_examples:,} examples ({m.num_tokens:,} tokens) are kept in {out}, {m.status}"


def parse_temperatures(value: Optional[str]) -> Optional[tuple[float, ...]]:
    """``--temperatures``: None (the engine's default), 'none' or '' (no extra), or '2,4'."""
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return ()
    taus = []
    for part in value.split(","):
        try:
            tau = float(part)
        except ValueError:
            raise LogitCacheError(f"--temperatures {value!r}: {part.strip()!r} is not a number; give e.g. --temperatures 2,4 (or none).") from None
        if not (math.isfinite(tau) and tau > 0):
            raise LogitCacheError(f"--temperatures {value!r}: {part.strip()} is not a positive temperature; give e.g. --temperatures 2,4.")
        taus.append(tau)
    return tuple(taus)
