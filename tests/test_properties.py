"""Properties of character spans and offset alignment over arbitrary Unicode (hypothesis).

Texts are built from pieces that trouble tokenizers: combining marks, zero-width (non-)joiners
and other invisible format characters, right-to-left letters and marks, emoji with skin tones,
ZWJ sequences and flags, control characters, CJK, very long words and runs of every kind of
whitespace, next to plain words and any other (non-surrogate) character.

The tokenizers, built once: the three tiny families of ``logitcache.pipeline.tiny``, byte-level
BPE (the teacher's), Unigram with Metaspace '▁' and BPE with Metaspace '▁' (the SentencePiece
styles of the students), and the real Mistral-7B v1 tokenizer (SentencePiece BPE with byte
fallback, shipped inside ``mistral_common``; skipped where that is not installed).

Properties (offsets.py and align.py promise them):

1. every span lies inside the text: 0 <= start <= end <= len(text);
2. spans tile the text: the first starts at 0, each starts where the previous one ended (so
   starts and ends are non-decreasing), and the last ends at len(text);
3. offset alignment pairs a student position only with a teacher position whose predicted
   token stands for the same bytes of the UTF-8 text (checked against a slow byte cursor over
   the pieces), both in the response; no teacher position is used twice;
4. it misses none: a student target whose bytes the teacher also predicts in the response is
   paired; so with one tokenizer on both sides every target pairs.

Runs are deterministic (``derandomize=True``, no example database): 150 examples per test,
about 15 s in all; set LOGITCACHE_PROPERTY_EXAMPLES for a deeper search.
"""

from __future__ import annotations

import importlib.util
import os
import string

import numpy as np
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from logitcache.pipeline.offsets import (
    METASPACE,
    byte_spans,
    char_byte_offsets,
    encode_with_offsets,
    piece_bytes_table,
)
from logitcache.pipeline.student.align import align_by_offset, target_positions
from logitcache.pipeline.student.features import StudentFeaturizer
from logitcache.pipeline.tiny import (
    generate_corpus,
    load_mistral_tokenizer,
    mistral_model_file,
    train_bpe_tokenizer,
    train_metaspace_bpe_tokenizer,
    train_unigram_tokenizer,
)

FAMILIES = ("bpe", "unigram", "metaspace_bpe", "mistral")
PAIRS = [("bpe", "unigram"), ("bpe", "metaspace_bpe"), ("unigram", "bpe"), ("metaspace_bpe", "unigram"),
         ("bpe", "mistral"), ("mistral", "bpe")]

# LOGITCACHE_PROPERTY_EXAMPLES=5000 for a deeper search (CI keeps the default).
CHECK = settings(
    max_examples=int(os.environ.get("LOGITCACHE_PROPERTY_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class _Tokenizers(dict):
    def __missing__(self, family):
        pytest.skip(f"the {family} tokenizer is not available here")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    corpus = generate_corpus(1000, 0)
    toks = _Tokenizers(
        bpe=train_bpe_tokenizer(corpus, 512),
        unigram=train_unigram_tokenizer(corpus, 400),
        metaspace_bpe=train_metaspace_bpe_tokenizer(corpus, 400),
    )
    # The real one: 32k SentencePiece BPE with byte fallback (needs mistral_common and sentencepiece).
    if mistral_model_file() is not None and importlib.util.find_spec("sentencepiece") is not None:
        toks["mistral"] = load_mistral_tokenizer(tmp_path_factory.mktemp("mistral"))
    return toks


# --- texts ----------------------------------------------------------------------------------


def _chars(lo: int, hi: int):
    return st.characters(min_codepoint=lo, max_codepoint=hi)


WORD = st.text(alphabet=string.ascii_letters + "éèüßøñ", min_size=1, max_size=12)
LONG_WORD = st.text(alphabet=string.ascii_lowercase, min_size=200, max_size=600)
COMBINING = st.tuples(st.sampled_from("aeiouny"), st.lists(_chars(0x300, 0x36F), min_size=1, max_size=4)).map(
    lambda t: t[0] + "".join(t[1])
)
INVISIBLE = st.sampled_from(["\u200d", "\u200c", "\u200b", "\u200e", "\u200f", "\u2060", "\ufeff", "\u00ad"])
RTL = st.one_of(_chars(0x5D0, 0x5EA), _chars(0x621, 0x64A), st.sampled_from(["\u200f", "\u202b", "\u202e", "\u202c"]))
EMOJI = st.one_of(
    st.sampled_from(["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🇯🇵", "🏳️‍🌈", "❤️", "1️⃣", "🧑🏿‍🚀", "👩‍❤️‍💋‍👨"]),
    _chars(0x1F300, 0x1FAFF),
)
CONTROL = st.one_of(_chars(0x00, 0x1F), st.just("\x7f"), _chars(0x80, 0x9F))
WHITESPACE = st.text(alphabet=" \t\n\r\u00a0\u3000\u2028\u2029\u0085\u000b\u000c\u2009", min_size=1, max_size=12)
CJK = st.text(alphabet=_chars(0x4E00, 0x9FFF) | _chars(0x3040, 0x30FF), min_size=1, max_size=6)
ANY = st.characters(exclude_categories=("Cs",))  # surrogates cannot be encoded

PIECE = st.one_of(WORD, WORD, WHITESPACE, LONG_WORD, COMBINING, INVISIBLE, RTL, EMOJI, CONTROL, CJK, ANY)
TEXT = st.lists(PIECE, max_size=25).map("".join)


# --- 1 and 2: spans ---------------------------------------------------------------------------


def assert_spans_tile(text: str, starts: np.ndarray, ends: np.ndarray) -> None:
    assert len(starts) == len(ends) > 0
    assert np.all(starts >= 0) and np.all(starts <= ends) and np.all(ends <= len(text)), "a span leaves the text"
    assert starts[0] == 0 and np.all(starts[1:] == ends[:-1]), "spans do not tile: a gap or an overlap"
    assert np.all(np.diff(starts) >= 0) and np.all(np.diff(ends) >= 0)
    assert ends[-1] == len(text), "characters at the end of the text belong to no token"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("add_special_tokens", [True, False], ids=["special", "plain"])
@CHECK
@given(text=TEXT)
@example(text="")
@example(text="\u200d\u0301 \U0001F468\u200d\U0001F469\u200d\U0001F467 \u05e9\u05dc\u05d5\u05dd\u200f\x00\x7f")
@example(text="\u3000\u3000x\u00a0\u00a0\t\n" + "a" * 500)
@example(text="\u2581")  # found by hypothesis: a literal '▁' lost its character (ends[-1] == 0)
@example(text=" \u2581")
def test_spans_lie_inside_the_text_and_tile_it(tokenizers, family, add_special_tokens, text):
    ids, starts, ends = encode_with_offsets(tokenizers[family], text, add_special_tokens=add_special_tokens)
    if not ids:  # no special tokens and nothing to encode
        assert text == ""
        return
    assert len(ids) == len(starts)
    assert_spans_tile(text, starts, ends)


# Byte-level BPE's printable stand-in character for each byte, inverted.
BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def _byte_piece(family: str, piece: str) -> bytes | None:
    """The bytes a byte-level piece stands for (byte-level BPE, SentencePiece byte fallback), else None."""
    if family == "bpe":
        return bytes(BYTE_OF[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return None


def _whole(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("family", FAMILIES)
@CHECK
@given(text=TEXT)
@example(text="\u2581")  # a literal '▁' once lost its span: taken for the dummy prefix
@example(text="a\u2581b \u2581")
@example(text="\nx")  # the dummy '▁' once took the '\n' from its token
@example(text="\u3000\u3000x\u00a0\u00a0\t\n")
def test_whole_character_tokens_get_their_surface_text(tokenizers, family, text):
    """A token that stands for whole characters spans exactly them; only the dummy prefix and the
    later pieces of a split character have empty spans. (Metaspace pieces write ' ' as '▁'.)"""
    tok = tokenizers[family]
    ids, starts, ends = encode_with_offsets(tok, text)
    special = set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(ids)
    marked = text.replace(" ", METASPACE)
    content = [i for i, t in enumerate(ids) if t not in special]  # <unk> is special: it has no surface
    for i in content:
        piece, span = pieces[i], text[starts[i] : ends[i]]
        raw_bytes = _byte_piece(family, piece)
        if raw_bytes is not None:
            if _whole(raw_bytes):
                assert span.encode("utf-8") == raw_bytes, (i, piece, span)
            continue  # a piece of a character: the first one carries it, the others are empty
        first = i == content[0]
        if starts[i] == ends[i]:
            assert first and piece == METASPACE, (i, piece, "a real token with an empty span")
        else:
            assert piece == marked[starts[i] : ends[i]] or (first and piece == METASPACE + marked[starts[i] : ends[i]]), (i, piece, span)


# --- 3 and 4: offset alignment ----------------------------------------------------------------


def _reference_bytes(tok, family: str, ids, starts, ends, text: str) -> list[tuple[int, int]] | None:
    """Slow, independent: each token's byte range, walking the tokens with a byte cursor (byte
    pieces stand for their bytes, other tokens for their span's characters, added tokens with
    no span and the dummy prefix for nothing). None where the tokens' bytes do not spell the
    text (an <unk>, a normaliser): no reference there."""
    special = set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(list(ids))
    cursor, out, spelled = 0, [], b""
    for t, piece, s, e in zip(ids, pieces, starts, ends):
        raw = None if int(t) in special else _byte_piece(family, piece)
        chunk = raw if raw is not None else text[s:e].encode("utf-8", "surrogatepass")
        out.append((cursor, cursor + len(chunk)))
        cursor += len(chunk)
        spelled += chunk
    return out if spelled == text.encode("utf-8", "surrogatepass") else None


def _teacher_row(tok, text: str, prompt_chars: int, k: int = 2) -> dict:
    """A cache row as stage 1 writes it, with teacher position p stored as top-k id p (to trace pairs)."""
    ids, starts, ends = encode_with_offsets(tok, text)
    n = len(ids)
    topk_ids = np.zeros((max(n - 1, 0), k), dtype=np.int32)
    topk_ids[:, 0] = np.arange(n - 1)
    return {
        "id": "x", "text": text, "prompt_chars": prompt_chars, "input_ids": np.asarray(ids, np.int32),
        "char_start": starts, "char_end": ends,
        "topk_ids": topk_ids, "topk_logprobs": np.zeros((max(n - 1, 0), k), dtype=np.float16),
    }


@st.composite
def texts_with_prompt(draw):
    text = draw(TEXT)
    return text, draw(st.integers(0, len(text)))


@pytest.mark.parametrize("teacher, student", PAIRS, ids=[f"{t}-to-{s}" for t, s in PAIRS])
@CHECK
@given(case=texts_with_prompt(), max_length=st.one_of(st.none(), st.integers(2, 40)))
@example(case=("Zoë 👍🏽 \u05e9\u05dc\u05d5\u05dd\u200f x\u0301\u0302 東京", 0), max_length=None)
@example(case=("prompt:\x00\u200d answer 🇫🇷🇯🇵 " + "b" * 300, 9), max_length=7)
@example(case=("\U0001F600\U0001F44D\U0001F3FD \u6771\u4eac x\u0301", 0), max_length=None)
def test_offset_alignment_pairs_only_identical_bytes_and_misses_none(tokenizers, teacher, student, case, max_length):
    text, prompt_chars = case
    t_tok, s_tok = tokenizers[teacher], tokenizers[student]
    row = _teacher_row(t_tok, text, prompt_chars)
    featurizer = StudentFeaturizer(s_tok, alignment="offset", max_length=max_length,
                                   teacher_bytes=piece_bytes_table(t_tok))
    out = featurizer(row)

    s_ids, s_starts, s_ends = encode_with_offsets(s_tok, text)
    n = min(len(out["input_ids"]), len(s_ids))  # the student's appended EOS is not text
    s_ids, s_starts, s_ends = s_ids[:n], s_starts[:n], s_ends[:n]
    t_starts, t_ends = row["char_start"], row["char_end"]
    limit = int(s_ends[-1]) if featurizer.stats.truncated else None  # the teacher is cut where the student is
    t_targets = set(target_positions(t_starts, t_ends, prompt_chars, limit).tolist())
    s_targets = target_positions(s_starts, s_ends, prompt_chars)
    t_bytes = _reference_bytes(t_tok, teacher, row["input_ids"], t_starts, t_ends, text)
    s_bytes = _reference_bytes(s_tok, student, s_ids, s_starts, s_ends, text)

    paired = {int(q): int(out["teacher_ids"][q, 0]) for q in np.flatnonzero(out["kd_mask"])}
    # 3: only targets, each teacher position once, only the same bytes
    for q, p in paired.items():
        assert q in s_targets and p in t_targets
        if t_bytes is not None and s_bytes is not None:
            assert s_bytes[q + 1] == t_bytes[p + 1], (q, p, "pairs tokens that stand for other bytes")
        else:  # no byte reference: at least the same characters
            assert (s_starts[q + 1], s_ends[q + 1]) == (t_starts[p + 1], t_ends[p + 1]), (q, p)
    assert len(set(paired.values())) == len(paired)
    # 4: none missed (where the reference knows both sides' bytes)
    if t_bytes is not None and s_bytes is not None:
        teacher_ranges = {t_bytes[p + 1] for p in t_targets if t_bytes[p + 1][0] < t_bytes[p + 1][1]}
        for q in s_targets:
            if s_bytes[q + 1] in teacher_ranges:
                assert q in paired, f"student target {q} has a teacher twin {s_bytes[q + 1]} but no pair"
    assert out["kd_mask"].sum() == featurizer.stats.matched


@pytest.mark.parametrize("family", FAMILIES)
@CHECK
@given(case=texts_with_prompt())
@example(case=("\u0301\u200d🏳️‍🌈" + "\t" * 30, 0))
@example(case=("\u2581 a\u2581b", 0))
def test_offset_alignment_with_the_teachers_own_tokenizer_pairs_every_target(tokenizers, family, case):
    text, prompt_chars = case
    tok = tokenizers[family]
    row = _teacher_row(tok, text, prompt_chars)
    t_targets = target_positions(row["char_start"], row["char_end"], prompt_chars)
    table = piece_bytes_table(tok)
    b_start, b_end, known = byte_spans(row["input_ids"], row["char_start"], row["char_end"], table,
                                       char_byte_offsets(text))
    al = align_by_offset(b_start, b_end, t_targets, b_start, b_end, t_targets, max(len(row["input_ids"]) - 1, 0),
                         t_known=known, s_known=known)

    assert al.matched == al.targets == len(t_targets)
    assert al.teacher_pos[t_targets].tolist() == t_targets.tolist()
