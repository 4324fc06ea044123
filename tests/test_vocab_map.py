"""The teacher -> student vocabulary map of the hybrid loss, on real tokenizers."""

import numpy as np
import pytest

from logitcache.pipeline.student import vocab_map as vm_mod
from logitcache.pipeline.student.vocab_map import build_vocab_map, mapped_mass


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    pytest.importorskip("mistral_common")
    from logitcache.pipeline.tiny import load_mistral_tokenizer

    return load_mistral_tokenizer(tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="module")
def bpe():
    from logitcache.pipeline.tiny import generate_corpus, train_bpe_tokenizer

    return train_bpe_tokenizer(generate_corpus(2000, 1), 512)


def _pair(vm, teacher, student, piece):
    t_id = teacher.convert_tokens_to_ids(piece)
    s_id = int(vm.teacher_to_student[t_id])
    return student.convert_ids_to_tokens(s_id) if s_id >= 0 else None


def test_a_tokenizer_maps_every_id_to_itself(mistral):
    vm = build_vocab_map(mistral, mistral)
    assert vm.matched == vm.teacher_size == len(mistral)
    assert (vm.teacher_to_student == np.arange(len(mistral))).all()


def test_byte_level_bpe_tokens_map_to_sentencepiece_tokens_of_the_same_bytes(bpe, mistral):
    vm = build_vocab_map(bpe, mistral)
    assert _pair(vm, bpe, mistral, "Ġcapital") == "▁capital"  # 'Ġ' and '▁' are both a space
    assert _pair(vm, bpe, mistral, "ta") == "ta"
    assert _pair(vm, bpe, mistral, "Ł") == "<0x9F>"  # a byte-level byte to a byte-fallback piece
    assert _pair(vm, bpe, mistral, "</s>") == "</s>" and _pair(vm, bpe, mistral, "<s>") == "<s>"
    assert 0.5 < vm.matched_fraction < 1.0


def test_a_regular_token_wins_over_a_byte_fallback_piece_of_the_same_bytes(bpe, mistral):
    vm = build_vocab_map(mistral, bpe)
    assert _pair(vm, mistral, bpe, "e") == "e"
    assert _pair(vm, mistral, bpe, "<0x65>") is None  # 'e' is taken: the map stays one-to-one


def test_the_map_is_one_to_one(bpe, mistral):
    for t, s in [(bpe, mistral), (mistral, bpe)]:
        table = build_vocab_map(t, s).teacher_to_student
        mapped = table[table >= 0]
        assert len(np.unique(mapped)) == len(mapped)


def test_ids_outside_the_teacher_vocabulary_map_to_nothing(bpe, mistral):
    vm = build_vocab_map(bpe, mistral)
    assert vm.lookup(np.array([[len(bpe), -1, bpe.convert_tokens_to_ids("ta")]])).tolist() == [[-1, -1, mistral.convert_tokens_to_ids("ta")]]


def test_the_map_is_kept_on_disk_and_reused(bpe, mistral, tmp_path, monkeypatch):
    first = build_vocab_map(bpe, mistral, cache_dir=tmp_path)
    (saved,) = tmp_path.glob("vocab-map-*.npy")
    monkeypatch.setattr(vm_mod, "_PROCESS_CACHE", {})
    monkeypatch.setattr(vm_mod, "token_keys", lambda *_: pytest.fail("rebuilt instead of read from disk"))
    again = build_vocab_map(bpe, mistral, cache_dir=tmp_path)
    assert (again.teacher_to_student == first.teacher_to_student).all() and saved.is_file()


def test_mapped_mass_counts_the_teacher_top_k_mass_with_a_student_token():
    lp = np.log(np.array([[0.5, 0.3, 0.1]]))
    mapped, total = mapped_mass(lp, np.array([[4, -1, 0]]))
    assert mapped == pytest.approx(0.6) and total == pytest.approx(0.9)


# --- word starts (ALM's debiasing): which tokens begin a word, from their bytes ----------------


def test_word_starts_are_whitespace_initial_or_special_tokens_in_sentencepiece(mistral):
    from logitcache.pipeline.token_bytes import word_start_mask

    mask = word_start_mask(mistral)
    starts = {p: bool(mask[mistral.convert_tokens_to_ids(p)]) for p in ("\u2581the", "the", "<0x0A>", "<0x09>", "<0x41>", "</s>", "<s>")}
    assert starts == {"\u2581the": True, "the": False, "<0x0A>": True, "<0x09>": True, "<0x41>": False, "</s>": True, "<s>": True}


def test_word_starts_in_byte_level_bpe_read_its_byte_stand_ins(bpe):
    from logitcache.pipeline.token_bytes import word_start_mask

    mask = word_start_mask(bpe, size=len(bpe) + 3)  # a padded embedding: the extra rows start nothing
    vocab = bpe.get_vocab()
    spaced = [p for p in vocab if p.startswith("\u0120") and len(p) > 1]  # 'Ġ' is the space byte
    inner = [p for p in vocab if p.isalpha() and p.isascii()]
    assert spaced and inner
    assert all(mask[vocab[p]] for p in spaced) and not any(mask[vocab[p]] for p in inner)
    if "\u010a" in vocab:  # 'Ċ', the newline byte
        assert mask[vocab["\u010a"]]
    assert len(mask) == len(bpe) + 3 and not mask[-3:].any()
