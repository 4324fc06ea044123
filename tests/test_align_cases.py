"""Alignment where tokenizers disagree most: the prompt/response boundary, split characters, the end.

Issue 12 §1a (a token straddling the boundary), §1e (byte pieces of a split character), §1f (the
end of the response is a target), and the refusal of a student tokenizer that aligns nothing.
Rows are built by hand from real tokenizations, with teacher position p stored as top-k id p,
so each pair can be traced.
"""

import numpy as np
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from logitcache.pipeline.offsets import encode_with_offsets, piece_bytes_table
from logitcache.pipeline.student.features import StudentFeaturizer

BOUNDARIES = [("Answer:", "\nYes, it is the capital."), ("List:\n", "\n1. apples"), ("Code:", "\n\ndef f():")]
# Llama-3's pre-tokenizer: punctuation takes the newlines after it, so ':\n' and ':\n\n' are tokens.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_style_bpe(corpus):
    """Byte-level BPE with Llama-3's split: the tokenizer family whose tokens straddle a boundary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from logitcache.pipeline.tiny import SPECIAL_TOKENS, _wrap

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + ["Answer:\nYes", "List:\n\n1. a", "Code:\n\ndef f():"] * 50, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]),
    ])
    return _wrap(tok, chat_template=False)


class _Tokenizers(dict):
    def __missing__(self, name):
        pytest.skip(f"the {name} tokenizer is not available here (mistral_common, sentencepiece)")


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    import importlib.util

    from logitcache.pipeline.tiny import (
        generate_corpus,
        load_mistral_tokenizer,
        mistral_model_file,
        train_bpe_tokenizer,
        train_metaspace_bpe_tokenizer,
        train_unigram_tokenizer,
    )

    corpus = generate_corpus(2000, 0)
    out = _Tokenizers(
        llama3=llama3_style_bpe(corpus), bpe=train_bpe_tokenizer(corpus, 512),
        metaspace=train_metaspace_bpe_tokenizer(corpus, 400), unigram=train_unigram_tokenizer(corpus, 400),
    )
    if mistral_model_file() is not None and importlib.util.find_spec("sentencepiece") is not None:
        out["mistral"] = load_mistral_tokenizer(tmp_path_factory.mktemp("mistral"))
    return out


def row_of(tok, text, prompt_chars, *, eos=False, k=2):
    """A cache row as stage 1 writes it (``eos``: with the teacher's EOS appended), top-k id p at position p."""
    ids, starts, ends = encode_with_offsets(tok, text)
    if eos:
        ids, starts, ends = ids + [tok.eos_token_id], np.append(starts, len(text)), np.append(ends, len(text))
    n = len(ids)
    topk_ids = np.zeros((n - 1, k), dtype=np.int32)
    topk_ids[:, 0] = np.arange(n - 1)
    return {
        "id": "x", "text": text, "prompt_chars": prompt_chars, "truncated": False,
        "input_ids": np.asarray(ids, np.int32), "char_start": starts.astype(np.int32), "char_end": ends.astype(np.int32),
        "topk_ids": topk_ids, "topk_logprobs": np.zeros((n - 1, k), dtype=np.float16),
    }


def pairs_of(example):
    """(student position, teacher position) for every KD position."""
    return [(int(q), int(example["teacher_ids"][q, 0])) for q in np.flatnonzero(example["kd_mask"])]


# --- §1a: a token straddling the prompt/response boundary -----------------------------------------

STRADDLE_PAIRS = [("llama3", "metaspace"), ("llama3", "unigram"), ("llama3", "mistral"), ("llama3", "bpe"),
                  ("bpe", "llama3"), ("metaspace", "bpe"), ("mistral", "llama3")]


@pytest.mark.parametrize("prompt, response", BOUNDARIES, ids=["answer", "list", "code"])
@pytest.mark.parametrize("teacher, student", STRADDLE_PAIRS, ids=[f"{t}-to-{s}" for t, s in STRADDLE_PAIRS])
def test_position_alignment_starts_both_responses_at_the_same_character(toks, teacher, student, prompt, response):
    text = prompt + response
    row = row_of(toks[teacher], text, len(prompt))
    ex = StudentFeaturizer(toks[student], alignment="position")(row)
    _, s_start, s_end = encode_with_offsets(toks[student], text)
    pairs = pairs_of(ex)
    q, p = pairs[0]
    assert s_end[q + 1] == row["char_end"][p + 1], "the first pair ends at different characters: shifted"
    assert s_end[q + 1] > len(prompt)


@pytest.mark.parametrize("prompt, response", BOUNDARIES[:2], ids=["answer", "list"])
@pytest.mark.parametrize("student", ["bpe", "metaspace"])
def test_position_pairs_after_a_straddling_token_have_identical_spans(toks, student, prompt, response):
    # llama3 cuts ':\n' / ':\n\n'; past the boundary both tokenize alike: every later pair is the same token
    text = prompt + response
    row = row_of(toks["llama3"], text, len(prompt))
    assert any(s < len(prompt) < e for s, e in zip(row["char_start"], row["char_end"])), "no straddling token"
    ex = StudentFeaturizer(toks[student], alignment="position")(row)
    _, s_start, s_end = encode_with_offsets(toks[student], text)
    pairs = pairs_of(ex)[1:]
    same = [(s_start[q + 1], s_end[q + 1]) == (row["char_start"][p + 1], row["char_end"][p + 1]) for q, p in pairs]
    assert len(same) >= 5 and all(same), same  # before the fix: 0 of 7 (list), 0 of 10 (answer)


@pytest.mark.parametrize("teacher", ["llama3", "mistral"])
def test_a_straddling_token_is_a_target_on_both_sides(toks, teacher):
    prompt, response = "Answer:", "\nYes, it is the capital."
    text = prompt + response
    ids, s_start, s_end = encode_with_offsets(toks["metaspace"], text)
    j = next(i for i in range(len(ids)) if s_start[i] < len(prompt) < s_end[i])  # ':\n'
    for alignment in ("position", "offset"):
        ex = StudentFeaturizer(toks["metaspace"], alignment=alignment)(row_of(toks[teacher], text, len(prompt)))
        assert ex["labels"][j] == ids[j], "the student's straddling token gets no CE"
    # by offsets it pairs with the teacher's ':\n' when the teacher has that token too
    ex = StudentFeaturizer(toks["metaspace"], alignment="offset", teacher_bytes=piece_bytes_table(toks[teacher]))(
        row_of(toks[teacher], text, len(prompt)))
    assert ex["kd_mask"][j - 1] == (teacher == "llama3")


# --- §1e: the pieces of a split character pair only when they stand for the same bytes ------------

RARE = "Zoë 👍🏽 ⁂ 𝄞 ꙮ 🦩 𓀀 x\u0301\u0302 東京 🫠 ﷽ 👨‍👩‍👧 ∰ Ꝏ"
BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def reference_bytes(tok, ids, starts, ends, text):
    """Slow: each token's byte range by a cursor over the pieces' own bytes."""
    cursor, out = 0, []
    for t, piece, s, e in zip(ids, tok.convert_ids_to_tokens(list(ids)), starts, ends):
        if t in tok.all_special_ids:
            chunk = text[s:e].encode()
        elif all(c in BYTE_OF for c in piece) and tok.backend_tokenizer.decoder.__class__.__name__ == "ByteLevel":
            chunk = bytes(BYTE_OF[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x"):
            chunk = bytes([int(piece[3:5], 16)])
        else:
            chunk = text[s:e].encode()
        out.append((cursor, cursor + len(chunk)))
        cursor += len(chunk)
    assert cursor == len(text.encode()), "the pieces do not spell the text"
    return out


@pytest.mark.parametrize("teacher, student", [("bpe", "mistral"), ("mistral", "bpe"), ("llama3", "mistral")])
def test_offset_pairs_of_split_characters_stand_for_the_same_bytes(toks, teacher, student):
    t_tok, s_tok = toks[teacher], toks[student]
    row = row_of(t_tok, RARE, 0)
    ex = StudentFeaturizer(s_tok, alignment="offset", teacher_bytes=piece_bytes_table(t_tok))(row)
    s_ids, s_start, s_end = encode_with_offsets(s_tok, RARE)
    t_bytes = reference_bytes(t_tok, row["input_ids"].tolist(), row["char_start"], row["char_end"], RARE)
    s_bytes = reference_bytes(s_tok, s_ids, s_start, s_end, RARE)
    pairs = pairs_of(ex)
    wrong = [(q, p) for q, p in pairs if s_bytes[q + 1] != t_bytes[p + 1]]
    assert not wrong  # before: byte pieces paired by order after the same character
    pieces = [(q, p) for q, p in pairs if s_start[q + 1] == s_end[q + 1]]
    assert pieces, "no later piece of a split character paired (they should where bytes agree)"
    # and none is missed: every student target with a teacher twin of the same bytes is paired
    twins = {t_bytes[p] for p in range(1, len(t_bytes))}
    assert {q for q in range(len(s_ids) - 1) if s_bytes[q + 1] in twins and s_bytes[q + 1][0] < s_bytes[q + 1][1]} \
        == {q for q, _ in pairs}


def test_a_whole_character_never_pairs_with_the_first_piece_of_its_split():
    # "é" is one token on the student's side, two byte pieces on the teacher's: nothing shares its bytes
    from logitcache.pipeline.offsets import PieceBytes, byte_spans, char_byte_offsets
    from logitcache.pipeline.student.align import align_by_offset

    text = "é"
    cb = char_byte_offsets(text)
    table = PieceBytes(nbytes=np.array([0, 1, 1, 2]), added=np.array([True, False, False, False]), kind="byte_level")
    t = byte_spans(np.array([0, 1, 2]), np.array([0, 0, 1]), np.array([0, 1, 1]), table, cb)  # <s> é1 é2
    s = byte_spans(np.array([0, 3]), np.array([0, 0]), np.array([0, 1]), table, cb)  # <s> é
    assert (t[0].tolist(), t[1].tolist()) == ([0, 0, 1], [0, 1, 2]) and s[0].tolist() == [0, 0] and s[1].tolist() == [0, 2]
    al = align_by_offset(t[0], t[1], np.array([0, 1]), s[0], s[1], np.array([0]), 1, t_known=t[2], s_known=s[2])
    assert al.matched == 0


# --- §1f: the end of the response ------------------------------------------------------------------


@pytest.mark.parametrize("alignment", ["position", "offset"])
def test_the_students_eos_is_a_target_paired_with_the_teachers_end(toks, alignment):
    text, pc = "Q: capital?\nA:", 14
    text += " Zorvik."
    t_tok, s_tok = toks["bpe"], toks["mistral"]
    row = row_of(t_tok, text, pc, eos=True)
    f = StudentFeaturizer(s_tok, alignment=alignment, teacher_bytes=piece_bytes_table(t_tok),
                          teacher_eos_id=t_tok.eos_token_id)
    ex = f(row)
    assert ex["input_ids"][-1] == s_tok.eos_token_id and ex["labels"][-1] == s_tok.eos_token_id
    n, n_t = len(ex["input_ids"]), len(row["input_ids"])
    assert ex["kd_mask"][n - 2] and ex["teacher_ids"][n - 2, 0] == n_t - 2  # end with end
    assert (f.stats.end_targets, f.stats.end_matched) == (1, 1)


def test_a_cache_without_ends_gives_the_students_eos_ce_only(toks):
    t_tok, s_tok = toks["bpe"], toks["metaspace"]
    row = row_of(t_tok, "Say something:\nCafé", 15)  # an old cache: no EOS, eos_id None
    ex = StudentFeaturizer(s_tok, alignment="position")(row)
    assert ex["labels"][-1] == s_tok.eos_token_id and not ex["kd_mask"][-2]
    # the teacher's last text token is still paired with the student's last text token
    assert ex["kd_mask"][-3] and ex["teacher_ids"][-3, 0] == len(row["input_ids"]) - 2


def test_a_student_cut_by_max_length_has_no_end_and_the_teachers_is_unused(toks):
    t_tok, s_tok = toks["bpe"], toks["metaspace"]
    row = row_of(t_tok, "Say something:\nCafé crème à Zorvik coûte 12 €.", 15, eos=True)
    f = StudentFeaturizer(s_tok, alignment="position", max_length=8, teacher_eos_id=t_tok.eos_token_id)
    ex = f(row)
    assert s_tok.eos_token_id not in ex["input_ids"].tolist()
    assert len(row["input_ids"]) - 2 not in ex["teacher_ids"][ex["kd_mask"], 0].tolist()
    assert f.stats.end_targets == 0


def test_eos_is_not_doubled_when_the_tokenizer_appends_it_itself(toks):
    from tokenizers import processors

    from logitcache.pipeline.tiny import generate_corpus, train_metaspace_bpe_tokenizer

    s_tok = train_metaspace_bpe_tokenizer(generate_corpus(300, 1), 300)
    s_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", s_tok.bos_token_id), ("</s>", s_tok.eos_token_id)])
    ex = StudentFeaturizer(s_tok, alignment="position")(row_of(toks["bpe"], "ab cd", 2, eos=True))
    assert ex["input_ids"].tolist().count(s_tok.eos_token_id) == 1 and ex["labels"][-1] == s_tok.eos_token_id


def test_a_student_tokenizer_without_eos_gets_no_end(toks):
    import copy

    s_tok = copy.deepcopy(toks["metaspace"])
    s_tok.eos_token = None
    ex = StudentFeaturizer(s_tok, alignment="position")(row_of(toks["bpe"], "ab cd", 2, eos=True))
    assert len(ex["input_ids"]) == len(encode_with_offsets(s_tok, "ab cd")[0])


# --- a student tokenizer that aligns nothing is refused before training ---------------------------


def _degenerate_tokenizer(path):
    """A word-level tokenizer without a pre-tokenizer: the whole text is one <unk> token."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def test_aligned_fraction_of_a_real_student(built_cache, toks):
    from logitcache.pipeline.student.dataset import aligned_fraction

    assert 0.3 < aligned_fraction(built_cache, toks["metaspace"], "offset") < 1.0


def test_a_student_tokenizer_that_aligns_nothing_is_refused_before_training(built_cache, tmp_path):
    from logitcache import LogitCacheError
    from logitcache.pipeline.student.train import TrainConfig, run_train

    _degenerate_tokenizer(tmp_path / "student")  # no model in there: the refusal must come first
    cfg = TrainConfig(student=str(tmp_path / "student"), cache=str(built_cache), out=str(tmp_path / "out"),
                      loss="uld", alignment="offset", max_steps=1)
    with pytest.raises(LogitCacheError, match=r"aligns 0\.0% of the cache's target positions \(alignment offset"):
        run_train(cfg)
