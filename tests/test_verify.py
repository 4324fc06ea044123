"""`verify_cache` and `logitcache verify`: a sound cache passes, every kind of damage is named.

Each test damages its own ``cache_copy`` in one way and checks that the report fails and
names the damaged file. The value-level tests rewrite a shard with bad numbers and then
re-record its size and sha256 in the manifest, so only the value checks can catch them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.storage import load_manifest, verify_cache
from logitcache.storage.fsutil import sha256_file
from logitcache.storage.rows import batch_to_rows, rows_to_table

SHARD = "data/shard-00001.parquet"  # the shard the tests damage (a middle one)


# --- helpers -----------------------------------------------------------------------------


def read_manifest_json(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text(encoding="utf-8"))


def write_manifest_json(cache: Path, data: dict) -> None:
    (cache / "manifest.json").write_text(json.dumps(data, indent=2), encoding="utf-8")


def problems_about(report, path: str) -> list[str]:
    return [p for p in report.problems if path in p]


def assert_fails_naming(report, path: str, *words: str) -> str:
    """The report fails, and one problem names ``path`` and contains every one of ``words``."""
    assert not report.ok, "the damage went unnoticed"
    assert report.summary().startswith("FAILED")
    hits = [p for p in problems_about(report, path) if all(w in p for w in words)]
    assert hits, f"no problem names {path} with {words}; problems: {report.problems}"
    return hits[0]


def read_rows(path: Path) -> list[dict]:
    """A shard's rows as writable numpy arrays (batch_to_rows gives read-only views)."""
    rows = [row for batch in pq.read_table(path).to_batches() for row in batch_to_rows(batch)]
    return [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in row.items()} for row in rows]


def rewrite_shard(cache: Path, rel: str, damage: Callable[[list[dict]], None]) -> None:
    """Rewrite shard ``rel`` after ``damage(rows)`` edits its rows in place, then record the
    new file's bytes and sha256 in manifest.json, so hashes and counts stay consistent."""
    m = load_manifest(cache)
    path = cache / rel
    rows = read_rows(path)
    damage(rows)
    pq.write_table(rows_to_table(rows, m.k, len(m.temperatures), m.logit_stats, m.word_start), path, compression="zstd")
    data = read_manifest_json(cache)
    (entry,) = [s for s in data["shards"] if s["path"] == rel]
    entry["bytes"] = path.stat().st_size
    entry["sha256"] = sha256_file(path)
    write_manifest_json(cache, data)


def first_row(rows: list[dict]) -> dict:
    row = rows[0]
    assert len(row["input_ids"]) >= 4, "the damage needs a row with a few positions"
    return row


# --- a sound cache -----------------------------------------------------------------------


def test_sound_cache_verifies_ok_with_the_manifest_counts(built_cache):
    m = load_manifest(built_cache)

    report = verify_cache(built_cache)

    assert report.ok, report.problems
    assert report.problems == []
    assert report.shards == len(m.shards)
    assert report.examples == m.num_examples == 24
    assert report.tokens == m.num_tokens
    assert report.bytes == m.num_bytes
    assert report.summary().startswith("OK")


def test_rewriting_a_shard_unchanged_keeps_the_cache_ok(cache_copy):
    """Control for the value-level tests below: the rewrite itself introduces no problem."""
    rewrite_shard(cache_copy, SHARD, lambda rows: None)

    report = verify_cache(cache_copy)

    assert report.ok, report.problems


def test_undamaged_copy_verifies_ok(cache_copy):
    assert verify_cache(cache_copy).ok


# --- file-level damage --------------------------------------------------------------------


def test_flipped_byte_in_a_shard_is_a_sha256_problem(cache_copy):
    path = cache_copy / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    report = verify_cache(cache_copy)

    assert_fails_naming(report, SHARD, "sha256")
    assert not any("bytes, the manifest says" in p for p in report.problems), "the size did not change"


def test_truncated_shard_is_a_size_problem(cache_copy):
    path = cache_copy / SHARD
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    report = verify_cache(cache_copy)

    msg = assert_fails_naming(report, SHARD, "bytes, the manifest says")
    assert str(len(data) // 2) in msg and str(len(data)) in msg


def test_deleted_shard_is_missing(cache_copy):
    (cache_copy / SHARD).unlink()

    report = verify_cache(cache_copy)

    assert_fails_naming(report, SHARD, "missing")


def test_unknown_parquet_file_in_data_is_not_listed(cache_copy):
    extra = cache_copy / "data" / "stray.parquet"
    extra.write_bytes((cache_copy / SHARD).read_bytes())

    report = verify_cache(cache_copy)

    assert_fails_naming(report, "data/stray.parquet", "not listed")


def test_manifest_row_count_that_disagrees_with_the_shard_is_named(cache_copy):
    data = read_manifest_json(cache_copy)
    (entry,) = [s for s in data["shards"] if s["path"] == SHARD]
    actual = entry["rows"]
    entry["rows"] = actual + 1
    write_manifest_json(cache_copy, data)

    report = verify_cache(cache_copy)

    msg = assert_fails_naming(report, SHARD, "manifest says")
    assert f"{actual} rows, the manifest says {actual + 1}" in msg


def test_altered_tokenizer_file_is_reported(cache_copy):
    tok = cache_copy / "tokenizer" / "tokenizer.json"
    assert tok.is_file()
    tok.write_text(tok.read_text(encoding="utf-8").replace("{", "{ ", 1), encoding="utf-8")

    report = verify_cache(cache_copy)

    assert_fails_naming(report, "tokenizer/tokenizer.json", "sha256")


# --- value-level damage (hashes kept consistent) -------------------------------------------


def test_topk_not_sorted_descending_is_reported(cache_copy):
    def damage(rows):
        row = first_row(rows)
        assert row["topk_logprobs"][0, 0] > row["topk_logprobs"][0, -1]
        # Reverse ids and log-probs together: each pair stays right, only the order is wrong.
        row["topk_logprobs"][0] = row["topk_logprobs"][0, ::-1].copy()
        row["topk_ids"][0] = row["topk_ids"][0, ::-1].copy()

    rewrite_shard(cache_copy, SHARD, damage)

    assert_fails_naming(verify_cache(cache_copy), SHARD, "not sorted descending")


def test_nan_logprob_is_reported(cache_copy):
    def damage(rows):
        first_row(rows)["topk_logprobs"][1, -1] = np.nan

    rewrite_shard(cache_copy, SHARD, damage)

    assert_fails_naming(verify_cache(cache_copy), SHARD, "NaN/inf")


def test_positive_logprob_is_reported(cache_copy):
    def damage(rows):
        first_row(rows)["topk_logprobs"][1, 0] = 0.5  # still sorted: 0.5 is the largest

    rewrite_shard(cache_copy, SHARD, damage)

    assert_fails_naming(verify_cache(cache_copy), SHARD, "log-probability above 0")


def test_topk_id_outside_the_vocabulary_is_reported(cache_copy):
    vocab = int(load_manifest(cache_copy).tokenizer["vocab_size"])

    def damage(rows):
        first_row(rows)["topk_ids"][1, -1] = vocab  # one past the last valid id

    rewrite_shard(cache_copy, SHARD, damage)

    assert_fails_naming(verify_cache(cache_copy), SHARD, "outside the vocabulary")


def test_label_logprob_disagreeing_with_its_topk_entry_is_reported(cache_copy):
    def damage(rows):
        row = first_row(rows)
        p = 1
        label_id = row["input_ids"][p + 1]
        hits = np.flatnonzero(row["topk_ids"][p] == label_id)
        if hits.size:  # the label is in the top-k already
            j = int(hits[0])
        else:  # put it there (in place of the k-th entry; no id repeats)
            j = row["topk_ids"].shape[1] - 1
            row["topk_ids"][p, j] = label_id
        # Label log-prob one nat below the top-k entry for the same token.
        row["label_logprob"][p] = np.float32(row["topk_logprobs"][p, j]) - 1.0

    rewrite_shard(cache_copy, SHARD, damage)

    assert_fails_naming(verify_cache(cache_copy), SHARD, "label log-prob disagrees")


def test_char_end_beyond_the_text_is_reported(cache_copy):
    def damage(rows):
        row = first_row(rows)
        row["char_end"][-1] = len(row["text"]) + 3

    rewrite_shard(cache_copy, SHARD, damage)

    assert_fails_naming(verify_cache(cache_copy), SHARD, "spans outside the text")


def test_overlapping_token_spans_are_reported(cache_copy):
    def damage(rows):
        row = first_row(rows)
        t = len(row["input_ids"]) - 1
        assert row["char_end"][t - 1] > row["char_start"][t - 1], "needs a non-empty previous span"
        # Token t starts where token t-1 starts: the two spans overlap.
        row["char_start"][t] = row["char_start"][t - 1]

    rewrite_shard(cache_copy, SHARD, damage)

    assert_fails_naming(verify_cache(cache_copy), SHARD, "out of order")


def test_duplicate_example_id_across_shards_is_reported(cache_copy):
    first_shard = load_manifest(cache_copy).shards[0].path
    taken = pq.read_table(cache_copy / first_shard, columns=["id"]).column("id")[0].as_py()

    def damage(rows):
        rows[0]["id"] = taken

    rewrite_shard(cache_copy, SHARD, damage)

    report = verify_cache(cache_copy)

    assert_fails_naming(report, SHARD, repr(taken), "more than once")
    assert not problems_about(report, first_shard), "the first occurrence is not the damage"


# --- the CLI --------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_verify_sound_cache_prints_one_ok_line_and_exits_0(built_cache):
    result = runner.invoke(app, ["verify", str(built_cache)])

    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("OK"), result.output
    assert "24 examples" in lines[0]


def test_cli_verify_damaged_cache_exits_nonzero_naming_the_shard(cache_copy):
    (cache_copy / SHARD).unlink()

    result = runner.invoke(app, ["verify", str(cache_copy)])

    assert result.exit_code != 0
    assert result.output.startswith("FAILED"), result.output
    assert SHARD in result.output and "missing" in result.output
    assert "Traceback" not in result.output


def test_cli_verify_value_damage_exits_nonzero_naming_the_shard(cache_copy):
    def damage(rows):
        first_row(rows)["topk_logprobs"][1, -1] = np.nan

    rewrite_shard(cache_copy, SHARD, damage)

    result = runner.invoke(app, ["verify", str(cache_copy)])

    assert result.exit_code != 0
    assert SHARD in result.output and "NaN" in result.output
    assert "Traceback" not in result.output


def test_cli_verify_fast_skips_value_checks(cache_copy):
    def damage(rows):
        first_row(rows)["topk_logprobs"][1, -1] = np.nan

    rewrite_shard(cache_copy, SHARD, damage)

    result = runner.invoke(app, ["verify", "--fast", str(cache_copy)])

    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK")


def test_cli_verify_on_a_directory_that_is_not_a_cache_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["verify", str(tmp_path)])

    assert result.exit_code == 2
    assert result.output.startswith("error:") and "manifest.json" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_cli_verify_of_an_unfinished_cache_says_partial_and_exits_3(tmp_path, teacher_dir, data_file):
    from conftest import make_config

    from logitcache.cli.cache import PARTIAL_EXIT
    from logitcache.pipeline.teacher.run import run_teacher

    out = tmp_path / "c"
    run_teacher(make_config(teacher_dir, data_file, out, limit=12), progress=False)  # 12 of the 24 records

    result = runner.invoke(app, ["verify", str(out)])

    assert result.exit_code == PARTIAL_EXIT == 3, result.output
    assert result.output.startswith("OK") and "partial: 12 of 24 records" in result.output


def test_a_workers_part_counts_only_its_share_of_the_records(tmp_path, teacher_dir, data_file):
    from conftest import make_config

    from logitcache.pipeline.teacher.run import run_teacher

    out = tmp_path / "parts"
    part = run_teacher(make_config(teacher_dir, data_file, out, num_workers=5, worker_index=1, limit=10),
                       progress=False).out
    assert verify_cache(part).partial == (2, 5)  # records 1 and 6 of 1, 6, 11, 16, 21


def test_logsumexp_must_be_zero_where_the_engine_gives_none(cache_copy):
    """The vllm engine cannot return the log-normaliser: it stores 0 and says so in the manifest."""
    import json

    manifest = cache_copy / "manifest.json"
    m = json.loads(manifest.read_text())
    m["teacher"]["logsumexp"] = False  # but the hf rows hold real normalisers
    manifest.write_text(json.dumps(m))
    report = verify_cache(cache_copy)
    assert not report.ok
    assert any("logsumexp although the manifest says the engine gives none" in p for p in report.problems)


def test_verify_of_a_cache_being_written_passes_the_shard_about_to_be_listed(tmp_path, teacher_dir, data_file):
    """The writer renames shard N into place, then lists it: a verify in between must not fail."""
    import shutil

    from conftest import make_config

    from logitcache.pipeline.teacher.run import run_teacher
    from logitcache.storage import load_manifest

    out = tmp_path / "c"
    run_teacher(make_config(teacher_dir, data_file, out, limit=12), progress=False)  # partial: 12 of 24
    m = load_manifest(out)
    assert m.status == "partial"
    next_shard = out / "data" / f"shard-{len(m.shards):05d}.parquet"
    shutil.copy(out / m.shards[0].path, next_shard)

    assert verify_cache(out).ok

    shutil.move(next_shard, out / "data" / f"shard-{len(m.shards) + 1:05d}.parquet")  # not the next one
    assert any("not listed in the manifest" in p for p in verify_cache(out).problems)


def test_a_teacher_with_a_padded_vocabulary_passes_its_own_verify(tmp_path, teacher_dir, data_file):
    """Ids of padded embedding rows (past the tokenizer) are legal: they are rows of the logits."""
    import shutil

    from conftest import make_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache.pipeline.teacher.run import run_teacher
    from logitcache.storage import load_manifest

    padded = tmp_path / "padded"
    shutil.copytree(teacher_dir, padded)
    tok = AutoTokenizer.from_pretrained(padded)
    model = AutoModelForCausalLM.from_pretrained(padded)
    model.resize_token_embeddings(len(tok) + 100, pad_to_multiple_of=64)
    model.save_pretrained(padded)
    width = model.get_output_embeddings().weight.shape[0]
    assert width > len(tok)

    out = tmp_path / "cache"
    run_teacher(make_config(padded, data_file, out, top_k=width, limit=4), progress=False)

    assert load_manifest(out).teacher["vocab_size"] == width
    report = verify_cache(out)
    assert report.ok, report.problems


def test_a_raised_vocab_size_in_the_manifest_does_not_raise_the_id_bound(cache_copy):
    from logitcache.storage.verify import id_bound
    from logitcache.storage import load_manifest

    data = json.loads((cache_copy / "manifest.json").read_text())
    size = data["tokenizer"]["vocab_size"]
    data["teacher"]["vocab_size"] = 2**31 - 1
    data["tokenizer"]["vocab_size"] = 2**31 - 1
    (cache_copy / "manifest.json").write_text(json.dumps(data))

    assert id_bound(cache_copy, load_manifest(cache_copy)) == size  # from tokenizer.json, not the manifest
