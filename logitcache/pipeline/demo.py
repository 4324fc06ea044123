"""The embedded default: build a tiny teacher, write its cache, inspect and verify it.

Everything is made on the spot (no download), so the demo runs on any machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from logitcache.pipeline.teacher.data import TextTemplate
from logitcache.pipeline.teacher.run import TeacherConfig, TeacherResult, run_teacher
from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_teacher, write_demo_dataset


@dataclass
class DemoConfig:
    out: str = "demo-out"
    examples: int = 256
    train_steps: int = 300
    top_k: int = 64
    hidden_size: int = 128
    num_layers: int = 2
    seed: int = 0


@dataclass
class DemoPaths:
    teacher: Path
    data: Path
    cache: Path


def run_demo(cfg: DemoConfig, progress: bool = True) -> tuple[DemoPaths, TeacherResult]:
    out = Path(cfg.out)
    paths = DemoPaths(teacher=out / "teacher", data=out / "data.jsonl", cache=out / "cache")
    if not (paths.teacher / "config.json").exists():
        build_tiny_teacher(
            paths.teacher,
            train_steps=cfg.train_steps,
            model_cfg=TinyModelConfig(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed),
            seed=cfg.seed,
        )
    if not paths.data.exists():
        write_demo_dataset(paths.data, n=cfg.examples, seed=cfg.seed + 1)
    result = run_teacher(
        TeacherConfig(
            model=os.fspath(paths.teacher),
            data=os.fspath(paths.data),
            out=os.fspath(paths.cache),
            top_k=cfg.top_k,
            template=TextTemplate(prompt_field="prompt", response_field="response"),
            batch_size=16,
        ),
        progress=progress,
    )
    return paths, result
