"""`logitcache train`: stage 2, a student learns from the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from logitcache.cli.common import RESUME_TRAIN, quiet_libraries, show_defaults, user_errors
from logitcache.pipeline.student.config import TrainConfig


@user_errors(interrupted=RESUME_TRAIN)
def train(
    student: Optional[str] = typer.Option(None, "--student", "-s", help="Student to train: a model directory or hub name (any AutoModelForCausalLM with a fast tokenizer).", rich_help_panel="Data"),
    cache: Optional[list[str]] = typer.Option(None, "--cache", "-c", help="Teacher cache written by `logitcache teacher` (a directory or an fsspec URL: s3://bucket/cache, gs://, az://, hf://datasets/me/cache); give it once per teacher to learn from several at once (caches of the same records, by teachers of any tokenizers): CE + λ·Σ w_j·KD_j.", rich_help_panel="Data"),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help="With several --cache: each teacher's weight w_j, comma-separated in --cache order (e.g. 0.7,0.3). Default: equal, summing to 1.", rich_help_panel="Loss"),
    on_missing: Optional[str] = typer.Option(None, "--on-missing", help="With several --cache: refuse records that are not in every cache, or skip them (train on the records all caches hold, naming how many were left out).", rich_help_panel="Data"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory: checkpoints and the final model.", rich_help_panel="Data"),
    loss: Optional[str] = typer.Option(None, "--loss", help="uld (any tokenizer), mlot (MultiLevelOT, any tokenizer), hybrid (TRL GOLD: exact JSD on tokens both vocabularies share, ULD on the rest; --hybrid-* options), alm (approximate likelihood matching of chunks both tokenizations bound; --alm-* options; its gradient scales as 1/τ, so its default --kd-weight is τ, 100), kl (same vocabulary as the teacher) or sft (no teacher).", rich_help_panel="Loss"),
    alignment: Optional[str] = typer.Option(None, "--alignment", help="offset (exact character spans) or position (the papers' index pairing). Default: position for uld/mlot, offset for kl/hybrid; alm uses its own chunks (chunk).", rich_help_panel="Loss"),
    kd_weight: Optional[float] = typer.Option(None, "--kd-weight", help="λ in CE + λ·KD (default 1; with --loss alm, its --alm-temperature, 100, which offsets ALM's 1/τ gradient scale).", rich_help_panel="Loss"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these options (flags given on the command line win).", rich_help_panel="Data"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --num-epochs; -1: none, train --num-epochs).", rich_help_panel="Optimisation"),
    num_epochs: Optional[float] = typer.Option(None, "--num-epochs", help="Passes over the cache.", rich_help_panel="Optimisation"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Examples per device per step.", rich_help_panel="Optimisation"),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps", help="Batches per optimizer step.", rich_help_panel="Optimisation"),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Peak learning rate.", rich_help_panel="Optimisation"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay.", rich_help_panel="Optimisation"),
    warmup_steps: Optional[float] = typer.Option(None, "--warmup-steps", help="Learning-rate warm-up: steps, or a fraction of all steps when below 1.", rich_help_panel="Optimisation"),
    lr_scheduler: Optional[str] = typer.Option(None, "--lr-scheduler", help="Learning-rate schedule after warm-up, a transformers scheduler name: linear, cosine, constant, ...", rich_help_panel="Optimisation"),
    save_total_limit: Optional[int] = typer.Option(None, "--save-total-limit", help="Checkpoints kept in --out, oldest deleted first.", rich_help_panel="Checkpointing"),
    shuffle_buffer: Optional[int] = typer.Option(None, "--shuffle-buffer", help="Examples in each reader's shuffle buffer (row groups are shuffled too).", rich_help_panel="Data"),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="Experiment tracker(s) the Trainer logs to, with CE, KD and the aligned fraction: none, tensorboard, wandb, mlflow, trackio, ... (comma-separated; each needs its package).", rich_help_panel="Logging"),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="The run's name in the tracker (default: the Trainer's).", rich_help_panel="Logging"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Student tokens per example; longer ones are cut on both sides.", rich_help_panel="Data"),
    logging_steps: Optional[int] = typer.Option(None, "--logging-steps", help="Log CE, KD and aligned fraction every N steps.", rich_help_panel="Logging"),
    save_steps: Optional[int] = typer.Option(None, "--save-steps", help="Checkpoint every N steps.", rich_help_panel="Checkpointing"),
    eval_cache: Optional[str] = typer.Option(None, "--eval-cache", help="A second cache to evaluate CE + KD on (a directory or an fsspec URL).", rich_help_panel="Data"),
    local_cache: Optional[Path] = typer.Option(None, "--local-cache", help="With URL caches: keep verified local copies of whole shards in this directory (sha256 checked on download, reused by later epochs and runs, fetched again if damaged) instead of streaming row groups.", rich_help_panel="Data"),
    eval_steps: Optional[int] = typer.Option(None, "--eval-steps", help="Evaluate every N steps (with --eval-cache).", rich_help_panel="Logging"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 mixed precision.", rich_help_panel="Optimisation"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for initialisation and shuffling.", rich_help_panel="Optimisation"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Dataloader worker processes (every example once per epoch, full batches, exact --resume with the same number).", rich_help_panel="Data"),
    kl_kind: Optional[str] = typer.Option(None, "--kl-kind", help="forward, reverse or jsd (with --loss kl).", rich_help_panel="Loss"),
    kd_targets: Optional[str] = typer.Option(None, "--kd-targets", help="topk (the cache's top-k + tail) or sample (the draws of `logitcache teacher --sample N`: an unbiased estimate of the teacher, Random Sampling KD; --loss kl forward only).", rich_help_panel="Loss"),
    mlot_variant: Optional[str] = typer.Option(None, "--mlot-variant", help="paper or code (with --loss mlot; code needs a cache written with `logitcache teacher --logit-stats`).", rich_help_panel="Loss"),
    mlot_k: Optional[int] = typer.Option(None, "--mlot-k", help="Ranked vocabulary dimensions MultiLevelOT compares (50 is the paper's; the cache's k must be at least this).", rich_help_panel="Loss"),
    kd_temperature: Optional[float] = typer.Option(None, "--kd-temperature", help="KD at temperature τ (uld, kl, hybrid; MultiLevelOT's τ_SL; not alm, whose chunk likelihoods have none): the student's softmax(logits/τ) against the teacher's exact probabilities at τ (the cache needs `logitcache teacher --temperatures τ`), KD term × τ² (Hinton et al.).", rich_help_panel="Loss"),
    kd_reduction: Optional[str] = typer.Option(None, "--kd-reduction", help="sample: KD averaged over each example's aligned positions, then over examples (llm-recipes, Multi-Level-OT, TRL); token: over all aligned positions of the batch. CE is always the mean over the batch's targets.", rich_help_panel="Loss"),
    hybrid_beta: Optional[float] = typer.Option(None, "--hybrid-beta", help="--loss hybrid: β of the JSD on matched tokens (0: forward KL, 1: reverse KL; 0.5 is GOLD's).", rich_help_panel="Loss"),
    hybrid_matched_weight: Optional[float] = typer.Option(None, "--hybrid-matched-weight", help="--loss hybrid: weight of the matched-token term (default: GOLD's adaptive weight, the share of the teacher vocabulary that maps).", rich_help_panel="Loss"),
    hybrid_unmatched_weight: Optional[float] = typer.Option(None, "--hybrid-unmatched-weight", help="--loss hybrid: weight of the ULD term on the rest (default: 1 minus the matched share).", rich_help_panel="Loss"),
    alm_temperature: Optional[float] = typer.Option(None, "--alm-temperature", help="--loss alm: binarisation temperature τ in exp(log-likelihood/τ) (100 is tokenkit's).", rich_help_panel="Loss"),
    alm_divergence: Optional[str] = typer.Option(None, "--alm-divergence", help="--loss alm: binary_kl (0 when the student matches) or binary_ce (tokenkit's; same gradient).", rich_help_panel="Loss"),
    alm_mode: Optional[str] = typer.Option(None, "--alm-mode", help="--loss alm: debias (the paper's outcome-chunk debiasing, tokenkit's merge_by_space_prob+append_space: chunks merged until a word likely follows, each likelihood times the probability that a word starts after it; the cache needs `logitcache teacher --word-start`, on by default with `logitcache teacher --engine hf`) or plain (no debiasing; any cache).", rich_help_panel="Loss"),
    alm_merge_threshold: Optional[float] = typer.Option(None, "--alm-merge-threshold", help="--loss alm --alm-mode debias: merge chunks until the teacher's probability that a word starts after them exceeds this (0.1 is tokenkit's).", rich_help_panel="Loss"),
    approximate_temperature: bool = typer.Option(False, "--approximate-temperature", help="--loss mlot on a cache written without `logitcache teacher --temperatures 2`: renormalise the teacher's top-k at τ_SD instead of refusing (biased: the tail's mass is dropped).", rich_help_panel="Loss"),
    kd_chunk_size: Optional[int] = typer.Option(None, "--kd-chunk-size", help="0: CE and KD in one fused, memory-bounded pass over the logits. N > 0: CE, then the standalone ULD/KL loss over chunks of N positions (slower; for comparison).", rich_help_panel="Loss"),
    fused_linear: Optional[str] = typer.Option(None, "--fused-linear", help="auto: compute CE + KD from the student's last hidden states and LM head block by block, never holding the [tokens, vocabulary] logits, where the head is a plain Linear (no soft-capping or logit scaling) and the loss allows it (CE, --loss kl, uld, hybrid; mlot and alm off the CPU, where their extra pass over the head costs more than it saves; one --cache; no --fsdp/--deepspeed), checked against the logits on the first step (a mismatch falls back with a warning). on: the same, refusing what cannot. off: always from the logits.", rich_help_panel="Loss"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint in --out (mid-epoch); one cut short by a kill is passed over.", rich_help_panel="Checkpointing"),
    follow: bool = typer.Option(False, "--follow", help="Train while the teacher writes the cache: start on the shards listed so far and pick up new ones as its manifest grows, until it says complete. The first epoch holds every example of the complete cache once, in the order the shards arrive (row groups and a shuffle buffer shuffled within that); later epochs are as on a complete cache; --resume stays exact. On a cache still being written it needs --max-steps: how many examples the teacher will keep (some records are skipped) is unknown until it ends, and the learning-rate schedule needs its length at the start. On a complete cache it changes nothing.", rich_help_panel="Data"),
    follow_poll: Optional[float] = typer.Option(None, "--follow-poll", help="With --follow: seconds between re-reads of the manifest once everything listed is used; each wait prints one line (records cached so far).", rich_help_panel="Data"),
    follow_timeout: Optional[float] = typer.Option(None, "--follow-timeout", help="With --follow: stop after this many seconds without a new shard, naming the teacher's resume command (default: wait as long as it takes).", rich_help_panel="Data"),
    skip_bad_shards: bool = typer.Option(False, "--skip-bad-shards", help="Train without the cache's damaged shards (missing, resized, altered) and row groups with bad values (NaN, inf, log-probs above 0, unsorted top-k), naming them and the examples lost, instead of refusing the cache.", rich_help_panel="Data"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the student's own Python code to run (off by default: it is code from the model's author). The cache's tokenizer never runs code.", rich_help_panel="Data"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show transformers' progress bar on a terminal. Off a terminal (a log file under Slurm or nohup), or with --no-progress, a plain line every --log-every seconds instead (steps done, loss, time left), beside the Trainer's logged metrics.", rich_help_panel="Logging"),
    log_every: Optional[float] = typer.Option(None, "--log-every", help="Seconds between plain progress lines, printed on stderr; 0: after every step.", rich_help_panel="Logging"),
    fsdp: Optional[str] = typer.Option(None, "--fsdp", help="Under torchrun: shard the student with FSDP, transformers' TrainingArguments.fsdp as it is (e.g. 'full_shard auto_wrap'). With `accelerate launch --config_file fsdp.yaml` leave it out: the config decides.", rich_help_panel="Distributed"),
    fsdp_config: Optional[Path] = typer.Option(None, "--fsdp-config", help="With --fsdp: a JSON file of FSDP settings (transformers' fsdp_config: version, state_dict_type, ...).", rich_help_panel="Distributed"),
    deepspeed: Optional[Path] = typer.Option(None, "--deepspeed", help="A DeepSpeed JSON config (transformers' TrainingArguments.deepspeed), for torchrun or the deepspeed launcher; needs the deepspeed package.", rich_help_panel="Distributed"),
) -> None:
    """Train a student from a teacher cache: CE + λ·KD on transformers' Trainer.

    Works under torchrun / accelerate launch (each rank streams its own part of the cache), with
    DDP, FSDP (an accelerate config, or --fsdp) or DeepSpeed (an accelerate config, or --deepspeed).

    Example:

        logitcache train --student ./student --cache cache/ --loss uld --out runs/uld --max-steps 1000
    """
    quiet_libraries()
    from logitcache.errors import LogitCacheError
    from logitcache.pipeline.student.config import load_config_file
    from logitcache.pipeline.student.train import run_train

    values = load_config_file(config) if config else {}
    given = {
        "student": student, "out": str(out) if out else None,
        # one --cache stays a str (what a single-teacher run saved in its config before)
        "cache": (str(cache[0]) if len(cache) == 1 else [str(c) for c in cache]) if cache else None,
        "teacher_weights": teacher_weights, "on_missing": on_missing,
        "loss": loss, "alignment": alignment, "kd_weight": kd_weight, "max_steps": max_steps,
        "num_epochs": num_epochs, "batch_size": batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
        "learning_rate": learning_rate, "max_length": max_length, "logging_steps": logging_steps,
        "save_steps": save_steps, "eval_cache": str(eval_cache) if eval_cache else None, "eval_steps": eval_steps,
        "bf16": bf16, "seed": seed, "num_workers": num_workers, "kl_kind": kl_kind, "kd_targets": kd_targets, "mlot_variant": mlot_variant, "kd_chunk_size": kd_chunk_size,
        "fused_linear": fused_linear,
        "kd_temperature": kd_temperature, "kd_reduction": kd_reduction, "mlot_k": mlot_k,
        "hybrid_beta": hybrid_beta, "hybrid_matched_weight": hybrid_matched_weight,
        "hybrid_unmatched_weight": hybrid_unmatched_weight, "alm_temperature": alm_temperature,
        "alm_divergence": alm_divergence, "alm_mode": alm_mode, "alm_merge_threshold": alm_merge_threshold,
        "weight_decay": weight_decay, "warmup_steps": warmup_steps, "lr_scheduler": lr_scheduler,
        "save_total_limit": save_total_limit, "shuffle_buffer": shuffle_buffer, "report_to": report_to,
        "run_name": run_name, "log_every": log_every, "follow_poll": follow_poll, "follow_timeout": follow_timeout, "fsdp": fsdp, "fsdp_config": str(fsdp_config) if fsdp_config else None,
        "deepspeed": str(deepspeed) if deepspeed else None, "local_cache": str(local_cache) if local_cache else None,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    switches = (("resume", resume), ("follow", follow), ("skip_bad_shards", skip_bad_shards), ("trust_remote_code", trust_remote_code),
                ("approximate_temperature", approximate_temperature))
    for name, flag in switches:
        if flag:  # a switch left off keeps what --config says
            values[name] = True
    values["progress"] = progress
    missing = [f"--{k}" for k in ("student", "cache", "out") if not values.get(k)]
    if missing:
        raise LogitCacheError(f"missing {', '.join(missing)} (on the command line or in --config).")
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise LogitCacheError(f"bad training options: {e}") from e
    r = run_train(cfg)
    stats = r.feature_stats or {}
    frac = stats.get("fraction_matched")
    line = f"trained {cfg.loss} student for {r.global_step} steps in {r.seconds:.0f}s, final train loss {r.train_loss:.4f}"
    if frac is not None:
        line += f"; aligned {frac:.1%} of target positions ({stats.get('no_kd', 0)} examples without KD, {stats.get('truncated', 0)} truncated)"
    typer.echo(line)
    typer.echo(f"model saved to {cfg.out}")


# The options default to None (so that --config can fill what the command line leaves out):
# --help shows TrainConfig's defaults instead, read from it so that the two cannot drift apart.
show_defaults(train, TrainConfig)
