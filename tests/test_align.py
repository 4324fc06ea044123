"""Alignment of teacher positions to student positions, worked out by hand, and the featurizer."""

import numpy as np
import pytest

from logitcache.pipeline.student.align import align_by_offset, align_by_position, target_positions

# text = "ab cd": prompt "ab", response " cd" (prompt_chars = 2)
# teacher tokens: <s> | ab | " c" | d       student tokens: <s> | a | b | " " | cd
T_START, T_END = np.array([0, 0, 2, 4]), np.array([0, 2, 4, 5])
S_START, S_END = np.array([0, 0, 1, 2, 3]), np.array([0, 1, 2, 3, 5])


def test_targets_are_positions_whose_next_token_ends_in_the_response():
    # teacher position 1 predicts " c" (ends at 4), position 2 predicts "d"
    assert target_positions(T_START, T_END, 2).tolist() == [1, 2]
    # student position 2 predicts " ", position 3 predicts "cd"
    assert target_positions(S_START, S_END, 2).tolist() == [2, 3]
    # a limit cuts targets that end past it
    assert target_positions(T_START, T_END, 2, limit_chars=4).tolist() == [1]


def test_a_token_straddling_the_boundary_is_a_target():
    # prompt "a:" + response "\nb": the token ":\n" (1,3) covers the response's first character
    starts, ends = np.array([0, 0, 1, 3]), np.array([0, 1, 3, 4])  # <s> | a | ":\n" | b
    assert target_positions(starts, ends, 2).tolist() == [1, 2]
    # an empty span (a later byte piece) counts by where it sits
    starts, ends = np.array([0, 0, 2, 2]), np.array([0, 2, 2, 3])  # <s> | a: | (piece at 2) | b
    assert target_positions(starts, ends, 2).tolist() == [2]
    assert target_positions(starts, ends, 1).tolist() == [0, 1, 2]


def test_position_alignment_pairs_responses_index_by_index():
    al = align_by_position(np.array([1, 2]), np.array([2, 3]), n_student_positions=4)
    assert al.teacher_pos.tolist() == [-1, -1, 1, 2]
    assert (al.targets, al.matched) == (2, 2)


def test_position_alignment_stops_at_the_shorter_response():
    al = align_by_position(np.array([5]), np.array([0, 1, 2]), n_student_positions=3)
    assert al.teacher_pos.tolist() == [5, -1, -1] and al.fraction_matched == pytest.approx(1 / 3)


def test_offset_alignment_pairs_only_identical_spans():
    # student " " (2,3) and "cd" (3,5) vs teacher " c" (2,4) and "d" (4,5): nothing is identical
    al = align_by_offset(T_START, T_END, np.array([1, 2]), S_START, S_END, np.array([2, 3]), 4)
    assert al.teacher_pos.tolist() == [-1, -1, -1, -1] and al.matched == 0
    # a student that also has "d" (4,5) as its own token predicts it at the position before
    s_start, s_end = np.array([0, 0, 2, 4]), np.array([0, 2, 4, 5])
    al = align_by_offset(T_START, T_END, np.array([1, 2]), s_start, s_end, np.array([1, 2]), 3)
    assert al.teacher_pos.tolist() == [-1, 1, 2] and al.fraction_matched == 1.0


def test_offset_alignment_matches_split_characters_piece_by_piece():
    # "é" split into two byte pieces by both: first piece owns (0,1), second is empty at 1
    t_start, t_end = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2])  # <s> é1 é2 x
    s_start, s_end = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2])
    targets = np.array([0, 1, 2])
    al = align_by_offset(t_start, t_end, targets, s_start, s_end, targets, 3)
    assert al.teacher_pos.tolist() == [0, 1, 2]
    # a student with "é" as one token has no second piece: its "x" still finds the teacher's "x"
    s_start, s_end = np.array([0, 0, 1]), np.array([0, 1, 2])
    al = align_by_offset(t_start, t_end, targets, s_start, s_end, np.array([0, 1]), 2)
    assert al.teacher_pos.tolist() == [0, 2]


def test_empty_special_spans_never_match_real_tokens():
    # the student's dummy prefix '▁' at (0,0) is a target in text mode but has no text to match
    t_start, t_end = np.array([0, 0]), np.array([0, 2])
    s_start, s_end = np.array([0, 0, 0]), np.array([0, 0, 2])
    al = align_by_offset(t_start, t_end, np.array([0]), s_start, s_end, np.array([0, 1]), 2)
    assert al.teacher_pos.tolist() == [-1, 0]


# --- the featurizer on a real cache ------------------------------------------------------------


@pytest.fixture(scope="module")
def unigram():
    from logitcache.pipeline.tiny import generate_corpus, train_unigram_tokenizer

    return train_unigram_tokenizer(generate_corpus(2000, 7), 400)


@pytest.fixture(scope="module")
def teacher_tok(built_cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built_cache / "tokenizer")


def _rows(cache_dir):
    from logitcache import open_cache

    return list(open_cache(cache_dir))


def test_same_tokenizer_offset_alignment_is_the_identity(built_cache, teacher_tok):
    from logitcache import open_cache
    from logitcache.pipeline.student.features import featurizer_for_cache

    f = featurizer_for_cache(open_cache(built_cache), teacher_tok, alignment="offset")
    for row in _rows(built_cache):
        ex = f(row)
        assert ex["input_ids"].tolist() == row["input_ids"].tolist()
        q = np.flatnonzero(ex["kd_mask"])
        np.testing.assert_array_equal(ex["teacher_ids"][q], row["topk_ids"][q])
        np.testing.assert_array_equal(ex["teacher_logprobs"][q], row["topk_logprobs"][q])
    assert f.stats.fraction_matched == 1.0 and f.stats.examples == 24


def test_labels_cover_the_response_only(built_cache, unigram):
    from logitcache.pipeline.student.features import StudentFeaturizer

    row = _rows(built_cache)[0]
    ex = StudentFeaturizer(unigram)(row)
    enc = unigram(row["text"], return_offsets_mapping=True)
    for j, (tid, lab) in enumerate(zip(ex["input_ids"], ex["labels"])):
        if j == len(enc["input_ids"]):  # the student's EOS, appended: a target
            assert tid == unigram.eos_token_id and lab == tid
            continue
        ends_in_response = j >= 1 and enc["offset_mapping"][j][1] > row["prompt_chars"]
        assert lab == (tid if ends_in_response else -100)
    # KD only where there is a CE target (the position before a response token)
    assert not (ex["kd_mask"][:-1] & (ex["labels"][1:] == -100)).any()


def test_cross_tokenizer_offset_pairs_have_identical_spans(built_cache, unigram):
    from logitcache.pipeline.offsets import encode_with_offsets
    from logitcache.pipeline.student.features import StudentFeaturizer

    f = StudentFeaturizer(unigram, alignment="offset")
    checked = 0
    for row in _rows(built_cache):
        ex = f(row)
        _, s_start, s_end = encode_with_offsets(unigram, row["text"])
        for q in np.flatnonzero(ex["kd_mask"]):
            p = np.flatnonzero((row["topk_ids"] == ex["teacher_ids"][q]).all(axis=1))
            assert any(
                (row["char_start"][pp + 1], row["char_end"][pp + 1]) == (s_start[q + 1], s_end[q + 1]) for pp in p
            )
            checked += 1
    assert checked > 20 and 0 < f.stats.fraction_matched < 1


def test_truncation_cuts_both_sides_and_is_counted(built_cache, unigram):
    from logitcache.pipeline.student.features import StudentFeaturizer

    f = StudentFeaturizer(unigram, alignment="position", max_length=16)
    for row in _rows(built_cache):
        ex = f(row)
        assert len(ex["input_ids"]) <= 16
    assert f.stats.truncated > 0
    # with position alignment no teacher position beyond the student's cut is used
    row = max(_rows(built_cache), key=lambda r: len(r["text"]))
    ex = StudentFeaturizer(unigram, alignment="position", max_length=16)(row)
    enc = unigram(row["text"], return_offsets_mapping=True)
    cut = enc["offset_mapping"][15][1]
    used = np.flatnonzero(ex["kd_mask"])
    for q in used:
        p = np.flatnonzero((row["topk_ids"] == ex["teacher_ids"][q]).all(axis=1))
        assert any(row["char_end"][pp + 1] <= cut for pp in p)


def test_example_with_no_aligned_position_is_counted_not_dropped(unigram):
    from logitcache.pipeline.student.features import StudentFeaturizer

    # the teacher covers the text with one token "abc"; the student splits it: nothing aligns by span
    row = {
        "id": "x", "text": "abc", "prompt_chars": 0, "truncated": False,
        "input_ids": np.array([1, 9], np.int32), "char_start": np.array([0, 0], np.int32),
        "char_end": np.array([0, 3], np.int32), "topk_ids": np.array([[9, 3]], np.int32),
        "topk_logprobs": np.array([[-0.1, -3.0]], np.float16), "label_logprob": np.array([-0.1], np.float32),
        "logsumexp": np.array([0.0], np.float32),
    }
    f = StudentFeaturizer(unigram, alignment="offset")
    ex = f(row)
    assert not ex["kd_mask"].any() and (ex["labels"] != -100).any()  # CE still applies
    assert f.stats.no_kd == 1


def test_slow_student_tokenizer_is_refused():
    from logitcache import LogitCacheError
    from logitcache.pipeline.student.features import StudentFeaturizer

    class Slow:
        is_fast = False
        name_or_path = "slow-student"

    with pytest.raises(LogitCacheError, match="fast"):
        StudentFeaturizer(Slow())


def test_collator_pads_to_batch_tensors(built_cache, unigram):
    import torch

    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.features import StudentFeaturizer

    f = StudentFeaturizer(unigram)
    examples = [f(r) for r in _rows(built_cache)[:3]]
    batch = KDCollator(pad_token_id=0)(examples)
    B, T = 3, max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (B, T) and batch["teacher_logprobs"].shape == (B, T, 8)
    assert batch["teacher_logprobs"].dtype == torch.float32 and batch["kd_mask"].dtype == torch.bool
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["attention_mask"][i].sum() == n
        assert (batch["labels"][i, n:] == -100).all() and not batch["kd_mask"][i, n:].any()
