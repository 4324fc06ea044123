"""`logitcache inspect --stats / --student / --plot / --ids`: seeing a cache, checked against the shards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import make_config
from logitcache.cli import app
from logitcache.pipeline.cache_stats import BINS, cache_stats
from logitcache.storage import open_cache

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def shard_rows(cache: Path) -> list[dict]:
    """The rows as pyarrow reads the shards, without logitcache's reader."""
    manifest = json.loads((cache / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in pq.read_table(cache / s["path"]).to_pylist()]


def by_hand(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per target position (its predicted token ends after the prompt), top-1, tail mass, entropy."""
    top1, tail, entropy = [], [], []
    for r in rows:
        for p, lps in enumerate(r["topk_logprobs"]):
            if r["char_end"][p + 1] <= r["prompt_chars"]:
                continue
            probs = [math.exp(float(lp)) for lp in lps]
            mass = sum(probs)
            top1.append(max(probs))
            tail.append(max(0.0, 1.0 - mass))
            entropy.append(-sum(q / mass * math.log(q / mass) for q in probs if q > 0))
    return {"top1": np.array(top1), "tail": np.array(tail), "entropy": np.array(entropy)}


# --- the distributions --------------------------------------------------------------------------


def test_stats_match_the_shards_read_directly(built_cache):
    rows = shard_rows(built_cache)
    expected = by_hand(rows)
    s = cache_stats(open_cache(built_cache))

    lengths = np.array([len(r["input_ids"]) for r in rows])
    assert s.examples == len(rows) == 24
    assert (s.lengths.low, s.lengths.high, s.lengths.mean) == (lengths.min(), lengths.max(), pytest.approx(lengths.mean()))
    assert s.lengths.quantile(0.5) == np.quantile(lengths, 0.5, method="inverted_cdf")
    assert s.targets == len(expected["top1"]) < s.positions  # the prompts' positions are left out
    for name, hist in (("top1", s.top1), ("tail", s.tail), ("entropy", s.entropy)):
        values = expected[name]
        assert hist.mean == pytest.approx(values.mean(), rel=1e-9, abs=1e-12), name
        assert (hist.low, hist.high) == (pytest.approx(values.min()), pytest.approx(values.max())), name
        for q in (0.1, 0.5, 0.9):  # within one bin of the exact quantile
            assert abs(hist.quantile(q) - np.quantile(values, q)) <= (hist.hi - hist.lo) / BINS, (name, q)


def test_the_entropy_is_of_the_renormalised_top_k_within_0_and_log_k(built_cache):
    s = cache_stats(open_cache(built_cache))
    assert 0.0 <= s.entropy.low <= s.entropy.high <= math.log(8) + 1e-9


def test_limit_scans_only_the_first_examples(built_cache):
    rows = shard_rows(built_cache)[:5]
    s = cache_stats(open_cache(built_cache), limit=5)
    assert s.examples == 5 and s.targets == len(by_hand(rows)["top1"])


def test_inspect_stats_prints_the_table(built_cache):
    r = invoke("inspect", built_cache, "--stats")
    assert r.exit_code == 0, r.output
    mean_top1 = by_hand(shard_rows(built_cache))["top1"].mean()
    for needle in ("tokens per example", "teacher top-1", "tail mass beyond top-8", "renormalised (nats)",
                   "bytes/token", "skipped", "truncated", f"{mean_top1:.3f}"):
        assert needle in r.output, needle
    assert "next token" not in r.output  # the distributions replace the example


# --- a student tokenizer's alignment ------------------------------------------------------------


ASCII_RECORDS = [
    {"id": f"a{i}", "prompt": f"Question {i}: what is the capital of {country}?\n",
     "response": f"The capital of {country} is {city}, a town of {1000 + 37 * i} people."}
    for i, (country, city) in enumerate([
        ("Freedonia", "Zorvik"), ("Ruritania", "Strelsau"), ("Genovia", "Pyrus"), ("Latveria", "Doomstadt"),
        ("Elbonia", "Mudville"), ("Sokovia", "Novi Grad"), ("Florin", "Guilder"), ("Syldavia", "Klow"),
    ])
]


@pytest.fixture(scope="module")
def ascii_cache(tmp_path_factory, teacher_dir) -> Path:
    """A cache of ASCII text only: every token covers whole characters, so spans can be compared by hand."""
    from logitcache.pipeline.teacher.run import run_teacher

    data = tmp_path_factory.mktemp("ascii") / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ASCII_RECORDS))
    out = data.parent / "cache"
    run_teacher(make_config(teacher_dir, data, out), progress=False)
    return out


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory) -> Path:
    """The demo students' tokenizer: SentencePiece-style BPE, other boundaries than the teacher's."""
    from logitcache.pipeline.tiny import build_tiny_student_tokenizer

    return build_tiny_student_tokenizer(tmp_path_factory.mktemp("student-tok") / "tok")


def test_the_caches_own_tokenizer_aligns_every_target(built_cache):
    r = invoke("inspect", built_cache, "--student", built_cache / "tokenizer")
    assert r.exit_code == 0, r.output
    offset_row = next(line for line in r.output.splitlines() if "offset" in line)
    assert "100.0%" in offset_row


def test_another_tokenizer_aligns_the_fraction_counted_by_hand(ascii_cache, other_tokenizer_dir):
    from transformers import AutoTokenizer

    from logitcache.pipeline.offsets import encode_with_offsets

    tok = AutoTokenizer.from_pretrained(other_tokenizer_dir)
    targets = matched = 0
    for row in shard_rows(ascii_cache):
        text, prompt = row["text"], row["prompt_chars"]
        _, starts, ends = encode_with_offsets(tok, text)
        # a position's span is the span of the token it predicts; targets end after the prompt
        teacher = {(s, e) for s, e in zip(row["char_start"][1:], row["char_end"][1:]) if e > prompt and e > s}
        student = [(int(s), int(e)) for s, e in zip(starts[1:], ends[1:]) if e > prompt and e > s]
        targets += len(student)
        matched += sum(span in teacher for span in student)

    s = cache_stats(open_cache(ascii_cache), student_tokenizer=tok)
    offset = s.alignment["offset"]
    assert 0.0 < offset.fraction_text_matched < 1.0
    assert (offset.targets - offset.end_targets, offset.matched - offset.end_matched) == (targets, matched)
    assert 0.0 < s.alignment["position"].fraction_matched <= 1.0


def test_student_on_the_command_line_prints_both_alignments(ascii_cache, other_tokenizer_dir):
    r = invoke("inspect", ascii_cache, "--student", other_tokenizer_dir, "--limit", 3)
    assert r.exit_code == 0, r.output
    assert "first 3 examples" in r.output
    assert any("offset" in line and "%" in line for line in r.output.splitlines())
    assert any("position" in line and "%" in line for line in r.output.splitlines())


# --- the plot -----------------------------------------------------------------------------------


def test_plot_writes_a_png(built_cache, tmp_path):
    out = tmp_path / "stats.png"
    r = invoke("inspect", built_cache, "--plot", out, "--student", built_cache / "tokenizer", "--limit", 4)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_without_matplotlib_is_refused_before_any_work(built_cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "stats.png"
    line = one_error_line(invoke("inspect", built_cache, "--plot", out))
    assert line == "error: --plot needs matplotlib: pip install 'logitcache[plot]'"
    assert not out.exists()


# --- ids ----------------------------------------------------------------------------------------


def test_ids_lists_exactly_the_ids(built_cache):
    r = invoke("inspect", built_cache, "--ids")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [row["id"] for row in shard_rows(built_cache)]


def test_ids_into_a_closed_pipe_stop_quietly(built_cache):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "logitcache", "inspect", str(built_cache), "--ids"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # like `| head` that has had enough, before the first id is written
    stderr = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and stderr == ""


def test_unknown_example_points_to_ids(built_cache):
    line = one_error_line(invoke("inspect", built_cache, "--example", "nope"))
    assert "'nope'" in line and f"logitcache inspect {built_cache} --ids" in line


# --- refusals: one line, exit 2, nothing written ------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["--plot", "{tmp}/nowhere/stats.png"], ["nowhere", "does not exist"]),
    (["--plot", "{tmp}/stats.jpg"], ["stats.jpg", ".png, .pdf, .svg"]),
    (["--plot", "{tmp}"], ["is a directory"]),
    (["--student", "{tmp}/no-tokenizer"], ["--student", "no such directory"]),
    (["--student", "{tmp}"], ["--student", "could not load its tokenizer", "tokenizer.json"]),
    (["--stats", "--limit", "0"], ["--limit must be 1 or more"]),
    (["--limit", "3"], ["--limit", "add --stats"]),
    (["--ids", "--stats"], ["--ids", "drop --stats"]),
    (["--ids", "--example", "ex-00001"], ["--ids", "drop --example"]),
], ids=["plot-dir-missing", "plot-suffix", "plot-is-a-dir", "student-missing", "student-not-a-tokenizer",
        "limit-zero", "limit-without-stats", "ids-with-stats", "ids-with-example"])
def test_bad_options_are_refused_in_one_line(built_cache, tmp_path, args, needles):
    before = sorted(tmp_path.rglob("*"))
    line = one_error_line(invoke("inspect", built_cache, *(a.format(tmp=tmp_path) for a in args)))
    for needle in needles:
        assert needle in line, line
    assert sorted(tmp_path.rglob("*")) == before
