"""The command line as a user meets it: help, the happy path, and one-line errors."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from logitcache.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def teacher_args(teacher_dir, data, out, *extra):
    return ["teacher", "--model", teacher_dir, "--data", data, "--out", out, "--top-k", 8,
            "--prompt-field", "prompt", "--response-field", "response", "--no-progress", *extra]


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    out = result.output
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_python_dash_m_shows_help():
    r = subprocess.run([sys.executable, "-m", "logitcache", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for command in ("teacher", "inspect", "verify", "merge", "train", "eval", "demo"):
        assert command in r.stdout


def test_teacher_help_explains_the_options():
    r = invoke("teacher", "--help")
    assert r.exit_code == 0
    for option in ("--model", "--data", "--out", "--top-k", "--max-length", "--messages-field", "--limit", "--dtype"):
        assert option in r.output


def test_teacher_inspect_verify(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    r = invoke(*teacher_args(teacher_dir, data_file, out))
    assert r.exit_code == 0, r.output
    assert "wrote 24 examples" in r.output and "tokens/s" in r.output and "complete" in r.output

    r = invoke("inspect", out, "--example", "ex-00002")
    assert r.exit_code == 0, r.output
    assert "bytes/token" in r.output and "top-8" in r.output and "ex-00002" in r.output

    r = invoke("verify", out)
    assert r.exit_code == 0 and r.output.startswith("OK ") and len(r.output.strip().splitlines()) == 1


def test_rerun_reports_resume(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    assert invoke(*teacher_args(teacher_dir, data_file, out, "--limit", 5)).exit_code == 0
    r = invoke(*teacher_args(teacher_dir, data_file, out))
    assert r.exit_code == 0 and "wrote 19 examples" in r.output and "5 already in the cache" in r.output


def test_empty_texts_are_reported(tmp_path, teacher_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["a b c", "", "d e f"]) + "\n")
    r = invoke("teacher", "--model", teacher_dir, "--data", data, "--out", tmp_path / "c", "--top-k", 4, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "skipped 1 empty text" in r.output


def test_debug_shows_the_traceback(tmp_path, teacher_dir):
    r = invoke("--debug", "teacher", "--model", teacher_dir, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "c")
    assert r.exit_code != 0 and r.exception is not None and "no such file" in str(r.exception)


def _bad_inputs(tmp_path, teacher_dir, data_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("precious")
    return {
        "missing data file": (teacher_args(teacher_dir, tmp_path / "nope.jsonl", tmp_path / "o1"), ["no such file"]),
        "empty data file": (teacher_args(teacher_dir, empty, tmp_path / "o2"), ["empty"]),
        "invalid json line": (teacher_args(teacher_dir, broken, tmp_path / "o3"), ["line 2 is not valid JSON"]),
        "unknown field": (
            ["teacher", "--model", teacher_dir, "--data", data_file, "--out", tmp_path / "o4", "--text-field", "body"],
            ["'body'", "fields are: id, prompt, response, text, messages"],
        ),
        "half a prompt/response pair": (
            ["teacher", "--model", teacher_dir, "--data", data_file, "--out", tmp_path / "o5", "--prompt-field", "prompt"],
            ["go together"],
        ),
        "out dir holds other files": (teacher_args(teacher_dir, data_file, occupied), ["not empty", "holds no cache"]),
        "top-k zero": (teacher_args(teacher_dir, data_file, tmp_path / "o6") + ["--top-k", "0"], ["--top-k", "positive"]),
        "top-k negative": (teacher_args(teacher_dir, data_file, tmp_path / "o7") + ["--top-k", "-3"], ["--top-k", "positive"]),
        "top-k above vocab": (teacher_args(teacher_dir, data_file, tmp_path / "o8") + ["--top-k", "100000"], ["exceeds", "512"]),
        "model path missing": (teacher_args(tmp_path / "no-model", data_file, tmp_path / "o9"), ["no such directory"]),
        "bad dtype": (teacher_args(teacher_dir, data_file, tmp_path / "o10") + ["--dtype", "int8"], ["--dtype"]),
        "verify a non-cache": (["verify", occupied], ["not a logitcache cache"]),
        "inspect a missing dir": (["inspect", tmp_path / "nowhere"], ["no such cache directory"]),
    }


BAD = [
    "missing data file", "empty data file", "invalid json line", "unknown field", "half a prompt/response pair",
    "out dir holds other files", "top-k zero", "top-k negative", "top-k above vocab", "model path missing",
    "bad dtype", "verify a non-cache", "inspect a missing dir",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_one_line_error_and_writes_nothing(case, tmp_path, teacher_dir, data_file):
    args, needles = _bad_inputs(tmp_path, teacher_dir, data_file)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = invoke(*args)
    assert_one_line_error(r, *needles)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created, nothing lost
    if case == "out dir holds other files":
        assert (tmp_path / "occupied" / "notes.txt").read_text() == "precious"


def test_inspect_unknown_example(built_cache):
    assert_one_line_error(invoke("inspect", built_cache, "--example", "no-such-id"), "no-such-id")


def test_a_hub_dataset_name_with_an_owner_goes_to_the_hub_not_the_file_system(tmp_path):
    """`owner/name` is not a path here: it is tried on the Hub, which offline fails in one line."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "logitcache", "teacher", "--model", "m", "--data", "tatsu-lab/alpaca",
                        "--out", str(tmp_path / "c"), "--no-progress"],
                       capture_output=True, text=True, timeout=120, check=False, env=env)

    assert r.returncode != 0 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: --data tatsu-lab/alpaca: not a local path")
    assert "Hugging Face Hub dataset 'tatsu-lab/alpaca'" in line and "not in the local datasets cache" in line
    assert "download it first" in line and "give a local path" in line
