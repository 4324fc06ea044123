"""Names and messages that cannot mislead: every fix a message offers is one the CLI takes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

import logitcache
from logitcache.cli import app

PACKAGE = Path(logitcache.__file__).parent
# `--name` as a whole word: not `--hybrid-*` (a family of options), not `--nproc_per_node`.
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w*-])")
# Options of other programs that our messages name on purpose.
OTHER_TOOLS = {"--array": "sbatch (Slurm job arrays)"}

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    return errors[0]


def cli_options() -> set[str]:
    """Every long option of `logitcache` and its commands, `--help` included."""
    group = typer.main.get_command(app)
    ctx = group.make_context("logitcache", ["--help"], resilient_parsing=True)
    options = set()
    for command in [group, *group.commands.values()]:
        for param in command.get_params(ctx):
            options.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return options


def flags_in_strings() -> dict[str, list[str]]:
    """flag -> where it is named, over every string literal (messages, help, docstrings)."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    found.setdefault(flag, []).append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_every_flag_a_message_names_is_an_option_of_the_cli():
    named = flags_in_strings()
    assert "--mlot-k" in named and "--resume" in named  # the scan sees the messages
    unknown = {f: where for f, where in named.items() if f not in cli_options() and f not in OTHER_TOOLS}
    assert unknown == {}


def test_version_prints_the_name_and_version():
    r = subprocess.run([sys.executable, "-m", "logitcache", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"logitcache {logitcache.__version__}"


def test_engine_help_shows_the_vllm_extra():
    r = invoke("teacher", "--help")
    assert r.exit_code == 0
    assert "'logitcache[vllm]'" in r.output


def test_ctrl_c_in_train_says_to_rerun_with_resume(monkeypatch, tmp_path, built_cache):
    import logitcache.pipeline.student.train as train_module

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "run_train", interrupted)
    r = invoke("train", "--student", tmp_path / "s", "--cache", built_cache, "--out", tmp_path / "run")
    assert r.exit_code == 130
    assert "--resume" in r.output and "interrupted" in r.output


def test_inspect_of_an_unknown_id_shows_real_ids(built_cache):
    line = one_error_line(invoke("inspect", built_cache, "--example", "nope"))
    assert "'nope'" in line and "'ex-00000'" in line and "24 in all" in line


def test_train_refuses_a_second_cache(tmp_path, built_cache):
    r = invoke("train", "--student", tmp_path / "s", "--cache", built_cache, "--cache", tmp_path / "other",
               "--out", tmp_path / "run")
    line = one_error_line(r)
    assert "--cache given 2 times" in line and "once" in line
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_out_of_unrelated_files(tmp_path, built_cache, student):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("precious")
    line = one_error_line(invoke("train", "--student", student, "--cache", built_cache, "--out", occupied))
    assert "--out" in line and "not empty" in line and "new or empty directory" in line
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
