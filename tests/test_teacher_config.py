"""`logitcache teacher --config teacher.yaml`: every option from a file, flags on the command line win."""

from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.storage import open_cache

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "teacher.yaml"


def _teacher_params() -> dict:
    cmd = typer.main.get_command(app).commands["teacher"]
    return {p.name: p for p in cmd.params if not p.hidden and p.name != "config"}


def _write(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_the_example_lists_every_option_at_its_default():
    values = yaml.safe_load(EXAMPLE.read_text())
    params = _teacher_params()
    assert set(values) == set(params)
    differs = {k: (v, params[k].default) for k, v in values.items()
               if k not in ("model", "data", "out") and v != params[k].default}
    assert differs == {}


def test_the_file_supplies_what_the_command_line_leaves_out(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    cfg = _write(tmp_path / "t.yaml", {"model": str(teacher_dir), "data": str(data_file), "out": str(out),
                                       "top-k": 4, "prompt_field": "prompt", "response_field": "response",
                                       "limit": 6, "temperatures": [3], "progress": False})
    r = CliRunner().invoke(app, ["teacher", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    m = open_cache(out).manifest
    assert (m.k, m.num_examples, m.temperatures) == (4, 6, [3.0])


def test_a_flag_on_the_command_line_wins_over_the_file(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    cfg = _write(tmp_path / "t.yaml", {"top_k": 4, "prompt_field": "prompt", "response_field": "response", "limit": 6})
    r = CliRunner().invoke(app, ["teacher", "--config", str(cfg), "--model", str(teacher_dir), "--data",
                                 str(data_file), "--out", str(out), "--top-k", "5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert open_cache(out).manifest.k == 5


def _refused(tmp_path, values: dict, *needles: str) -> None:
    cfg = _write(tmp_path / "t.yaml", values)
    r = CliRunner().invoke(app, ["teacher", "--config", str(cfg), "--out", str(tmp_path / "cache")])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), r.output
    assert not (tmp_path / "cache").exists()


def test_an_unknown_key_is_refused_naming_it(tmp_path):
    _refused(tmp_path, {"model": "m", "data": "d", "topk": 4}, "unknown keys ['topk']", "top_k")


def test_a_value_of_the_wrong_kind_is_refused_naming_the_key(tmp_path):
    _refused(tmp_path, {"model": "m", "data": "d", "top_k": "many"}, "top_k", "many")


def test_missing_model_is_named_with_both_places_to_give_it(tmp_path):
    _refused(tmp_path, {"data": "d"}, "--model", "--config")


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path):
    _refused(tmp_path, ["top_k", 4], "mapping")
