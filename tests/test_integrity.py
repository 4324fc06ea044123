"""storage.integrity.value_problems: the value checks verify and the training reader share."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from logitcache.storage.codec import encode_compact
from logitcache.storage.integrity import value_problems
from logitcache.storage.rows import rows_to_table

K = 4


def _row(rid: str, n: int = 5, extras: bool = False) -> dict:
    rng = np.random.default_rng(len(rid))
    lp = -np.sort(rng.uniform(0.1, 6.0, size=(n - 1, K)), axis=1).astype(np.float16)
    row = {
        "id": rid, "text": "x" * n, "prompt_chars": 0, "truncated": False,
        "input_ids": np.arange(n, dtype=np.int32), "char_start": np.arange(n, dtype=np.int32),
        "char_end": np.arange(1, n + 1, dtype=np.int32),
        "topk_ids": np.tile(np.arange(K, dtype=np.int32), (n - 1, 1)), "topk_logprobs": lp,
        "label_logprob": lp[:, 0].astype(np.float32), "logsumexp": np.full(n - 1, 3.0, np.float32),
    }
    if extras:
        row["lse_tau"] = np.full((n - 1, 1), 2.0, np.float32)
        for name in ("logit_mean", "logit_std", "lse_std"):
            row[name] = np.ones(n - 1, np.float32)
    return row


def _v1(rows: list[dict], extras: bool = False) -> pa.Table:
    return rows_to_table(rows, K, 1 if extras else 0, extras)


def test_clean_rows_have_no_problems_in_either_codec():
    rows = [_row("a"), _row("bb", n=1), _row("ccc", n=9)]
    assert value_problems(_v1(rows)) == []
    assert value_problems(encode_compact(rows, K)) == []
    assert value_problems(_v1([_row("a", extras=True)], extras=True)) == []


@pytest.mark.parametrize("value, words", [
    (np.nan, "NaN/inf top-k"), (np.inf, "NaN/inf top-k"), (-np.inf, "NaN/inf top-k"), (0.5, "above 0"),
])
def test_a_bad_top_k_value_is_named_with_its_example(value, words):
    rows = [_row("a"), _row("b")]
    rows[1]["topk_logprobs"][2, 3] = value
    (msg,) = [p for p in value_problems(_v1(rows)) if words in p]
    assert msg.startswith("1 positions") and "id 'b'" in msg


def test_an_unsorted_top_k_is_a_problem():
    rows = [_row("a")]
    rows[0]["topk_logprobs"][0] = rows[0]["topk_logprobs"][0][::-1]
    assert any("not sorted descending" in p and "'a'" in p for p in value_problems(_v1(rows)))


def test_rounding_above_zero_is_not_a_problem():
    rows = [_row("a")]
    rows[0]["topk_logprobs"][0, 0] = np.float16(6e-8)  # the smallest fp16 above 0
    rows[0]["label_logprob"][0] = 1e-6
    assert value_problems(_v1(rows)) == []


@pytest.mark.parametrize("column, value, words", [
    ("label_logprob", np.nan, "label log-prob that is not finite or above 0"),
    ("label_logprob", 0.25, "label log-prob that is not finite or above 0"),
    ("logsumexp", np.inf, "non-finite logsumexp"),
])
def test_bad_per_position_columns_are_problems_in_either_codec(column, value, words):
    rows = [_row("a"), _row("b")]
    rows[1][column][1] = value
    for table in (_v1(rows), encode_compact(rows, K)):
        assert any(words in p and "'b'" in p for p in value_problems(table)), value_problems(table)


@pytest.mark.parametrize("column", ["lse_tau", "logit_mean", "logit_std", "lse_std"])
def test_non_finite_optional_columns_are_problems(column):
    rows = [_row("a", extras=True)]
    rows[0][column][0] = np.nan
    assert any(f"non-finite {column}" in p for p in value_problems(_v1(rows, extras=True)))


@pytest.mark.parametrize("value, words", [(np.nan, "NaN/inf top-k"), (0.5, "above 0")])
def test_a_compact_shard_is_checked_on_its_stored_top1(value, words):
    table = encode_compact([_row("a"), _row("b")], K)
    i = table.schema.names.index("top1_logprob")
    col = table.column(i).combine_chunks()
    values = col.values.to_numpy().copy()
    values[-1] = value  # the last position of row 'b'
    bad = pa.ListArray.from_arrays(col.offsets, pa.array(values, pa.float32()))
    table = table.set_column(i, table.schema.field(i), bad)
    assert any(words in p and "'b'" in p for p in value_problems(table))


def test_a_log_prob_below_float16s_range_is_stored_finite_not_as_minus_inf():
    row = _row("a")
    lp = row["topk_logprobs"].astype(np.float32)
    lp[0, -1] = -1e6  # a probability of e^-1e6: 0 in any float, but not -inf
    row["topk_logprobs"] = lp
    assert value_problems(_v1([row])) == []


def test_a_text_far_longer_than_its_tokens_is_a_problem_before_anything_tokenizes_it():
    rows = [_row("a"), _row("huge")]
    rows[1]["text"] = "a" * (1 << 20)  # a hostile row: 1 MiB of text behind 5 tokens
    problems = value_problems(_v1(rows))
    assert any("text runs far past their last token" in p and "'huge'" in p for p in problems), problems
    rows[1]["text"] = "x" * 5 + " " * 1000  # a little uncovered trailing text is fine
    assert value_problems(_v1(rows)) == []


def test_a_negative_top_k_id_is_a_problem():
    rows = [_row("a"), _row("b")]
    rows[1]["topk_ids"] = rows[1]["topk_ids"].copy()
    rows[1]["topk_ids"][0, 2] = -7
    assert any("negative top-k id" in p and "'b'" in p for p in value_problems(_v1(rows)))


def test_a_compact_id_table_with_negative_ids_is_refused():
    import base64
    import zlib

    from logitcache.storage.codec import _decode_ids

    blob = base64.b64encode(zlib.compress(np.array([5, -9], "<i4").tobytes()))  # deltas: ids 5, -4
    with pytest.raises(ValueError, match="outside"):
        _decode_ids(blob)


def test_the_fast_float16_screen_finds_every_bad_row_the_exact_checks_find():
    from logitcache.storage.integrity import LOGPROB_TOL, _suspect_rows

    rng = np.random.default_rng(0)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.5, 1e-3, 1e-5, 6e-8, -0.0, 0.0, -65504, 65504], np.float16)
    for _ in range(200):
        lp = -np.sort(rng.uniform(0, 20, size=(50, 8)), axis=1).astype(np.float16)
        for _ in range(rng.integers(0, 4)):
            lp[rng.integers(50), rng.integers(8)] = rng.choice(specials)
        if rng.random() < 0.3:
            r = rng.integers(50)
            lp[r] = lp[r][::-1]
        x = lp.astype(np.float32)
        exact = ~np.isfinite(x).all(1) | (x > LOGPROB_TOL).any(1) | (x[:, 1:] > x[:, :-1]).any(1)
        suspect = _suspect_rows(lp)
        assert not (exact & ~suspect).any()  # nothing bad slips through the screen
