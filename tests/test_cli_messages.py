"""Names and messages that cannot mislead: every fix a message offers is one the CLI takes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import logitcache
from logitcache.cli import app

PACKAGE = Path(logitcache.__file__).parent
# `--name` as a whole word: not `--hybrid-*` (a family of options), not `--nproc_per_node`.
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w*-])")
# Options of other programs that our messages name on purpose.
OTHER_TOOLS = {"--array": "sbatch (Slurm job arrays)", "--head": "ray start (a Ray cluster's head node)"}

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    return errors[0]


def command_options() -> dict[str, set[str]]:
    """Each command's long options, with the root's (--debug, --version, --help)."""
    group = typer.main.get_command(app)
    ctx = group.make_context("logitcache", ["--help"], resilient_parsing=True)
    root = {o for p in group.get_params(ctx) for o in [*p.opts, *p.secondary_opts]}
    return {name: root | {o for p in command.get_params(ctx) for o in [*p.opts, *p.secondary_opts]}
            for name, command in group.commands.items()}


# The command a module's messages speak for, when they do not name one (longest prefix wins).
HOME = {"cli/teacher.py": "teacher", "pipeline/teacher/": "teacher", "cli/train.py": "train",
        "pipeline/student/": "train", "pipeline/student/evaluate.py": "eval", "cli/evaluate.py": "eval",
        "cli/merge.py": "merge", "cli/convert.py": "convert", "cli/demo.py": "demo"}
# `logitcache teacher --top-k 64`: the flags of a quoted command line are that command's.
QUOTED = re.compile(r"`logitcache ([a-z]+)\b([^`]*)`")


def _messages(path: Path):
    """(line, text) of every string literal but docstrings; an f-string as one text, {} for its fields."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    inside_fstrings = {id(c) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for c in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | inside_fstrings:
            yield node.lineno, node.value


def flags_in_messages() -> list[tuple[str, str, str | None]]:
    """(flag, where, the command it belongs to or None when neither the text nor the module says)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        homes = [prefix for prefix in HOME if rel.startswith(prefix)]
        home = HOME[max(homes, key=len)] if homes else None
        for line, text in _messages(path):
            for quoted in QUOTED.finditer(text):
                found += [(flag, f"{rel}:{line}", quoted[1]) for flag in FLAG.findall(quoted[2])]
            found += [(flag, f"{rel}:{line}", home) for flag in FLAG.findall(QUOTED.sub("", text))]
    return found


def test_every_flag_a_message_names_is_an_option_of_the_command_it_speaks_for():
    """A flag in `logitcache CMD ...` is CMD's; any other is its module's command's (teacher for
    pipeline/teacher, train for pipeline/student, ...), or some command's where no module says."""
    options = command_options()
    named = flags_in_messages()
    assert {"--mlot-k", "--resume", "--top-k"} <= {flag for flag, _, _ in named}  # the scan sees the messages
    wrong = [(flag, where, command) for flag, where, command in named if flag not in OTHER_TOOLS
             and flag not in (options.get(command) if command else set().union(*options.values()))]
    assert wrong == []


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


@pytest.mark.parametrize("weights, needle", [
    ("1,2,3", "gives 3 weights for 2 caches"),
    ("0.5,-1", "finite, 0 or more"),
    ("0,0", "not all 0"),
    ("0.5,nan", "finite"),
    ("half,half", "one number per --cache"),
])
def test_train_refuses_teacher_weights_that_do_not_fit_the_caches(tmp_path, built_cache, weights, needle):
    r = invoke("train", "--student", tmp_path / "s", "--cache", built_cache, "--cache", tmp_path / "other",
               "--teacher-weights", weights, "--out", tmp_path / "run")
    line = one_error_line(r)
    assert "--teacher-weights" in line and needle in line
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_out_of_unrelated_files(tmp_path, built_cache, student):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("precious")
    line = one_error_line(invoke("train", "--student", student, "--cache", built_cache, "--out", occupied))
    assert "--out" in line and "not empty" in line and "new or empty directory" in line
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
