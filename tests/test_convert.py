"""`logitcache convert`: a cache rewritten with the other codec, verified both ways, refusals in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_config
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.storage import load_manifest, open_cache, verify_cache
from logitcache.storage.codec import ERROR_BOUND_NATS
from logitcache.storage.convert import convert_cache

runner = CliRunner()
EXACT = ("id", "text", "prompt_chars", "truncated", "input_ids", "char_start", "char_end", "topk_ids",
         "label_logprob", "logsumexp", "lse_tau", "logit_mean", "logit_std", "lse_std", "word_start_logprob")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory, teacher_dir, data_file) -> Path:
    """A v1 cache with every optional column and some skipped records (text over --max-chars)."""
    from logitcache.pipeline.teacher.run import run_teacher

    out = tmp_path_factory.mktemp("convert") / "v1"
    run_teacher(make_config(teacher_dir, data_file, out, logit_stats=True, max_chars=65), progress=False)
    m = load_manifest(out)
    assert m.skipped and m.temperatures and m.word_start and m.logit_stats and len(m.shards) > 1
    return out


@pytest.fixture(scope="module")
def compact(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "compact"
    convert_cache(source, out, "compact", shard_bytes=4_000)
    return out


@pytest.fixture(scope="module")
def back_to_v1(compact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "v1-again"
    convert_cache(compact, out, "v1")
    return out


def rows(cache: Path) -> list[dict]:
    return list(open_cache(cache))


def copy(cache: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(cache, dst)
    return dst


# --- converting ------------------------------------------------------------------------------


def test_v1_to_compact_to_v1_keeps_every_exact_column_and_the_logprobs_within_the_bound(source, back_to_v1):
    before, after = rows(source), rows(back_to_v1)
    assert [r["id"] for r in after] == [r["id"] for r in before]
    for a, b in zip(before, after):
        for name in EXACT:
            np.testing.assert_array_equal(np.asarray(b[name]), np.asarray(a[name]), err_msg=name)
        x, y = a["topk_logprobs"].astype(np.float64), b["topk_logprobs"].astype(np.float64)
        # the compact codec's bound, then float16 rounding of the decoded value (half an ulp)
        assert (np.abs(x - y) <= ERROR_BOUND_NATS + np.abs(y) * 2.0**-11).all()


def test_the_manifest_metadata_is_carried_over(source, compact, back_to_v1):
    m = load_manifest(source)
    for cache, codec in ((compact, "compact"), (back_to_v1, "v1")):
        c = load_manifest(cache)
        assert c.codec == codec and c.status == "complete"
        assert {k: v for k, v in c.settings().items() if k != "codec"} == {k: v for k, v in m.settings().items() if k != "codec"}
        assert c.skipped == m.skipped and c.created_at == m.created_at
        assert c.converted_from["codec"] == ("v1" if codec == "compact" else "compact")
        assert sorted(p.name for p in (cache / "tokenizer").iterdir()) == sorted(m.tokenizer["files"])


def test_compact_to_v1_stores_exactly_the_float16_of_the_decoded_logprobs(compact, back_to_v1):
    for a, b in zip(rows(compact), rows(back_to_v1)):
        assert b["topk_logprobs"].dtype == np.float16
        # written independently of the writer: float16 of the decoded float32, clipped at float16's lowest
        expected = np.maximum(np.asarray(a["topk_logprobs"], np.float32), np.finfo(np.float16).min).astype(np.float16)
        np.testing.assert_array_equal(b["topk_logprobs"], expected)


def test_v1_to_compact_is_within_the_codec_bound(source, compact):
    for a, b in zip(rows(source), rows(compact)):
        assert (np.abs(a["topk_logprobs"].astype(np.float64) - b["topk_logprobs"]) <= ERROR_BOUND_NATS).all()


def test_a_v1_copy_of_a_compact_cache_reads_in_datasets_as_floats(back_to_v1):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(back_to_v1 / "data" / "*.parquet"), split="train")
    assert "float" in str(ds.features["topk_logprobs"]) and "int32" in str(ds.features["topk_ids"])
    first = ds[0]["topk_logprobs"][0]
    assert len(first) == 8 and all(isinstance(v, float) and v <= 0 for v in first)


def test_the_converted_cache_passes_logitcache_verify(compact, back_to_v1):
    for cache in (compact, back_to_v1):
        r = invoke("verify", cache)
        assert r.exit_code == 0 and r.output.startswith("OK "), r.output


def test_cli_converts_and_says_verified_in_one_line(source, tmp_path):
    r = invoke("convert", source, tmp_path / "out", "--codec", "compact")

    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("converted ") and "verified: passes verify" in lines[0]
    assert f"within {ERROR_BOUND_NATS:.4f} nats" in lines[0]
    assert verify_cache(tmp_path / "out").ok


def test_cli_logs_each_stage_of_a_long_convert_on_stderr(compact, tmp_path):
    r = invoke("convert", compact, tmp_path / "out", "--codec", "v1", "--log-every", "0")

    assert r.exit_code == 0, r.output
    assert "exactly the float16" in r.stdout
    for stage in ("checking", "converting", "verifying", "comparing"):
        assert f"convert, {stage}: " in r.stderr, r.stderr


def test_converted_files_follow_the_umask(source, tmp_path):
    old = os.umask(0o027)
    try:
        convert_cache(source, tmp_path / "out", "compact")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}


def test_help_says_when_to_use_which_codec():
    r = invoke("convert", "--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for needle in ("datasets", "pandas", "DuckDB", "compact", "half", "resumes"):
        assert needle in text, needle


# --- the card ------------------------------------------------------------------------------


def test_the_card_of_a_compact_cache_says_how_to_get_plain_parquet(compact):
    card = (compact / "README.md").read_text()
    assert "not as numbers" in card and "logitcache convert CACHE OUT --codec v1" in card
    assert "Converted by `logitcache convert` from a cache in the v1 codec" in card


def test_the_card_of_a_v1_cache_says_which_tools_read_it(source):
    card = (source / "README.md").read_text()
    assert "datasets.load_dataset" in card and "pandas" in card and "--codec compact" in card


# --- interrupted and resumed -----------------------------------------------------------------


def test_a_killed_convert_resumes_when_rerun(source, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "logitcache", "convert", str(source), str(out), "--codec", "compact",
           "--shard-size-mb", "0.001"]
    env = {**os.environ, "LOGITCACHE_CRASH_AT": "shard.listed:2"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert load_manifest(out).status == "partial" and len(load_manifest(out).shards) == 2

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "verified" in r.stdout
    assert load_manifest(out).status == "complete" and verify_cache(out).ok


def test_ctrl_c_leaves_a_partial_convert_that_the_same_command_completes(source, tmp_path, monkeypatch):
    from logitcache.storage.writer import CacheWriter

    out = tmp_path / "out"
    write = CacheWriter.write

    def interrupted(self, row):
        if len(self.done_ids) - len(self.manifest.skipped) >= 5:
            raise KeyboardInterrupt
        write(self, row)

    monkeypatch.setattr(CacheWriter, "write", interrupted)
    r = invoke("convert", source, out, "--codec", "compact")
    assert r.exit_code == 130 and "rerun the same command to resume" in r.output, r.output
    assert load_manifest(out).status == "partial"

    monkeypatch.setattr(CacheWriter, "write", write)
    r = invoke("convert", source, out, "--codec", "compact")
    assert r.exit_code == 0 and "resumed, 5 examples" in r.output, r.output


def test_a_partial_convert_to_the_other_codec_is_refused_naming_it(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert_cache(source, out, "compact")
    _edit(out, status="partial")

    line = one_error_line(invoke("convert", source, out, "--codec", "v1"))

    assert "--codec compact to resume" in line


# --- refusals -----------------------------------------------------------------------------


def _edit(cache: Path, **fields) -> None:
    data = json.loads((cache / "manifest.json").read_text())
    data.update(fields)
    (cache / "manifest.json").write_text(json.dumps(data))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_a_directory_that_is_no_cache_is_refused(tmp_path):
    (tmp_path / "nothing").mkdir()
    line = one_error_line(invoke("convert", tmp_path / "nothing", tmp_path / "out", "--codec", "v1"))
    assert "not a logitcache cache" in line
    assert_nothing_written(tmp_path / "out")


def test_a_partial_source_is_refused(source, tmp_path):
    src = copy(source, tmp_path)
    _edit(src, status="partial")
    line = one_error_line(invoke("convert", src, tmp_path / "out", "--codec", "v1"))
    assert "partial" in line and "rerunning its `logitcache teacher` command" in line
    assert_nothing_written(tmp_path / "out")


def test_a_directory_of_parts_is_refused_naming_merge(source, tmp_path):
    shutil.copytree(source, tmp_path / "run" / "part-00000-of-00002")
    line = one_error_line(invoke("convert", tmp_path / "run", tmp_path / "out", "--codec", "v1"))
    assert "logitcache merge" in line
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("where", [".", "inside"])
def test_an_out_that_is_or_is_inside_the_source_is_refused(source, tmp_path, where):
    src = copy(source, tmp_path)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    line = one_error_line(invoke("convert", src, src / where, "--codec", "v1"))
    assert "outside it" in line
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


def test_a_non_empty_unrelated_out_is_refused_touching_nothing(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = one_error_line(invoke("convert", source, out, "--codec", "v1"))
    assert "not empty" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_an_out_holding_another_cache_is_refused(source, compact, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(source, out)
    line = one_error_line(invoke("convert", compact, out, "--codec", "v1"))
    assert "a cache that convert did not write" in line


def test_an_unknown_codec_is_refused(source, tmp_path):
    line = one_error_line(invoke("convert", source, tmp_path / "out", "--codec", "zip"))
    assert "'zip'" in line and "v1" in line and "compact" in line
    assert_nothing_written(tmp_path / "out")


def test_a_damaged_source_shard_is_refused_naming_it(source, tmp_path):
    src = copy(source, tmp_path)
    shard = src / load_manifest(src).shards[1].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = one_error_line(invoke("convert", src, tmp_path / "out", "--codec", "compact"))
    assert load_manifest(src).shards[1].path in line and "sha256" in line and "logitcache verify" in line
    assert_nothing_written(tmp_path / "out")
