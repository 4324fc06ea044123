"""Issue 15 §1: target spans. Cache format v2 carries [start, end) character ranges of `text` that
are targets; v1 caches read as one span; stage 1 takes them as data (`--target-field`); stage 2
learns only inside them, for every loss and both alignments."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.errors import LogitCacheError
from logitcache.pipeline.offsets import encode_with_offsets
from logitcache.pipeline.student.align import align_by_position, target_positions, target_span_index
from logitcache.pipeline.student.features import StudentFeaturizer
from logitcache.storage import open_cache
from logitcache.storage.codec import decode_compact, encode_compact
from logitcache.storage.convert import convert_cache
from logitcache.storage.manifest import load_manifest
from logitcache.storage.merge import merge_caches
from logitcache.storage.rows import batch_to_rows, rows_to_table
from logitcache.storage.verify import verify_cache
from logitcache.storage.writer import CacheWriter

runner = CliRunner()
K = 8


def _spans(row) -> list[list[int]]:
    return np.asarray(row["target_spans"]).tolist()


def _write_cache(out: Path, source: Path, rows, *, format_version: int = 2, worker=None, codec: str = "v1") -> Path:
    """A complete cache of ``rows`` with ``source``'s settings, in ``format_version``."""
    m = load_manifest(source)
    m = dataclasses.replace(m, format_version=format_version, shards=[], skipped={}, status="partial",
                            worker=worker, codec=codec)
    with CacheWriter(out, m, tokenizer_dir=source / "tokenizer") as w:
        for row in rows:
            w.write(row)
        w.mark_complete()
    return out


def _v1_rows(cache: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "target_spans"} for row in open_cache(cache)]


def _multi_span_rows(cache: Path) -> list[dict]:
    """The cache's rows with two spans each (the first fifth of the text after the start, and the end)."""
    out = []
    for row in open_cache(cache):
        n = len(row["text"])
        spans = [[n // 5, 2 * n // 5], [3 * n // 5, n]] if n >= 5 else [[0, n]]
        out.append({**row, "target_spans": np.asarray(spans, np.int32)})
    return out


# --- format ------------------------------------------------------------------------------------


def test_new_caches_are_format_v2_with_span_columns(built_cache):
    import pyarrow.parquet as pq

    m = load_manifest(built_cache)
    names = pq.ParquetFile(built_cache / m.shards[0].path).schema_arrow.names
    assert m.format_version == 2 and {"target_start", "target_end", "prompt_chars"} <= set(names)
    for row in open_cache(built_cache):
        assert _spans(row) == [[row["prompt_chars"], len(row["text"])]]


def test_v1_cache_rows_read_as_one_span(tmp_path, built_cache):
    rows = _v1_rows(built_cache)
    rows[0] = {**rows[0], "prompt_chars": len(rows[0]["text"])}  # a response cut away: no span
    v1 = _write_cache(tmp_path / "v1", built_cache, rows, format_version=1)
    assert load_manifest(v1).format_version == 1 and verify_cache(v1).ok
    got = list(open_cache(v1))
    assert _spans(got[0]) == []
    for row in got[1:]:
        assert _spans(row) == [[row["prompt_chars"], len(row["text"])]]
    # only some columns: the spans come with prompt_chars
    (first, *_) = open_cache(v1).iter_rows(columns=["id", "target_spans"])
    assert _spans(first) == []


def test_a_v1_cache_refuses_rows_of_several_spans(tmp_path, built_cache):
    with pytest.raises(ValueError, match="several target spans"):
        _write_cache(tmp_path / "v1", built_cache, _multi_span_rows(built_cache)[:2], format_version=1)


def test_v2_rows_round_trip_through_both_codecs(built_cache):
    rows = _multi_span_rows(built_cache)[:4]
    rows[1] = {**rows[1], "target_spans": np.zeros((0, 2), np.int32)}
    (batch,) = rows_to_table(rows, K, 1, False, True).to_batches()
    compact = encode_compact(rows, K, n_temperatures=1, word_start=True)
    for decoded in (list(batch_to_rows(batch)), list(decode_compact(compact))):
        for a, b in zip(rows, decoded):
            assert _spans(b) == _spans(a)
            assert b["prompt_chars"] == (_spans(a)[0][0] if _spans(a) else len(a["text"]))


def test_a_multi_span_cache_reads_verifies_and_converts(tmp_path, built_cache):
    rows = _multi_span_rows(built_cache)
    v2 = _write_cache(tmp_path / "v2", built_cache, rows)
    assert verify_cache(v2).ok
    assert [_spans(r) for r in open_cache(v2)] == [_spans(r) for r in rows]
    for codec in ("compact", "v1"):
        out = tmp_path / f"to-{codec}"
        convert_cache(v2, out, codec)
        assert [_spans(r) for r in open_cache(out)] == [_spans(r) for r in rows]


def test_convert_writes_a_v1_cache_as_v2_with_one_span_each(tmp_path, built_cache):
    v1 = _write_cache(tmp_path / "v1", built_cache, _v1_rows(built_cache), format_version=1)
    out = tmp_path / "out"
    convert_cache(v1, out, "compact")
    assert load_manifest(out).format_version == 2
    assert [_spans(r) for r in open_cache(out)] == [_spans(r) for r in open_cache(v1)]


@pytest.mark.parametrize("spans, problem", [
    ([[5, 3]], "ends before it starts"),
    ([[4, 8], [6, 9]], "overlap or are not sorted"),
    ([[6, 9], [0, 2]], "overlap or are not sorted"),
    ([[0, 10_000]], "outside the text"),
])
def test_verify_names_the_shard_and_id_of_bad_spans(tmp_path, built_cache, spans, problem):
    rows = _multi_span_rows(built_cache)
    bad_id = rows[3]["id"]
    rows[3] = {**rows[3], "target_spans": np.asarray(spans, np.int32)}
    cache = _write_cache(tmp_path / "bad", built_cache, rows)
    report = verify_cache(cache)
    lines = [p for p in report.problems if "target spans" in p]
    assert len(lines) == 1 and problem in lines[0] and repr(bad_id) in lines[0] and "data/" in lines[0], report.problems


def test_merge_refuses_parts_of_two_format_versions(tmp_path, built_cache):
    rows = _v1_rows(built_cache)
    a = _write_cache(tmp_path / "part-0", built_cache, rows[::2], format_version=1, worker={"index": 0, "count": 2})
    b = _write_cache(tmp_path / "part-1", built_cache, rows[1::2], worker={"index": 1, "count": 2})
    with pytest.raises(LogitCacheError, match=r"mix cache format versions \[1, 2\].*logitcache convert"):
        merge_caches(tmp_path / "merged", [a, b])


def test_merge_joins_multi_span_parts(tmp_path, built_cache):
    rows = _multi_span_rows(built_cache)
    a = _write_cache(tmp_path / "part-0", built_cache, rows[::2], worker={"index": 0, "count": 2})
    b = _write_cache(tmp_path / "part-1", built_cache, rows[1::2], worker={"index": 1, "count": 2})
    merge_caches(tmp_path / "merged", [a, b])
    got = {r["id"]: _spans(r) for r in open_cache(tmp_path / "merged")}
    assert got == {r["id"]: _spans(r) for r in rows}


# --- stage 1: --target-field --------------------------------------------------------------------


def _records(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "spans.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _teacher(teacher_dir, data, out, *extra):
    args = ["teacher", "--model", teacher_dir, "--data", data, "--out", out, "--top-k", K, "--text-field", "text",
            "--target-field", "spans", "--no-progress", *extra]
    return runner.invoke(app, [str(a) for a in args])


TEXT = "User: hi there. Bot: hello! User: how are you? Bot: fine, thanks."


def test_target_field_spans_reach_the_cache(tmp_path, teacher_dir):
    data = _records(tmp_path, [
        {"id": "a", "text": TEXT, "spans": [[16, 21], [21, 27], [47, 51], [51, 65], [65, 65]]},  # touching: joined
        {"id": "b", "text": TEXT, "spans": []},
        {"id": "c", "text": TEXT, "spans": [[3, 3]]},
    ])
    r = _teacher(teacher_dir, data, tmp_path / "c")
    assert r.exit_code == 0, r.output
    rows = {row["id"]: row for row in open_cache(tmp_path / "c")}
    assert _spans(rows["a"]) == [[16, 27], [47, 65]] and rows["a"]["prompt_chars"] == 16
    m = load_manifest(tmp_path / "c")
    assert m.skipped == {"b": "no target", "c": "no target"}
    assert m.template["target_field"] == "spans"
    assert verify_cache(tmp_path / "c").ok


def test_max_length_cuts_spans_to_the_kept_text(tmp_path, teacher_dir):
    data = _records(tmp_path, [
        {"id": "a", "text": TEXT, "spans": [[0, 4], [16, 27], [47, 65]]},
        {"id": "late", "text": TEXT, "spans": [[60, 65]]},
    ])
    r = _teacher(teacher_dir, data, tmp_path / "c", "--max-length", 12)
    assert r.exit_code == 0, r.output
    (row,) = list(open_cache(tmp_path / "c"))
    n = len(row["text"])
    assert row["truncated"] and n < 47
    assert _spans(row) == [s for s in ([0, 4], [16, min(27, n)]) if s[0] < n]
    assert load_manifest(tmp_path / "c").skipped == {"late": "no target"}


@pytest.mark.parametrize("spans, needle", [
    ("oops", "must hold a list of [start, end] pairs"),
    ([[1, 2, 3]], "must hold a list of [start, end] pairs"),
    ([[1.5, 2]], "must hold a list of [start, end] pairs"),
    ([[0, 999]], "is not within the text"),
    ([[5, 2]], "is not within the text"),
    ([[10, 20], [15, 30]], "starts before the previous one ends"),
    ([[30, 40], [0, 5]], "starts before the previous one ends"),
])
def test_bad_target_fields_are_refused_in_one_line(tmp_path, teacher_dir, spans, needle):
    data = _records(tmp_path, [{"id": "a", "text": TEXT, "spans": [[0, 5]]}, {"id": "b", "text": TEXT, "spans": spans}])
    r = _teacher(teacher_dir, data, tmp_path / "c")
    assert r.exit_code != 0
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "record 2" in errors[0] and needle in errors[0], r.output


def test_target_field_goes_with_text_field_only(tmp_path, teacher_dir, data_file):
    args = ["teacher", "--model", teacher_dir, "--data", data_file, "--out", tmp_path / "c", "--prompt-field", "prompt",
            "--response-field", "response", "--target-field", "spans", "--no-progress"]
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code != 0 and "--target-field goes with --text-field" in r.output


def test_resume_checks_the_target_field(tmp_path, teacher_dir):
    data = _records(tmp_path, [{"id": "a", "text": TEXT, "spans": [[0, 5]], "other": [[6, 9]]}])
    assert _teacher(teacher_dir, data, tmp_path / "c", "--limit", 0).exit_code == 0
    args = ["teacher", "--model", teacher_dir, "--data", data, "--out", tmp_path / "c", "--top-k", K, "--text-field",
            "text", "--target-field", "other", "--no-progress"]
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code != 0 and "other settings" in r.output and "template" in r.output


# --- stage 2: which positions are targets, and how they pair ------------------------------------

# Hand-worked: a text of 10 characters with target spans [2, 5) and [7, 10), cut two ways.
#   teacher tokens  [0,2) [2,4) [4,6) [6,7) [7,10)
#   student tokens  [0,1) [1,3) [3,5) [5,8) [8,9) [9,10)
T_START, T_END = np.array([0, 2, 4, 6, 7]), np.array([2, 4, 6, 7, 10])
S_START, S_END = np.array([0, 1, 3, 5, 8, 9]), np.array([1, 3, 5, 8, 9, 10])
SPANS = np.array([[2, 5], [7, 10]])


def test_targets_are_tokens_overlapping_a_span():
    # teacher: [2,4) and [4,6) overlap span 0; [6,7) lies in the gap; [7,10) is span 1
    assert target_positions(T_START, T_END, SPANS).tolist() == [0, 1, 3]
    assert target_span_index(T_START, T_END, np.array([0, 1, 3]), SPANS).tolist() == [0, 0, 1]
    # student: [5,8) straddles the gap into span 1 and belongs to it
    assert target_positions(S_START, S_END, SPANS).tolist() == [0, 1, 2, 3, 4]
    assert target_span_index(S_START, S_END, np.arange(5), SPANS).tolist() == [0, 0, 1, 1, 1]


def test_empty_tokens_count_inside_a_span_up_to_its_end():
    # tokens [0,2) [2,5) [5,5) [5,7) [7,7) [7,10): positions 0..4 predict the last five
    starts, ends = np.array([0, 2, 5, 5, 7, 7]), np.array([2, 5, 5, 7, 7, 10])
    # the empty token at 5 sits at span 0's end (a piece of its last character): a target;
    # the empty token at 7 sits at span 1's start: not one (it is a piece of the gap's last character)
    assert target_positions(starts, ends, SPANS).tolist() == [0, 1, 4]


def test_position_alignment_restarts_in_every_span():
    t_tg, s_tg = target_positions(T_START, T_END, SPANS), target_positions(S_START, S_END, SPANS)
    kw = dict(teacher_target_ends=T_END[t_tg + 1], student_target_ends=S_END[s_tg + 1])
    al = align_by_position(t_tg, s_tg, 5, **kw, teacher_target_spans=target_span_index(T_START, T_END, t_tg, SPANS),
                           student_target_spans=target_span_index(S_START, S_END, s_tg, SPANS))
    # span 0: no common end, index by index; span 1: both end a token at 10, counted back from there
    assert al.teacher_pos.tolist() == [0, 1, -1, -1, 3] and al.matched == 3
    # without the restart the first common end (10) would drag span 0's pairs along
    assert align_by_position(t_tg, s_tg, 5, **kw).teacher_pos.tolist() == [-1, -1, 0, 1, 3]


def test_an_int_is_the_v1_rule():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_chars = int(rng.integers(1, 40))
        cuts = np.unique(np.concatenate([[0, n_chars], rng.integers(0, n_chars + 1, size=rng.integers(0, 12))]))
        starts, ends = cuts[:-1], cuts[1:]
        dup = rng.integers(0, len(starts), size=rng.integers(0, 3))  # empty pieces at a token's end
        starts = np.sort(np.concatenate([starts, ends[dup]]))
        ends = np.sort(np.concatenate([ends, ends[dup]]))
        pc = int(rng.integers(0, n_chars + 1))
        old = np.flatnonzero(ends[1:] > pc)
        assert target_positions(starts, ends, pc).tolist() == old.tolist()
        assert target_positions(starts, ends, np.array([[pc, n_chars]])).tolist() == old.tolist()


@pytest.fixture(scope="module")
def two_tokenizers():
    from logitcache.pipeline.tiny import generate_corpus, train_bpe_tokenizer, train_unigram_tokenizer

    corpus = generate_corpus(600, 0)
    return train_bpe_tokenizer(corpus, 400), train_unigram_tokenizer(corpus, 300)


def _row(tok, text, spans, *, k=2):
    ids, starts, ends = encode_with_offsets(tok, text)
    ids, starts, ends = ids + [tok.eos_token_id], np.append(starts, len(text)), np.append(ends, len(text))
    n = len(ids)
    topk = np.zeros((n - 1, k), dtype=np.int32)
    topk[:, 0] = np.arange(n - 1)
    row = {"id": "x", "text": text, "truncated": False, "input_ids": np.asarray(ids, np.int32),
           "char_start": starts.astype(np.int32), "char_end": ends.astype(np.int32),
           "topk_ids": topk, "topk_logprobs": np.zeros((n - 1, k), np.float16),
           "label_logprob": np.zeros(n - 1, np.float32), "logsumexp": np.zeros(n - 1, np.float32)}
    if isinstance(spans, int):
        return {**row, "prompt_chars": spans}
    return {**row, "prompt_chars": spans[0][0] if spans else len(text), "target_spans": np.asarray(spans, np.int32)}


CHAT = "<user> what is two plus two?\n<bot> it is four.\n<user> and three?\n<bot> three plus two is five."


@pytest.mark.parametrize("alignment", ["position", "offset", "chunk"])
def test_three_spans_learn_only_inside_them(two_tokenizers, alignment):
    teacher, student = two_tokenizers
    a1, a2 = CHAT.index("it is"), CHAT.index("three plus")
    spans = [[a1, CHAT.index("\n<user> and")], [CHAT.index("three?"), CHAT.index("three?") + 6], [a2, len(CHAT)]]
    row = _row(teacher, CHAT, spans)
    f = StudentFeaturizer(student, alignment=alignment, teacher_eos_id=teacher.eos_token_id)
    ex = f(row)
    _, s_start, s_end = encode_with_offsets(student, CHAT)
    s_start, s_end = np.append(s_start, len(CHAT)), np.append(s_end, len(CHAT))
    sp = np.asarray(spans)
    for q in np.flatnonzero(ex["labels"][1:] != -100):  # a labelled token overlaps a span (or is the end)
        a, b = s_start[q + 1], s_end[q + 1]
        assert q + 1 == len(ex["input_ids"]) - 1 or ((a < sp[:, 1]) & (b > sp[:, 0])).any()
    assert ex["labels"][-1] != -100, "the last span reaches the end: the EOS is a target"
    assert ex["kd_mask"].any()
    pairs = [(q, int(ex["teacher_ids"][q, 0])) for q in np.flatnonzero(ex["kd_mask"])]
    t_sp = dict(zip(target_positions(row["char_start"][:-1], row["char_end"][:-1], sp).tolist(),
                    target_span_index(row["char_start"], row["char_end"],
                                      target_positions(row["char_start"][:-1], row["char_end"][:-1], sp), sp).tolist()))
    s_tg = target_positions(s_start[:-1], s_end[:-1], sp)
    s_sp = dict(zip(s_tg.tolist(), target_span_index(s_start, s_end, s_tg, sp).tolist()))
    for q, p in pairs[:-1]:  # the last pair is the ends
        assert s_sp[q] == t_sp[p], "KD pairs a student target with a teacher target of another span"
    if alignment == "chunk":
        chunk = ex["alm_chunk"]
        for c in np.unique(chunk[chunk >= 0])[:-1]:  # the last chunk is the ends
            assert len({s_sp[q] for q in np.flatnonzero(chunk == c)}) == 1, "a chunk crosses two spans"


def test_the_end_is_no_target_when_the_last_span_stops_before_it(two_tokenizers):
    teacher, student = two_tokenizers
    row = _row(teacher, CHAT, [[CHAT.index("it is"), CHAT.index("\n<user> and")]])
    ex = StudentFeaturizer(student, alignment="offset", teacher_eos_id=teacher.eos_token_id)(row)
    assert ex["labels"][-1] == -100 and not ex["kd_mask"][-2]


@pytest.mark.parametrize("alignment", ["position", "offset", "chunk"])
def test_one_span_to_the_end_is_exactly_the_v1_rule(two_tokenizers, alignment):
    teacher, student = two_tokenizers
    for pc in (0, 5, CHAT.index("<bot>"), CHAT.index("it is") + 1, len(CHAT) - 3):
        kw = dict(alignment=alignment, teacher_eos_id=teacher.eos_token_id)
        old = StudentFeaturizer(student, **kw)(_row(teacher, CHAT, pc))
        new = StudentFeaturizer(student, **kw)(_row(teacher, CHAT, [[pc, len(CHAT)]]))
        assert old.keys() == new.keys()
        for key in old:
            if key != "id":
                np.testing.assert_array_equal(old[key], new[key], err_msg=f"{key} at prompt_chars {pc}")


# --- stage 2 end to end: a multi-span cache trains ------------------------------------------------


@pytest.fixture(scope="module")
def span_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import run_teacher
    from conftest import make_config

    tmp = tmp_path_factory.mktemp("spans")
    records = []
    for line in data_file.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        n = len(r["text"])
        r["spans"] = [[n // 6, n // 3], [n // 2, 2 * n // 3], [5 * n // 6, n]] if n >= 6 else [[0, n]]
        records.append(r)
    data = _records(tmp, records)
    out = tmp / "cache"
    run_teacher(make_config(teacher_dir, data, out, template=TextTemplate(text_field="text", target_field="spans")),
                progress=False)
    return out


@pytest.mark.parametrize("loss, which", [("uld", "other"), ("kl", "same"), ("alm", "other")])
def test_a_multi_span_cache_trains(tmp_path, span_cache, student, metaspace_student, loss, which):
    from logitcache.pipeline.student.train import TrainConfig, run_train

    assert max(len(r["target_spans"]) for r in open_cache(span_cache)) == 3
    cfg = TrainConfig(student=str(student if which == "same" else metaspace_student), cache=str(span_cache),
                      out=str(tmp_path / "run"), loss=loss, max_steps=2, batch_size=4, learning_rate=1e-3,
                      save_steps=2, logging_steps=1, progress=False, shuffle_buffer=8)
    r = run_train(cfg)
    assert r.global_step == 2 and torch.isfinite(torch.tensor(r.train_loss))


def test_eval_scores_only_the_target_spans(tmp_path, student):
    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.student.evaluate import EvalConfig, evaluate

    data = _records(tmp_path, [{"id": "a", "text": TEXT, "spans": [[16, 27], [47, 65]]}])
    whole = evaluate(EvalConfig(model=str(student), data=str(data), template=TextTemplate(text_field="text"), progress=False))
    spans = evaluate(EvalConfig(model=str(student), data=str(data),
                                template=TextTemplate(text_field="text", target_field="spans"), progress=False))
    assert 0 < spans.chars < whole.chars and 0 < spans.nll_nats < whole.nll_nats
