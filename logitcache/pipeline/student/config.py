"""What `logitcache train` takes: TrainConfig, its checks, and the --config file.

No torch here: the command line reads the defaults from TrainConfig to show them in --help,
and `--help` should not wait for torch to load.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logitcache.errors import LogitCacheError

if TYPE_CHECKING:
    from logitcache.pipeline.student import losses
    from logitcache.pipeline.student.follow import Follow

LOSSES = ("uld", "mlot", "kl", "sft", "hybrid", "alm")
# The papers' alignment for the cross-tokenizer losses; exact spans for a shared vocabulary.
DEFAULT_ALIGNMENT = {"uld": "position", "mlot": "position", "kl": "offset", "sft": "offset"}
# hybrid pairs positions by offsets (as GOLD, by byte offsets); ALM by its own chunks (offset + chunks.py).
DEFAULT_ALIGNMENT.update({"hybrid": "offset", "alm": "chunk"})


@dataclass
class TrainConfig:
    """Everything `logitcache train` takes (flags, or keys of --config train.yaml)."""

    student: str
    # One teacher cache, or several (a list: YAML `cache: [a, b]`, or --cache given once per
    # teacher), written over the same records: CE + λ · Σ_j w_j · KD_j (see caches()).
    cache: str | list[str]
    out: str
    loss: str = "uld"
    alignment: str | None = None  # None: the loss's default (DEFAULT_ALIGNMENT)
    # λ in CE + λ·KD. None: 1, but ALM's --alm-temperature τ for --loss alm, whose gradient
    # scales as 1/τ (binarised at exp(ll / τ)): at λ = 1 it is about 1/1000 of CE's and does nothing.
    kd_weight: float | None = None
    # Several caches: each teacher's w_j in Σ_j w_j · KD_j, "0.5,0.5" or a list; None: equal,
    # summing to 1 (so one teacher keeps w = 1). λ (kd_weight) multiplies the whole sum.
    teacher_weights: str | list[float] | None = None
    # Several caches: a record that is not in every cache is refused, or left out ("skip").
    on_missing: str = "refuse"
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
    # URL caches: verified local copies of whole shards here (storage/remote_cache.py); None: streamed.
    local_cache: str | None = None
    eval_steps: int | None = None
    bf16: bool = False
    seed: int = 0
    shuffle_buffer: int = 1024
    num_workers: int = 0
    resume: bool = False
    # Train without shards that are missing, resized or altered (they are named on stderr)
    # instead of refusing the cache.
    skip_bad_shards: bool = False
    # Train while the teacher writes: start on the shards listed so far, pick up new ones as the
    # manifest grows (re-read every follow_poll seconds once all listed is used), until it says
    # complete; follow_timeout: stop after that many seconds without a new shard (None: never).
    follow: bool = False
    follow_poll: float = 30.0
    follow_timeout: float | None = None
    kl_kind: str = "forward"  # forward | reverse | jsd
    # The teacher targets of the KD term: "topk" (top-k + tail) or "sample" (the cache's --sample
    # draws, losses/sampled_kl.py: forward KL only, standalone after CE, not fused).
    kd_targets: str = "topk"
    mlot_variant: str = "paper"  # paper | code
    mlot_k: int = 50
    # KD at temperature tau (ULD, KL, hybrid; MultiLevelOT's tau_SL): student softmax(logits / tau), the
    # teacher's exact log-probabilities at tau from the cache, KD term times tau**2 (Hinton).
    kd_temperature: float = 1.0
    # How the KD term averages its per-position losses: "sample" (per sequence, then over the
    # sequences, as llm-recipes, Multi-Level-OT and TRL do) or "token" (over the batch's positions).
    # CE is always the mean over the batch's targets (as in those references).
    kd_reduction: str = "sample"
    # MultiLevelOT on a cache without the temperatures it needs (tau_SD = 2): renormalise the
    # top-K at tau instead of refusing (biased; see losses.MLOTConfig.approximate_temperature).
    approximate_temperature: bool = False
    # 0: CE + KD in one fused pass (losses.fused; MultiLevelOT "code" and "assignment" run CE, then
    # the standalone loss). N > 0: CE, then the standalone ULD/KL over chunks of N positions.
    kd_chunk_size: int = 0
    # CE + KD from the last hidden states and the LM head, no [N, V] logits (losses.fused_linear;
    # fused_head.py): "auto" where the model's head and the loss allow it, "on" refuses otherwise.
    fused_linear: str = "auto"
    # TRL GOLD's hybrid (--loss hybrid): JSD beta on matched tokens; weights None = GOLD's adaptive
    # ones (the share of the teacher vocabulary that maps, and 1 minus it).
    hybrid_beta: float = 0.5
    hybrid_matched_weight: float | None = None
    hybrid_unmatched_weight: float | None = None
    # ALM (--loss alm): tokenkit's binarisation temperature and distance.
    alm_temperature: float = 100.0
    alm_divergence: str = "binary_kl"  # binary_kl | binary_ce
    # the paper's outcome-chunk debiasing (tokenkit's merge_by_space_prob+append_space), or none
    alm_mode: str = "debias"  # debias | plain
    alm_merge_threshold: float = 0.1  # tokenkit's tokenizer_pair_bias_threshold
    trust_remote_code: bool = False  # run the student's own Python code (never the cache's tokenizer's)
    # Experiment trackers the Trainer reports to (its report_to): none, or e.g. tensorboard, wandb,
    # mlflow, trackio; comma-separated for several. run_name: the run's name there.
    report_to: str = "none"
    run_name: str | None = None
    # transformers' own sharding options, passed to TrainingArguments as they are, for torchrun /
    # `deepspeed` launches (with `accelerate launch --config_file`, its config decides instead).
    # fsdp: e.g. "full_shard auto_wrap"; fsdp_config and deepspeed: paths to JSON files.
    fsdp: str | None = None
    fsdp_config: str | None = None
    deepspeed: str | None = None
    # A bar on a terminal (transformers'); off one (a job's log file), or without progress, a
    # plain line every log_every seconds: a tqdm bar redrawn into a file is one endless line.
    progress: bool = True
    log_every: float = 30.0

    def mlot_config(self) -> "losses.MLOTConfig":
        """The MultiLevelOT hyper-parameters these options choose (--kd-temperature is its tau_SL)."""
        from logitcache.pipeline.student import losses

        return losses.MLOTConfig(
            variant=self.mlot_variant, k=self.mlot_k, tau_sl=self.kd_temperature, hinton_scale=True,
            approximate_temperature=self.approximate_temperature,
        )

    def teacher_temperatures(self) -> list[float]:
        """The temperatures other than 1 at which the KD term reads the teacher (sorted)."""
        if self.loss in ("uld", "kl", "hybrid"):
            return [] if self.kd_temperature == 1.0 else [float(self.kd_temperature)]
        if self.loss == "mlot":
            from logitcache.pipeline.student import losses

            return losses.mlot_temperatures(self.mlot_config())
        return []

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def __post_init__(self) -> None:
        if self.kd_weight is None:
            alm_tau = self.alm_temperature
            self.kd_weight = float(alm_tau) if self.loss == "alm" and isinstance(alm_tau, (int, float)) else 1.0

    def caches(self) -> list[str]:
        """The teacher caches, the first driving the order (one for a str ``cache``)."""
        return [str(c) for c in self.cache] if isinstance(self.cache, (list, tuple)) else [str(self.cache)]

    def resolved_teacher_weights(self) -> list[float]:
        """One weight per cache (validated): the given ones, or equal ones summing to 1."""
        n = len(self.caches())
        given = self.teacher_weights
        if given is None:
            return [1.0 / n] * n
        items = [p.strip() for p in given.split(",")] if isinstance(given, str) else list(given)
        try:
            weights = [float(w) for w in items]
        except (TypeError, ValueError):
            raise LogitCacheError(f"--teacher-weights {given!r}: give one number per --cache, comma-separated "
                                  "(e.g. 0.5,0.5).") from None
        if len(weights) != n:
            raise LogitCacheError(f"--teacher-weights gives {len(weights)} weights for {n} caches; give one per --cache "
                                  "(in their order), or leave it out for equal weights.")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
            raise LogitCacheError(f"--teacher-weights {given!r}: the weights must be finite, 0 or more, and not all 0.")
        return weights

    def resolved_alignment(self) -> str:
        return self.alignment or DEFAULT_ALIGNMENT[self.loss]

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise LogitCacheError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}.")
        check_trackers(self.report_to)
        self._validate_sharding()
        if not self.caches() or not all(self.caches()):
            raise LogitCacheError("give --cache (once per teacher).")
        if self.on_missing not in ("refuse", "skip"):
            raise LogitCacheError(f"--on-missing {self.on_missing!r}: use refuse or skip.")
        self.resolved_teacher_weights()
        self._validate_follow()
        if not (isinstance(self.log_every, (int, float)) and math.isfinite(self.log_every) and self.log_every >= 0):
            raise LogitCacheError(f"--log-every must be 0 or more seconds (got {self.log_every}); 0 logs at every step.")
        if self.kd_chunk_size < 0:
            raise LogitCacheError(f"--kd-chunk-size must be 0 (automatic) or positive (got {self.kd_chunk_size}).")
        if self.fused_linear not in ("auto", "on", "off"):
            raise LogitCacheError(f"--fused-linear {self.fused_linear!r}: use auto, on or off.")
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
        self._validate_kd_targets()
        if self.mlot_variant not in ("paper", "code"):
            raise LogitCacheError(f"--mlot-variant {self.mlot_variant!r}: use paper or code.")
        if not (isinstance(self.kd_temperature, (int, float)) and 0 < self.kd_temperature < math.inf):
            raise LogitCacheError(f"--kd-temperature must be a positive number (got {self.kd_temperature}).")
        from logitcache.pipeline.student.losses.chunking import REDUCTIONS

        if self.kd_reduction not in REDUCTIONS:
            raise LogitCacheError(f"--kd-reduction {self.kd_reduction!r}: use sample or token.")
        if self.loss == "mlot" and self.mlot_variant == "code" and self.kd_temperature != 1.0:
            raise LogitCacheError(
                "--mlot-variant code runs at temperature 1 (the cache's std-normalised log-partition is at 1 "
                "only); drop --kd-temperature or use --mlot-variant paper."
            )
        self._validate_hybrid_alm()

    def _validate_follow(self) -> None:
        """--follow's options, before any work."""
        self.follow_settings()
        if self.follow and len(self.caches()) > 1:
            raise LogitCacheError("--follow reads one cache as its teacher writes it, and several --cache are matched by "
                                  "id over complete caches: follow one teacher's cache, or train on all of them once "
                                  "their teachers have finished.")

    def follow_settings(self) -> "Follow":
        """--follow-poll and --follow-timeout as the dataset takes them (refused in one line if bad)."""
        from logitcache.pipeline.student.follow import Follow

        return Follow(poll=self.follow_poll, timeout=self.follow_timeout)

    def _validate_sharding(self) -> None:
        """--fsdp / --fsdp-config / --deepspeed, before any work (else: a traceback once the model is loaded)."""
        import importlib.util

        if self.deepspeed is not None:
            if importlib.util.find_spec("deepspeed") is None:
                raise LogitCacheError("--deepspeed needs the deepspeed package: pip install deepspeed")
            if self.fsdp:
                raise LogitCacheError("--fsdp and --deepspeed both shard the model; give one of them.")
        for name in ("fsdp_config", "deepspeed"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise LogitCacheError(f"--{name.replace('_', '-')} {path}: no such file (a JSON config is expected).")
        if self.fsdp_config is not None and not self.fsdp:
            raise LogitCacheError("--fsdp-config configures --fsdp; give --fsdp too (e.g. --fsdp 'full_shard auto_wrap').")

    def _validate_kd_targets(self) -> None:
        """--kd-targets sample: the draws estimate p itself, so only a loss linear in p keeps the estimate unbiased."""
        if self.kd_targets not in ("topk", "sample"):
            raise LogitCacheError(f"--kd-targets {self.kd_targets!r}: use topk or sample.")
        if self.kd_targets != "sample":
            return
        if self.loss != "kl":
            raise LogitCacheError(
                f"--kd-targets sample works with --loss kl only: --loss {self.loss} needs the teacher's ranked "
                "log-probabilities (or chunk likelihoods), which draws do not give; use --kd-targets topk with it."
            )
        if self.kl_kind != "forward":
            raise LogitCacheError(
                f"--kd-targets sample estimates forward KL only: --kl-kind {self.kl_kind} needs log p where the student "
                "has mass, which the draws cannot estimate without bias; use --kl-kind forward, or --kd-targets topk."
            )
        if self.kd_temperature != 1.0:
            raise LogitCacheError(
                "--kd-targets sample holds draws from the teacher at temperature 1, which estimate no other "
                "temperature; drop --kd-temperature, or use --kd-targets topk."
            )

    def _validate_hybrid_alm(self) -> None:
        """the hybrid's and ALM's options."""
        if self.loss == "alm" and self.alignment not in (None, "chunk"):
            raise LogitCacheError(f"--loss alm aligns by its own chunks; drop --alignment {self.alignment}.")
        if self.loss == "alm" and self.kd_temperature != 1.0:
            # ALM compares chunk likelihoods (sums of the stored label log-probs), not distributions:
            # there is no distribution to soften. Its own sharpness is --alm-temperature.
            raise LogitCacheError("--loss alm compares chunk likelihoods, which have no temperature; drop "
                                  "--kd-temperature (ALM's own knob is alm_temperature).")
        if self.alignment == "chunk" and self.loss != "alm":
            raise LogitCacheError("--alignment chunk is ALM's; use offset or position with --loss " f"{self.loss}.")
        if not 0.0 <= self.hybrid_beta <= 1.0:
            raise LogitCacheError(f"hybrid_beta must be in [0, 1] (got {self.hybrid_beta}).")
        if (self.hybrid_matched_weight is None) != (self.hybrid_unmatched_weight is None):
            raise LogitCacheError("give both hybrid_matched_weight and hybrid_unmatched_weight, or neither (GOLD's adaptive weights).")
        for w in (self.hybrid_matched_weight, self.hybrid_unmatched_weight):
            if w is not None and (w < 0 or not math.isfinite(w)):
                raise LogitCacheError(f"hybrid weights must be 0 or more (got {w}).")
        if not (self.alm_temperature > 0 and math.isfinite(self.alm_temperature)):
            raise LogitCacheError(f"alm_temperature must be positive (got {self.alm_temperature}).")
        if self.alm_divergence not in ("binary_kl", "binary_ce"):
            raise LogitCacheError(f"alm_divergence {self.alm_divergence!r}: use binary_kl or binary_ce.")
        if self.alm_mode not in ("debias", "plain"):
            raise LogitCacheError(f"--alm-mode {self.alm_mode!r}: use debias (the paper's) or plain (no debiasing).")
        if not (isinstance(self.alm_merge_threshold, (int, float)) and 0 <= self.alm_merge_threshold < 1):
            raise LogitCacheError(f"--alm-merge-threshold must be a probability in [0, 1) (got {self.alm_merge_threshold}); the default is 0.1.")

    def alm_debiased(self) -> bool:
        """Whether ALM's chunks are debiased (the featurizer merges them; the loss adds word starts)."""
        return self.loss == "alm" and self.alm_mode == "debias"


# The trackers transformers' Trainer reports to (report_to), and the package each one needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "neptune": "neptune",
            "swanlab": "swanlab"}


def check_trackers(report_to: str) -> None:
    """Refuse, before any work, a tracker the Trainer does not know or whose package is missing
    (the Trainer would fail only once the model is loaded, with a traceback)."""
    import importlib.util

    if report_to == "none":
        return
    for name in (t.strip() for t in str(report_to).split(",")):
        if name not in TRACKERS:
            raise LogitCacheError(f"--report-to {name!r}: use none or any of {', '.join(TRACKERS)} (comma-separated).")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise LogitCacheError(f"--report-to {name}: the {TRACKERS[name]} package is not installed; "
                                  f"`pip install {TRACKERS[name]}`, or pass --report-to none.")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (or JSON) mapping of TrainConfig fields; unknown keys are an error, not ignored."""
    from logitcache.pipeline.config_file import read_config_mapping

    data = read_config_mapping(path)
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(TrainConfig.field_names()))
    if unknown:
        raise LogitCacheError(
            f"--config {path}: unknown keys {unknown}; known keys are: {', '.join(TrainConfig.field_names())}."
        )
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    return {key: coerce_config_value(value, types[key], f"--config {path}: {key}") for key, value in data.items()}


_NAMES = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "text"}


def coerce_config_value(value: Any, annotation: str, where: str) -> Any:
    """``value`` as the dataclass field type ``annotation`` says ("float", "int | None", ...), or one line.

    Why: YAML 1.1 reads ``1e-4`` (no dot) as a string, which would crash the optimizer, or, for
    weight decay, reach it as text; a whole-number float (``max_steps: 100.0``) is an int.
    """
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise LogitCacheError(f"{where}: needs a value ({_NAMES.get(kinds[0], kinds[0])}), not null.")
    base = next(k for k in kinds if k != "None")
    try:
        if base == "float" and not isinstance(value, bool):
            out = float(value)
            if math.isfinite(out) or isinstance(value, float):
                return out
        elif base == "int" and not isinstance(value, bool):
            out = float(value)  # 100, 100.0, "100", "1e3"
            if out.is_integer():
                return int(out)
        elif base == "bool" and isinstance(value, bool):
            return value
        elif base == "str" and isinstance(value, str):
            return value
        if isinstance(value, list) and "list[str]" in kinds and value and all(isinstance(v, str) for v in value):
            return value[0] if len(value) == 1 else list(value)
        if isinstance(value, list) and "list[float]" in kinds and not any(isinstance(v, bool) for v in value):
            return [float(v) for v in value]
    except (TypeError, ValueError):
        pass
    raise LogitCacheError(f"{where}: {value!r} is not {_NAMES.get(base, base)}.")
