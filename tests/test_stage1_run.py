"""Stage 1 end to end: shards, atomic publication, resume, refusal to mix settings."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_config

from logitcache import LogitCacheError, open_cache, verify_cache
from logitcache.pipeline.teacher import run as run_mod
from logitcache.pipeline.teacher.run import run_teacher


def _content(cache_dir):
    """Everything a cache says about its examples, keyed by id (shard boundaries aside)."""
    out = {}
    for row in open_cache(cache_dir):
        out[row["id"]] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}
    return out


def _assert_same_content(a, b):
    """Same examples, ids, text, tokens, offsets and top-k ids exactly; the same numbers up to
    float rounding (a resumed run batches examples differently, which moves fp32 results by
    ~1e-7, and can flip an fp16 logprob by one unit in the last place)."""
    ca, cb = _content(a), _content(b)
    assert ca.keys() == cb.keys()
    for rid in ca:
        for key, va in ca[rid].items():
            vb = cb[rid][key]
            if key in ("topk_logprobs", "label_logprob", "logsumexp", "lse_tau", "logit_mean", "logit_std", "lse_std",
                       "word_start_logprob"):
                np.testing.assert_allclose(np.asarray(va, float), np.asarray(vb, float), rtol=1e-3, atol=1e-5, err_msg=f"{rid} {key}")
            else:
                assert va == vb, f"{rid} {key}"


def test_writes_bounded_shards_that_verify(built_cache):
    m = json.loads((built_cache / "manifest.json").read_text())
    assert len(m["shards"]) >= 3
    assert m["status"] == "complete" and m["k"] == 8
    for s in m["shards"]:
        # one row group past the bound at most: a shard is cut after the group that crossed it
        assert s["bytes"] < 6_000 * 4
        assert pq.ParquetFile(built_cache / s["path"]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert verify_cache(built_cache).ok
    assert not list((built_cache / "data").glob(".tmp-*"))


def test_manifest_records_settings_and_tokenizer(built_cache):
    m = json.loads((built_cache / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["mode"] == "score" and m["temperature"] == 1.0
    assert m["teacher"]["dtype"] == "float32" and m["teacher"]["vocab_size"] == 512
    assert m["tokenizer"]["vocab_size"] == 512 and len(m["tokenizer"]["sha256"]) == 64
    assert (built_cache / "tokenizer" / "tokenizer.json").is_file()
    assert m["template"]["prompt_field"] == "prompt" and m["dataset"]["fingerprint"]
    assert sum(s["rows"] for s in m["shards"]) == 24
    card = (built_cache / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "data/*.parquet" in card


def test_prompt_chars_mark_where_the_response_starts(built_cache, data_file):
    records = {json.loads(l)["id"]: json.loads(l) for l in data_file.read_text().splitlines()}
    for row in open_cache(built_cache):
        r = records[row["id"]]
        assert row["text"] == r["prompt"] + r["response"]
        assert row["prompt_chars"] == len(r["prompt"])


def test_rerun_of_a_complete_cache_writes_nothing(cache_copy, teacher_dir, data_file):
    before = _content(cache_copy)
    r = run_teacher(make_config(teacher_dir, data_file, cache_copy), progress=False)
    assert r.written == 0 and r.already_done == 24
    assert _content(cache_copy) == before


def test_limit_then_rerun_equals_uninterrupted_run(tmp_path, teacher_dir, data_file, built_cache):
    out = tmp_path / "c"
    first = run_teacher(make_config(teacher_dir, data_file, out, limit=10), progress=False)
    assert first.written == 10 and not first.complete
    assert json.loads((out / "manifest.json").read_text())["status"] == "partial"
    second = run_teacher(make_config(teacher_dir, data_file, out), progress=False)
    assert second.written == 14 and second.already_done == 10 and second.complete
    assert verify_cache(out).ok
    _assert_same_content(out, built_cache)


def test_crash_mid_run_keeps_finished_shards_and_resumes(tmp_path, teacher_dir, data_file, built_cache, monkeypatch):
    out = tmp_path / "c"
    real = run_mod._score_window
    calls = {"n": 0}

    def failing(engine, window, batch_size, k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash in the teacher")
        return real(engine, window, batch_size, k)

    monkeypatch.setattr(run_mod, "_SORT_WINDOW_BATCHES", 1)  # windows of 4 examples
    monkeypatch.setattr(run_mod, "_score_window", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_teacher(make_config(teacher_dir, data_file, out), progress=False)
    partial = open_cache(out)
    assert len(partial) == 4 and verify_cache(out).ok  # the first window survived, nothing half-written
    monkeypatch.setattr(run_mod, "_score_window", real)
    r = run_teacher(make_config(teacher_dir, data_file, out), progress=False)
    assert r.written == 20 and r.already_done == 4
    _assert_same_content(out, built_cache)


def test_leftover_temp_shard_from_a_killed_run_is_discarded(cache_copy, teacher_dir, data_file):
    junk = cache_copy / "data" / ".tmp-shard-00099.parquet"
    junk.write_bytes(b"half a shard")
    run_teacher(make_config(teacher_dir, data_file, cache_copy), progress=False)
    assert not junk.exists() and verify_cache(cache_copy).ok


@pytest.mark.parametrize(
    "override, setting",
    [
        ({"top_k": 4}, "k"),
        ({"max_length": 16}, "max_length"),
        ({"template": None}, "template"),
        ({"dtype": "bfloat16"}, "teacher"),
    ],
)
def test_rerun_with_other_settings_refuses(cache_copy, teacher_dir, data_file, override, setting):
    from logitcache.pipeline.records import TextTemplate

    if "template" in override:
        override = {"template": TextTemplate(text_field="text")}
    before = _content(cache_copy)
    with pytest.raises(LogitCacheError, match=rf"other settings \({setting}:"):
        run_teacher(make_config(teacher_dir, data_file, cache_copy, **override), progress=False)
    assert _content(cache_copy) == before


def test_rerun_with_other_data_refuses(cache_copy, teacher_dir, data_file, tmp_path):
    other = tmp_path / "other.jsonl"
    shutil.copy(data_file, other)
    with open(other, "a") as f:
        f.write(json.dumps({"id": "new", "prompt": "p", "response": "r", "text": "t", "messages": []}) + "\n")
    with pytest.raises(LogitCacheError, match="dataset"):
        run_teacher(make_config(teacher_dir, other, cache_copy), progress=False)


def test_rerun_with_another_model_refuses(cache_copy, gpt2_teacher_dir, data_file):
    with pytest.raises(LogitCacheError, match="teacher"):
        run_teacher(make_config(gpt2_teacher_dir, data_file, cache_copy), progress=False)


def test_long_examples_are_truncated_and_flagged(tmp_path, teacher_dir, data_file):
    out = tmp_path / "c"
    r = run_teacher(make_config(teacher_dir, data_file, out, max_length=12), progress=False)
    assert r.truncated > 0 and r.written == 24  # truncated, never dropped
    rows = list(open_cache(out))
    assert all(len(row["input_ids"]) <= 12 for row in rows)
    for row in rows:
        if row["truncated"]:
            # the text is cut to exactly what the kept tokens cover
            assert row["char_end"][-1] == len(row["text"])
    assert json.loads((out / "manifest.json").read_text())["shards"][0]["truncated"] >= 0
    assert open_cache(out).manifest.num_truncated == r.truncated


def test_empty_texts_are_skipped_and_counted(tmp_path, teacher_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": t}) for t in ["hello there", "", "   ", "general kenobi"]) + "\n"
    )
    out = tmp_path / "c"
    r = run_teacher(make_config(teacher_dir, data, out, template=_text()), progress=False)
    assert r.written == 2 and r.skipped == {"empty text": 2}
    assert len(open_cache(out).manifest.skipped) == 2
    again = run_teacher(make_config(teacher_dir, data, out, template=_text()), progress=False)
    assert again.written == 0 and again.skipped == {}


def _text():
    from logitcache.pipeline.records import TextTemplate

    return TextTemplate(text_field="text")


def test_chat_messages_use_the_chat_template(tmp_path, teacher_dir, data_file):
    from logitcache.pipeline.records import TextTemplate

    out = tmp_path / "c"
    run_teacher(make_config(teacher_dir, data_file, out, template=TextTemplate(messages_field="messages"), limit=4), progress=False)
    row = next(iter(open_cache(out)))
    assert row["text"].startswith("<s><|user|>\n")
    prompt = row["text"][: row["prompt_chars"]]
    assert prompt.endswith("<|assistant|>\n")
    # the chat text holds <s> already: the tokenizer must not add a second BOS
    assert row["input_ids"][0] == 1 and row["input_ids"][1] != 1


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_reads_parquet_csv_and_json_files(tmp_path, teacher_dir, data_file, fmt):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(data_file), split="train").remove_columns(["messages"])
    path = tmp_path / f"train.{fmt}"
    {"parquet": ds.to_parquet, "csv": ds.to_csv, "json": lambda p: ds.to_json(p, lines=False)}[fmt](str(path))
    out = tmp_path / "c"
    r = run_teacher(make_config(teacher_dir, path, out, limit=6), progress=False)
    assert r.written == 6
    first = json.loads(data_file.read_text().splitlines()[0])
    row = open_cache(out)[first["id"]]
    assert row["text"] == first["prompt"] + first["response"]


def test_a_resume_with_the_same_paths_spelled_otherwise_is_the_same_run(tmp_path, teacher_dir, data_file, monkeypatch):
    import os

    out = tmp_path / "c"
    monkeypatch.chdir(teacher_dir.parent)
    first = run_teacher(make_config(Path(teacher_dir.name), Path(os.path.relpath(data_file)), out, limit=8), progress=False)
    monkeypatch.chdir(tmp_path)

    again = run_teacher(make_config(teacher_dir, data_file, out), progress=False)  # absolute this time

    assert first.written == 8 and again.already_done == 8 and again.complete


@pytest.mark.parametrize("marker", ["", "not ours\n"])
def test_a_stray_init_marker_never_costs_the_users_files(tmp_path, teacher_dir, data_file, marker):
    out = tmp_path / "c"
    (out / "data").mkdir(parents=True)
    (out / ".init").write_text(marker)
    (out / "notes.txt").write_text("precious")
    (out / "data" / "x.csv").write_text("precious too")

    with pytest.raises(LogitCacheError, match=r"did not write.*notes.txt.*nothing was removed"):
        run_teacher(make_config(teacher_dir, data_file, out, limit=4), progress=False)

    assert (out / "notes.txt").read_text() == "precious" and (out / "data" / "x.csv").read_text() == "precious too"


def test_a_half_made_cache_is_cleared_only_of_what_its_creation_made(tmp_path, teacher_dir, data_file):
    out = tmp_path / "c"
    run_teacher(make_config(teacher_dir, data_file, out, limit=4), progress=False)
    (out / "manifest.json").unlink()  # as if killed before the manifest: the marker says what it made
    (out / ".init").write_text(json.dumps({"logitcache": ".init", "creates": ["data", "tokenizer", "README.md"]}))
    (out / "mine.txt").write_text("not the tool's")

    with pytest.raises(LogitCacheError, match=r"half made \(\.init\) and files logitcache did not create \(mine.txt\)"):
        run_teacher(make_config(teacher_dir, data_file, out, limit=4), progress=False)
    assert (out / "mine.txt").exists() and (out / "data").exists()

    (out / "mine.txt").unlink()
    result = run_teacher(make_config(teacher_dir, data_file, out, limit=4), progress=False)
    assert result.written == 4 and not (out / ".init").exists()


def test_an_empty_csv_cell_is_skipped_like_an_empty_json_string(tmp_path, teacher_dir):
    import csv

    records = [("Q1?", "A one."), ("Q2?", ""), ("", "A three."), ("Q4?", "A four.")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in records))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        csv.writer(f).writerows([("prompt", "response"), *records])

    results = {}
    for name in ("d.jsonl", "d.csv"):
        out = tmp_path / f"cache-{name}"
        r = run_teacher(make_config(teacher_dir, tmp_path / name, out), progress=False)
        results[name] = (r.written, r.skipped, sorted(row["text"] for row in open_cache(out).iter_rows()))

    assert results["d.csv"] == results["d.jsonl"]
    assert results["d.csv"][0] == 3 and results["d.csv"][1] == {"empty response": 1}
