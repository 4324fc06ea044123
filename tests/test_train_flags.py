"""Every training option is a `logitcache train` flag, and trackers are checked before any work."""

import dataclasses
import importlib.util
import json

import pytest
import typer
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.pipeline.student.train import TrainConfig


def _train_options() -> set[str]:
    cmd = typer.main.get_command(app).commands["train"]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_every_training_option_is_a_flag():
    missing = [f.name for f in dataclasses.fields(TrainConfig) if "--" + f.name.replace("_", "-") not in _train_options()]
    assert missing == []


def test_the_optimisation_and_tracking_flags_reach_the_saved_config(tmp_path, built_cache, student):
    args = ["train", "--student", str(student), "--cache", str(built_cache), "--out", str(tmp_path / "run"),
            "--loss", "sft", "--max-steps", "1", "--batch-size", "4", "--no-progress", "--weight-decay", "0.01",
            "--warmup-steps", "0.1", "--lr-scheduler", "cosine", "--save-total-limit", "1", "--shuffle-buffer", "16",
            "--run-name", "trial-7"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "logitcache_train_config.json").read_text())
    assert {k: saved[k] for k in ("weight_decay", "warmup_steps", "lr_scheduler", "save_total_limit", "shuffle_buffer",
                                  "run_name", "report_to")} == {
        "weight_decay": 0.01, "warmup_steps": 0.1, "lr_scheduler": "cosine", "save_total_limit": 1, "shuffle_buffer": 16,
        "run_name": "trial-7", "report_to": "none"}


def test_an_unknown_tracker_is_refused_in_one_line_before_any_work(tmp_path):
    r = CliRunner().invoke(app, ["train", "--student", "s", "--cache", "c", "--out", str(tmp_path / "run"),
                                 "--report-to", "tensorbored"])
    assert r.exit_code != 0
    assert r.output.strip().startswith("error: --report-to 'tensorbored': use none or any of tensorboard, wandb")
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_whose_package_is_missing_names_the_install(tmp_path):
    r = CliRunner().invoke(app, ["train", "--student", "s", "--cache", "c", "--out", str(tmp_path / "run"),
                                 "--report-to", "wandb"])
    assert r.exit_code != 0
    assert r.output.strip() == ("error: --report-to wandb: the wandb package is not installed; `pip install wandb`, "
                                "or pass --report-to none.")


def test_tensorboard_gets_ce_kd_and_the_aligned_fraction(tmp_path, built_cache, student):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "--student", str(student), "--cache", str(built_cache), "--out", str(tmp_path / "run"),
            "--loss", "uld", "--max-steps", "2", "--batch-size", "4", "--logging-steps", "1", "--no-progress",
            "--report-to", "tensorboard"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    events = sorted((tmp_path / "run").rglob("events.out.tfevents*"))
    assert events, "no tensorboard event file"
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/kd", "train/kd_fraction"} <= tags, tags


def test_the_example_config_lists_every_option_at_its_default():
    from pathlib import Path

    from logitcache.pipeline.student.train import load_config_file

    path = Path(__file__).resolve().parents[1] / "examples" / "train.yaml"
    values = load_config_file(path)
    assert set(values) == set(TrainConfig.field_names())
    cfg = TrainConfig(**values)
    defaults = TrainConfig(student=cfg.student, cache=cfg.cache, out=cfg.out)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(defaults)


def test_help_shows_each_options_default_from_the_config():
    """The flags default to None (so --config can fill them); --help shows TrainConfig's own defaults."""
    cmd = typer.main.get_command(app).commands["train"]
    shown = {p.name: p.show_default for p in cmd.params if p.default is None}
    expected = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING and f.default is not None and f.name in shown}
    assert expected and all(str(shown[name]).lower() == str(value).lower() for name, value in expected.items()), (
        {n: (shown[n], v) for n, v in expected.items()})
    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "default: (1024)" in r.output and "default: (linear)" in r.output
