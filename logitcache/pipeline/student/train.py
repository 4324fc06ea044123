"""Stage 2 training on transformers' Trainer: CE + λ·KD from the cache.

Checkpoints, resume, logging, mixed precision and torchrun/accelerate DDP come from the
Trainer. What we add: the KD term in ``compute_loss``, our streaming dataset (each rank
reads its own part of the cache, so the dataloader is not re-sharded by accelerate), and
the dataset's position saved with every checkpoint so a resumed job continues mid-epoch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from logitcache.errors import LogitCacheError
from logitcache.pipeline.student import losses

LOSSES = ("uld", "mlot", "kl", "sft")
# The papers' alignment for the cross-tokenizer losses; exact spans for a shared vocabulary.
DEFAULT_ALIGNMENT = {"uld": "position", "mlot": "position", "kl": "offset", "sft": "offset"}
DATA_STATE = "logitcache_data_state_rank{rank}.json"
AUTO_CHUNK_ELEMENTS = 2**27  # 512 MiB of fp32 logits: below it one pass is faster and fits


@dataclass
class TrainConfig:
    """Everything `logitcache train` takes (flags, or keys of --config train.yaml)."""

    student: str
    cache: str
    out: str
    loss: str = "uld"
    alignment: str | None = None  # None: the loss's default (DEFAULT_ALIGNMENT)
    kd_weight: float = 1.0
    max_length: int | None = 512
    max_steps: int = -1
    num_epochs: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: float = 0  # steps, or a fraction of all steps when < 1
    lr_scheduler: str = "linear"
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_cache: str | None = None
    eval_steps: int | None = None
    bf16: bool = False
    seed: int = 0
    shuffle_buffer: int = 1024
    num_workers: int = 0
    resume: bool = False
    # Train without shards that are missing, resized or altered (they are named on stderr)
    # instead of refusing the cache.
    skip_bad_shards: bool = False
    kl_kind: str = "forward"  # forward | reverse | jsd
    mlot_variant: str = "paper"  # paper | code
    mlot_k: int = 50
    # 0: CE + KD in one fused pass (losses.fused; MultiLevelOT "code" and "assignment" run CE, then
    # the standalone loss). N > 0: CE, then the standalone ULD/KL over chunks of N positions.
    kd_chunk_size: int = 0
    trust_remote_code: bool = False  # run the student's own Python code (never the cache's tokenizer's)
    progress: bool = True

    def mlot_config(self) -> "losses.MLOTConfig":
        """The MultiLevelOT hyper-parameters these options choose."""
        return losses.MLOTConfig(variant=self.mlot_variant, k=self.mlot_k)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def resolved_alignment(self) -> str:
        return self.alignment or DEFAULT_ALIGNMENT[self.loss]

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise LogitCacheError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}.")
        if self.kd_chunk_size < 0:
            raise LogitCacheError(f"--kd-chunk-size must be 0 (automatic) or positive (got {self.kd_chunk_size}).")
        for name in ("batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps", "mlot_k"):
            if getattr(self, name) <= 0:
                raise LogitCacheError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)}).")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise LogitCacheError(f"--learning-rate must be a positive number (got {self.learning_rate}).")
        if self.kd_weight < 0 or not math.isfinite(self.kd_weight):
            raise LogitCacheError(f"--kd-weight must be 0 or more (got {self.kd_weight}).")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise LogitCacheError("give --max-steps or a positive --num-epochs.")
        if self.kl_kind not in ("forward", "reverse", "jsd"):
            raise LogitCacheError(f"--kl-kind {self.kl_kind!r}: use forward, reverse or jsd.")
        if self.mlot_variant not in ("paper", "code"):
            raise LogitCacheError(f"--mlot-variant {self.mlot_variant!r}: use paper or code.")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (or JSON) mapping of TrainConfig fields; unknown keys are an error, not ignored."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LogitCacheError(f"--config {path}: no such file.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LogitCacheError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]}).") from e
    if not isinstance(data, dict):
        raise LogitCacheError(f"--config {path}: expected a mapping of option: value.")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(TrainConfig.field_names()))
    if unknown:
        raise LogitCacheError(
            f"--config {path}: unknown keys {unknown}; known keys are: {', '.join(TrainConfig.field_names())}."
        )
    return data


def causal_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits [B, T, V] at position q score labels[q + 1]."""
    shifted = labels[:, 1:]
    if not (shifted != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)


def kd_term(cfg: TrainConfig, logits: torch.Tensor, t_lp: torch.Tensor, t_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The KD loss of ``cfg.loss`` on logits [B, T, Vs] against aligned teacher top-k [B, T, K]."""
    if not mask.any():
        return logits.sum() * 0.0
    logits = logits.float()
    if cfg.loss == "mlot":
        return losses.multilevel_ot_loss(logits, t_lp, t_ids, mask, cfg.mlot_config())
    s, lp, ids = logits[mask], t_lp[mask], t_ids[mask]
    ones = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    chunk = cfg.kd_chunk_size or (1024 if s.numel() > AUTO_CHUNK_ELEMENTS else None)
    if cfg.loss == "uld":
        return losses.uld_loss(s, lp, ones, chunk_size=chunk)
    return losses.kl_loss(s, lp, ids, ones, kind=cfg.kl_kind, chunk_size=chunk)


def fused_loss_of(cfg: TrainConfig) -> "losses.FusedLoss | None":
    """The one-pass CE + KD of ``cfg`` (see losses.fused), or None where only the two-step path exists.

    ``--kd-chunk-size`` asks for the standalone chunked losses explicitly, so it turns fusing off.
    """
    spec = losses.FusedLoss(
        loss=cfg.loss, weight=cfg.kd_weight, kl_kind=cfg.kl_kind,
        mlot=cfg.mlot_config(),
    )
    return spec if losses.fused_supports(spec) and not cfg.kd_chunk_size else None


def batch_loss(
    cfg: TrainConfig,
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    kd_mask: torch.Tensor,
    fused: "losses.FusedLoss | None",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE + kd_weight * KD, CE, KD) of a batch: logits [B, T, V], labels [B, T], teacher [B, T, K], kd_mask [B, T].

    ``fused`` is ``fused_loss_of(cfg)``: the one-pass loss where it exists, else CE then the
    standalone KD loss.
    """
    if fused is not None:
        return losses.ce_kd_loss(logits, labels, teacher_logprobs, teacher_ids, kd_mask, fused)
    ce = causal_ce(logits, labels)
    kd = kd_term(cfg, logits, teacher_logprobs, teacher_ids, kd_mask) if cfg.loss != "sft" else ce.new_zeros(())
    return ce + cfg.kd_weight * kd, ce, kd


class _EpochDataLoader(DataLoader):
    """A DataLoader that forwards Trainer's set_epoch to our dataset (reshuffle per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class KDTrainer(Trainer):
    """Trainer whose loss is CE + kd_weight · KD; logs `ce`, `kd` and `kd_fraction` (aligned targets)."""

    def __init__(self, *args, kd_config: TrainConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kd_config = kd_config
        self.fused_loss = fused_loss_of(kd_config)
        # Our loss is a per-batch mean: let the Trainer divide it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._sums = self._zero_sums()

    @staticmethod
    def _zero_sums() -> dict[str, float]:
        return {"ce": 0.0, "kd": 0.0, "kd_positions": 0, "targets": 0, "batches": 0}

    def _loader(self, dataset) -> DataLoader:
        return _EpochDataLoader(
            dataset,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def get_train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        return self._loader(eval_dataset if eval_dataset is not None else self.eval_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        t_lp, t_ids, kd_mask = inputs.pop("teacher_logprobs"), inputs.pop("teacher_ids"), inputs.pop("kd_mask")
        workers, indices = inputs.pop("stream_worker", None), inputs.pop("stream_index", None)
        labels = inputs.pop("labels")
        if workers is not None and model.training:
            self.train_dataset.mark_consumed(workers.tolist(), indices.tolist())
        outputs = model(**inputs)
        loss, ce, kd = batch_loss(self.kd_config, outputs.logits, labels, t_lp, t_ids, kd_mask, self.fused_loss)
        if model.training:
            self._sums["ce"] += float(ce.detach())
            self._sums["kd"] += float(kd.detach())
            self._sums["kd_positions"] += int(kd_mask.sum())
            self._sums["targets"] += int((labels[:, 1:] != -100).sum())
            self._sums["batches"] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sums["batches"]:
            n = self._sums["batches"]
            logs["ce"] = round(self._sums["ce"] / n, 4)
            logs["kd"] = round(self._sums["kd"] / n, 4)
            logs["kd_fraction"] = round(self._sums["kd_positions"] / max(self._sums["targets"], 1), 4)
            self._sums = self._zero_sums()
        super().log(logs, *args, **kwargs)


class DataStateCallback(TrainerCallback):
    """Saves the dataset's position (JSON, one file per rank) into every checkpoint.

    The state is written when the step ends with a save due, before the Trainer writes the
    checkpoint, whose ``trainer_state.json`` comes last. So a checkpoint is complete when
    it holds ``trainer_state.json`` and every rank's data state: a job killed while saving
    leaves a checkpoint without them, which :meth:`last_complete_checkpoint` passes over.
    """

    def __init__(self, dataset, rank: int) -> None:
        self.dataset, self.rank = dataset, rank

    def _write(self, args, state) -> None:
        from logitcache.storage.fsutil import atomic_write_bytes

        # Other ranks can get here before rank 0 has created the folder.
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(ckpt / DATA_STATE.format(rank=self.rank), json.dumps(self.dataset.state_dict()).encode())

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._write(args, state)
        return control

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state)  # the same state again; covers saves not announced at step end
        return control

    @staticmethod
    def is_complete(checkpoint: Path) -> bool:
        """Whether a save finished: ``trainer_state.json`` and every rank's data state are there."""
        if not (checkpoint / "trainer_state.json").is_file():
            return False
        states = sorted(checkpoint.glob(DATA_STATE.format(rank="*")))
        if not states:
            return False
        try:
            world = int(json.loads(states[0].read_text())["world_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return all((checkpoint / DATA_STATE.format(rank=r)).is_file() for r in range(world))

    @classmethod
    def last_complete_checkpoint(cls, out: Path) -> tuple[Path | None, list[Path]]:
        """The highest-numbered complete ``checkpoint-N`` in ``out``, and the incomplete ones above it."""
        found = []
        for p in out.iterdir() if out.is_dir() else []:
            name = p.name.split("-")
            if p.is_dir() and len(name) == 2 and name[0] == "checkpoint" and name[1].isdigit():
                found.append((int(name[1]), p))
        partial: list[Path] = []
        for _, p in sorted(found, reverse=True):
            if cls.is_complete(p):
                return p, partial
            partial.append(p)
        return None, partial


def _warmup_kwargs(warmup: float) -> dict[str, Any]:
    # transformers 5 takes a ratio in warmup_steps (a float < 1); 4.x has warmup_ratio.
    import dataclasses as dc

    from transformers import TrainingArguments

    if 0 < warmup < 1 and "warmup_ratio" in {f.name for f in dc.fields(TrainingArguments)}:
        return {"warmup_ratio": warmup}
    return {"warmup_steps": warmup if 0 < warmup < 1 else int(warmup)}


@dataclass
class TrainResult:
    out: str
    global_step: int
    train_loss: float
    seconds: float
    feature_stats: dict | None


def check_compatibility(cfg: TrainConfig, student_tokenizer, cache) -> None:
    """Refuse combinations that cannot work, before any model is trained (``cache``: a CacheReader)."""
    manifest = cache.manifest
    if cfg.loss == "kl":
        from logitcache.pipeline.loading import load_tokenizer

        # The cache's tokenizer is data from whoever wrote the cache: its files must match the
        # manifest's sha256, and it never runs code of its own.
        tok_dir = cache.verified_tokenizer_dir()
        teacher_tok = load_tokenizer(str(tok_dir), "the cache's tokenizer", trust_remote_code=False)
        if student_tokenizer.get_vocab() != teacher_tok.get_vocab():
            raise LogitCacheError(
                "--loss kl needs a student with the teacher's vocabulary, and this student's tokenizer differs "
                f"({len(student_tokenizer)} vs {len(teacher_tok)} tokens, or other ids); use --loss uld or --loss mlot "
                "for a student with another tokenizer."
            )
    if cfg.loss == "mlot" and manifest.k < cfg.mlot_k:
        raise LogitCacheError(
            f"--loss mlot ranks the top {cfg.mlot_k} teacher tokens, but the cache keeps only k={manifest.k}; "
            f"rerun the teacher with --top-k {cfg.mlot_k} or more, or pass --mlot-k {manifest.k}."
        )


def _notify(messages: list[str], show: bool) -> None:
    """Things a user must know before training starts: to the log, and once to stderr."""
    import logging
    import sys

    for message in messages:
        logging.getLogger(__name__).info(message)
        if show:
            print(f"warning: {message}", file=sys.stderr, flush=True)


def run_train(cfg: TrainConfig) -> TrainResult:
    import time

    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from logitcache.pipeline.loading import load_causal_lm, load_tokenizer
    from logitcache.pipeline.padding import pad_token_id
    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.dataset import LogitCacheDataset
    from logitcache.storage import open_cache

    cfg.validate()
    cache = open_cache(cfg.cache)  # refuses non-caches, unknown versions and manifests that fail the schema
    out = Path(cfg.out)
    newest = get_last_checkpoint(str(out)) if out.is_dir() else None
    if newest and not cfg.resume:
        raise LogitCacheError(
            f"--out {out} already holds checkpoints ({Path(newest).name}); pass --resume to continue, "
            "or choose a new --out so nothing is overwritten."
        )
    # Not transformers' get_last_checkpoint: it takes the highest number, even a save that a
    # kill cut short (weights without optimizer or trainer state: the resume fails or goes wrong).
    last, partial = DataStateCallback.last_complete_checkpoint(out) if cfg.resume else (None, [])
    tokenizer = load_tokenizer(cfg.student, "--student", trust_remote_code=cfg.trust_remote_code)
    check_compatibility(cfg, tokenizer, cache)

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        **_warmup_kwargs(cfg.warmup_steps),
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if cfg.eval_cache and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        bf16=cfg.bf16,
        seed=cfg.seed,
        dataloader_num_workers=cfg.num_workers,
        remove_unused_columns=False,
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=not cfg.progress,
        ignore_data_skip=True,
        # accelerate sets up multi-process CPU training (gloo) under torchrun only when told "cpu".
        use_cpu=not torch.cuda.is_available(),
    )

    def dataset(path: str, shuffle: bool) -> LogitCacheDataset:
        return LogitCacheDataset(
            path, tokenizer, alignment=cfg.resolved_alignment(), max_length=cfg.max_length,
            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, shuffle=shuffle,
            rank=args.process_index, world_size=args.world_size, num_workers=cfg.num_workers,
            skip_bad_shards=cfg.skip_bad_shards,
        )

    # Every shard is checked here, before the model is loaded: a damaged cache stops the run now.
    train_ds = dataset(cfg.cache, shuffle=True)
    eval_ds = dataset(cfg.eval_cache, shuffle=False) if cfg.eval_cache else None
    notices = [ds.skipped_summary() for ds in (train_ds, eval_ds) if ds is not None and ds.skipped_shards]
    if partial:
        notices.append(
            f"--resume: passed over {', '.join(p.name for p in partial)}, incomplete (the job stopped while saving "
            "it); " + (f"resuming from {last.name}." if last else "no complete checkpoint is left, starting from step 0.")
        )
    _notify(notices, args.process_index == 0)
    if last is not None:
        # A rank without its own state (more ranks than saved it) gets rank 0's, which
        # load_state_dict refuses, naming the world size.
        own = last / DATA_STATE.format(rank=args.process_index)
        state_file = own if own.is_file() else last / DATA_STATE.format(rank=0)
        train_ds.load_state_dict(json.loads(state_file.read_text()))
    model = load_causal_lm(cfg.student, "--student", trust_remote_code=cfg.trust_remote_code)
    pad = pad_token_id(tokenizer)
    trainer = KDTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=KDCollator(pad_token_id=pad),
        processing_class=tokenizer,
        callbacks=[DataStateCallback(train_ds, args.process_index)],
        kd_config=cfg,
    )
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        (out / "logitcache_train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    _leave_process_group()
    return TrainResult(
        out=str(out), global_step=result.global_step, train_loss=float(result.training_loss),
        seconds=time.perf_counter() - t0, feature_stats=train_ds.featurizer_stats(),
    )


def _leave_process_group() -> None:
    """Under torchrun: all ranks meet, then close the group together.

    Otherwise the first rank to exit closes its gloo sockets while another is still tearing
    down its own, which can abort that rank (SIGABRT) after a successful run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
