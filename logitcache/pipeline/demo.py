"""The embedded default, end to end: teacher -> one cache -> several students -> a table.

Everything is built on the spot (no download) and sized for 2 CPU cores:
1. a tiny teacher (byte-level BPE tokenizer + small Llama) trained on generated text where
   knowledge matters: made-up capitals, sums, and multilingual lines;
2. its top-k cache over the students' training set, written once;
3. students of one size, trained on the same budget from that cache (``DemoConfig.students``):
   SFT and KL with the teacher's tokenizer; SFT and the cross-tokenizer losses with a
   different (SentencePiece-style BPE) tokenizer;
4. held-out bits per character, exact match (stopping included) and prefix match of every student and the teacher.

Every stage that takes more than a moment reports steps done / total, loss, elapsed time and
an estimate of the time left (:class:`~logitcache.pipeline.progress.StepProgress`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from logitcache.pipeline.progress import StepProgress, progress_enabled, trainer_progress
from logitcache.pipeline.records import TextTemplate
from logitcache.pipeline.teacher.run import TeacherConfig, TeacherResult, run_teacher
from logitcache.pipeline.tiny import (
    TinyModelConfig,
    build_tiny_model,
    build_tiny_teacher,
    generate_corpus,
    train_metaspace_bpe_tokenizer,
    write_demo_dataset,
)
from logitcache.storage.fsutil import follow_umask

# The demo's models (hidden 64-128, 2 layers) are too small for a second thread to help on an
# idle machine, and on a busy one every OpenMP parallel region waits at a barrier for a thread
# the OS has descheduled: measured on 2 shared cores at load 6-11, the teacher's training step
# took 2.1 s wall and 0.84 s CPU with 2 threads against 0.10 s and 0.047 s with 1.
DEMO_THREADS = 1

TOKENIZER_LABELS = {"teacher": "teacher (BPE 512)", "sp": "SentencePiece-style BPE 400"}
DEMO_TRAIN_STATS = "demo_train_stats.json"  # per student: aligned fraction and training seconds


@dataclass
class DemoStudent:
    """One row of the demo's table: a student trained from the cache.

    ``tokenizer``: "teacher" (the cache's own tokenizer) or "sp" (a SentencePiece-style BPE with
    other token boundaries). ``options``: TrainConfig fields this row sets beyond the shared budget.
    """

    name: str
    tokenizer: str
    loss: str
    options: dict[str, Any] = field(default_factory=dict)


def default_students() -> list[DemoStudent]:
    """SFT and KL with the teacher's tokenizer; SFT and each cross-tokenizer loss with another.

    To add a row, append here: every row gets the same student size, steps and data.
    """
    return [
        DemoStudent("sft-bpe", "teacher", "sft"),
        DemoStudent("kl-bpe", "teacher", "kl"),
        DemoStudent("sft-sp", "sp", "sft"),
        DemoStudent("uld-sp", "sp", "uld"),
        DemoStudent("mlot-sp", "sp", "mlot"),
        DemoStudent("hybrid-sp", "sp", "hybrid"),
        DemoStudent("alm-sp", "sp", "alm"),
    ]


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
    students: list[DemoStudent] = field(default_factory=default_students)


@dataclass
class DemoRow:
    name: str
    tokenizer: str
    loss: str
    alignment: str
    aligned: float | None
    train_seconds: float
    bits_per_char: float
    exact_match: float | None  # the greedy answer, stopped at EOS, is the reference
    prefix_match: float | None  # the greedy continuation starts with the reference


@dataclass
class DemoPaths:
    teacher: Path
    data: Path
    heldout: Path
    cache: Path
    students: Path


# --- CPUs and threads ---------------------------------------------------------------------


def cgroup_cpu_limit(cgroup_root: str | os.PathLike = "/sys/fs/cgroup", proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process' cgroup in CPUs (``cpu.max`` 150000 100000 -> 1.5), or None.

    A container limited to 2 CPUs still shows the host's CPUs to ``os.cpu_count()`` and to
    the affinity mask; only the quota says how much CPU time it really gets. Reads cgroup v2
    (``cpu.max``, from the process' own group up to the root, the tightest wins) and v1
    (``cpu/cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).
    """
    root = Path(cgroup_root)
    limits: list[float] = []
    own: list[str] = []
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                own.append(parts[2])
    except OSError:
        pass
    dirs = []
    for rel in own:  # cgroup v2: the own group and its parents
        p = root / rel.strip("/")
        while True:
            dirs.append(p)
            if p == root or root not in p.parents:
                break
            p = p.parent
    dirs.append(root)
    for d in dict.fromkeys(dirs):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and float(period) > 0:
            limits.append(float(quota) / float(period))
    for v1 in (root / "cpu", root / "cpu,cpuacct"):  # cgroup v1
        try:
            quota_us = float((v1 / "cpu.cfs_quota_us").read_text())
            period_us = float((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota_us > 0 and period_us > 0:
            limits.append(quota_us / period_us)
    return min(limits) if limits else None


def usable_cpus() -> int:
    """CPUs this process can really use: its affinity mask, capped by its cgroup's CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)


def configure_threads(threads: int | None = None) -> str:
    """Set torch's thread count for the demo and say what was chosen and why (one line).

    ``threads`` None: ``OMP_NUM_THREADS`` if the user set it, else :data:`DEMO_THREADS`. Never
    more than :func:`usable_cpus`. The tokenizers' own thread pool is capped the same way (it
    reads ``RAYON_NUM_THREADS`` when it starts, so this must run before the first tokenization).
    """
    import torch

    cpus = usable_cpus()
    os.environ.setdefault("RAYON_NUM_THREADS", str(cpus))
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads, why = (int(env), "OMP_NUM_THREADS") if env.isdigit() and int(env) > 0 else (DEMO_THREADS, "demo default")
    else:
        why = "--threads"
    chosen = max(1, min(threads, cpus))
    torch.set_num_threads(chosen)
    limit = cgroup_cpu_limit()
    quota = f"cgroup quota {limit:g} CPUs" if limit is not None else "no cgroup CPU quota"
    return (f"torch threads: {chosen} ({why}{', capped' if chosen < threads else ''}); usable CPUs: {cpus} "
            f"(affinity {_affinity()}, {quota}, os.cpu_count {os.cpu_count()})")


def _affinity() -> int | str:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return "n/a"


# --- the stages -----------------------------------------------------------------------------


def demo_paths(cfg: DemoConfig) -> DemoPaths:
    out = Path(cfg.out)
    return DemoPaths(out / "teacher", out / "train.jsonl", out / "heldout.jsonl", out / "cache", out / "students")


def run_teacher_part(cfg: DemoConfig, progress: bool = True) -> tuple[DemoPaths, TeacherResult]:
    paths = demo_paths(cfg)
    if not (paths.teacher / "config.json").exists():
        tmp = paths.teacher.with_name(paths.teacher.name + ".tmp")  # a killed run leaves no half-saved teacher
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(paths.teacher, ignore_errors=True)  # an earlier demo version saved in place
        with StepProgress("teacher training", cfg.teacher_steps, enabled=progress_enabled(progress), indent="  ") as bar:
            build_tiny_teacher(
                tmp, train_steps=cfg.teacher_steps,
                model_cfg=TinyModelConfig(hidden_size=128, num_layers=2, seed=cfg.seed), seed=cfg.seed,
                on_step=lambda step, loss: bar.update(step, loss),
            )
        follow_umask(tmp)  # its weights are written 0600
        tmp.rename(paths.teacher)
    if not paths.data.exists():
        write_demo_dataset(paths.data, n=cfg.examples, seed=cfg.seed + 1)
    if not paths.heldout.exists():
        write_demo_dataset(paths.heldout, n=cfg.eval_examples, seed=cfg.seed + 2)
    result = run_teacher(
        TeacherConfig(
            model=os.fspath(paths.teacher), data=os.fspath(paths.data), out=os.fspath(paths.cache), top_k=cfg.top_k,
            template=TextTemplate(prompt_field="prompt", response_field="response"), batch_size=16,
        ),
        progress=progress_enabled(progress),
    )
    return paths, result


def _student_init(paths: DemoPaths, tokenizer_kind: str, cfg: DemoConfig) -> Path:
    """The same-size untrained student for a tokenizer, built once and shared by its runs."""
    from transformers import AutoTokenizer

    if tokenizer_kind not in TOKENIZER_LABELS:
        from logitcache.errors import LogitCacheError

        raise LogitCacheError(f"demo student tokenizer {tokenizer_kind!r}: use one of {', '.join(TOKENIZER_LABELS)}.")
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
    follow_umask(tmp)  # its weights are written 0600
    tmp.rename(init)
    return init


@dataclass
class _Trained:
    student: DemoStudent
    out: Path
    alignment: str
    aligned: float | None
    seconds: float


def train_students(cfg: DemoConfig, paths: DemoPaths, progress: bool = True,
                   echo: Callable[[str], None] = print) -> list[_Trained]:
    """Every student of ``cfg.students`` on the same budget; one already trained by an earlier run is kept."""
    from logitcache.pipeline.student.train import TrainConfig, run_train

    trained = []
    for i, s in enumerate(cfg.students, 1):
        init = _student_init(paths, s.tokenizer, cfg)
        out = paths.students / s.name
        tcfg = TrainConfig(
            student=os.fspath(init), cache=os.fspath(paths.cache), out=os.fspath(out), loss=s.loss,
            max_steps=cfg.student_steps, batch_size=cfg.student_batch_size, learning_rate=cfg.student_lr,
            save_steps=cfg.student_steps, logging_steps=max(cfg.student_steps // 30, 1), seed=cfg.seed,
            progress=False, shuffle_buffer=256, **s.options,
        )
        alignment = tcfg.resolved_alignment() if s.loss != "sft" else "-"
        if (out / "logitcache_train_config.json").exists():
            echo(f"  {s.name}: trained by an earlier run, kept")
            try:  # what that run measured, for the table
                seen = json.loads((out / DEMO_TRAIN_STATS).read_text())
            except (OSError, ValueError):
                seen = {}
            trained.append(_Trained(s, out, alignment, seen.get("aligned"), float(seen.get("seconds") or 0.0)))
            continue
        tcfg.resume = out.exists()
        label = f"student {i}/{len(cfg.students)} {s.name} ({s.loss})"
        with StepProgress(label, cfg.student_steps, enabled=progress_enabled(progress), indent="  ") as bar:
            r = run_train(tcfg, progress_callback=trainer_progress(bar))
        aligned = (r.feature_stats or {}).get("fraction_matched") if s.loss != "sft" else None
        (out / DEMO_TRAIN_STATS).write_text(json.dumps({"aligned": aligned, "seconds": r.seconds}))
        trained.append(_Trained(s, out, alignment, aligned, r.seconds))
    return trained


def evaluate_all(cfg: DemoConfig, paths: DemoPaths, trained: list[_Trained], progress: bool = True) -> list[DemoRow]:
    """Held-out bits/char and exact match of the teacher and every student, one model at a time."""
    from logitcache.pipeline.student.evaluate import EvalConfig, evaluate

    template = TextTemplate(prompt_field="prompt", response_field="response")
    models = [("teacher", paths.teacher)] + [(t.student.name, t.out) for t in trained]
    results = {}
    with StepProgress("held-out eval", len(models), unit="models", enabled=progress_enabled(progress), interval=0.0, indent="  ") as bar:
        for i, (name, model_dir) in enumerate(models):
            e = evaluate(EvalConfig(model=os.fspath(model_dir), data=os.fspath(paths.heldout), template=template,
                                    log_every=None))
            results[name] = e
            bar.update(i + 1, note=f"{name} {e.bits_per_char:.3f} bits/char")
    t = results["teacher"]
    rows = [DemoRow("teacher", TOKENIZER_LABELS["teacher"], "-", "-", None, 0.0, t.bits_per_char, t.exact_match, t.accuracy)]
    for tr in trained:
        e = results[tr.student.name]
        rows.append(DemoRow(tr.student.name, TOKENIZER_LABELS[tr.student.tokenizer], tr.student.loss, tr.alignment,
                            tr.aligned, tr.seconds, e.bits_per_char, e.exact_match, e.accuracy))
    return rows


def run_students(cfg: DemoConfig, paths: DemoPaths, progress: bool = True) -> list[DemoRow]:
    """Train every student, then evaluate them all and the teacher: the table's rows."""
    return evaluate_all(cfg, paths, train_students(cfg, paths, progress), progress)


def format_table(rows: list[DemoRow]) -> str:
    head = "| model | tokenizer | loss | alignment | aligned | train s | held-out bits/char | exact match | prefix match |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]

    def pct(x: float | None) -> str:
        return f"{x:.1%}" if x is not None else "-"

    for r in rows:
        secs = f"{r.train_seconds:.0f}" if r.train_seconds else "-"
        lines.append(
            f"| {r.name} | {r.tokenizer} | {r.loss} | {r.alignment} | {pct(r.aligned)} | {secs} "
            f"| {r.bits_per_char:.3f} | {pct(r.exact_match)} | {pct(r.prefix_match)} |"
        )
    return "\n".join(lines)
