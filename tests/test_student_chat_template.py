"""A student with a chat template of its own learns a chat cache in its own format.

Teacher: a tiny model on Mistral-7B's real tokenizer with the real v1 chat template that
`mistral_common` generates (`[INST] ... [/INST] answer</s>`). Student: another tokenizer with
Qwen's ChatML (`<|im_start|>assistant\\n answer<|im_end|>`). The student renders each cached
chat with ChatML; its targets are its assistant turns through `<|im_end|>`; KD pairs only the
tokens of the assistant content, which both renderings hold verbatim.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_model, generate_corpus, train_bpe_tokenizer
from logitcache.storage import open_cache

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' ~ message.content ~ '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATS = [
    [{"role": "user", "content": "What is the capital of Freedonia?"},
     {"role": "assistant", "content": "The capital of Freedonia is Zorvik."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea."},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green, like grass."}],
]


@pytest.fixture(scope="module")
def mistral_chat_cache(tmp_path_factory) -> Path:
    pytest.importorskip("sentencepiece")
    chat_templates = pytest.importorskip("mistral_common.integrations.chat_templates.chat_templates")
    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import TeacherConfig, run_teacher
    from logitcache.pipeline.tiny import load_mistral_tokenizer, mistral_model_file

    if mistral_model_file() is None:
        pytest.skip("mistral_common without data/tokenizer.model.v1")
    root = tmp_path_factory.mktemp("mistral-chat")
    tok = load_mistral_tokenizer(root / "teacher")
    tok.chat_template = chat_templates.convert_tokenizer_to_chat_template(mistral_model_file())
    build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=0)).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"id": f"chat-{i}", "messages": c}) + "\n" for i, c in enumerate(CHATS)))
    out = root / "cache"
    run_teacher(TeacherConfig(model=str(root / "teacher"), data=str(data), out=str(out), top_k=8,
                              template=TextTemplate(messages_field="messages")), progress=False)
    return out


@pytest.fixture(scope="module")
def chatml_student(tmp_path_factory) -> Path:
    tok = train_bpe_tokenizer(generate_corpus(300, seed=3), vocab_size=400, chat_template=False)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("student") / "chatml"
    build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=1)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _features(cache: Path, student: Path, alignment: str = "offset"):
    from transformers import AutoTokenizer

    from logitcache.pipeline.student.features import featurizer_for_cache
    from logitcache.storage.reader import CacheReader

    tok = AutoTokenizer.from_pretrained(student)
    featurize = featurizer_for_cache(CacheReader(cache), tok, alignment)
    return tok, featurize, {row["id"]: (row, featurize(row)) for row in open_cache(cache)}


def test_the_cache_keeps_each_chat_beside_the_teachers_rendering(mistral_chat_cache):
    row = open_cache(mistral_chat_cache)["chat-1"]
    assert "[INST]" in row["text"] and json.loads(row["messages"]) == CHATS[1]


def test_the_student_learns_its_own_rendering_and_its_own_end_of_turn(mistral_chat_cache, chatml_student):
    tok, featurize, feats = _features(mistral_chat_cache, chatml_student)
    assert featurize.student_chat
    f = feats["chat-1"][1]
    text = tok.decode(f["input_ids"])
    assert "<|im_start|>assistant\n" in text and "[INST]" not in text
    learnt = tok.decode(f["input_ids"][f["labels"] != -100])
    assert learnt == "Blue, like the sea.<|im_end|>Green, like grass.<|im_end|>"


def test_kd_pairs_only_tokens_of_the_shared_assistant_content(mistral_chat_cache, chatml_student):
    tok, _, feats = _features(mistral_chat_cache, chatml_student)
    for row, f in feats.values():
        q = np.flatnonzero(f["kd_mask"])
        assert len(q) > 0
        paired = tok.decode(f["input_ids"][q + 1])  # what the paired positions predict
        contents = "".join(m["content"] for m in json.loads(row["messages"]) if m["role"] == "assistant")
        assert "<|im_end|>" not in paired and "[INST]" not in paired and "</s>" not in paired
        assert set(paired.replace(" ", "")) <= set(contents.replace(" ", ""))


def test_offset_pairs_predict_the_same_characters_on_both_sides(mistral_chat_cache, chatml_student):
    """Each offset pair: the student's predicted token and the teacher's stand for the same content text."""
    from logitcache.pipeline.student.chat_view import student_chat_view
    from logitcache.pipeline.offsets import encode_with_offsets

    tok, featurize, _ = _features(mistral_chat_cache, chatml_student)
    row = open_cache(mistral_chat_cache)["chat-0"]
    view = student_chat_view(json.loads(row["messages"]), tok, row["text"], row["target_spans"])
    _, s_starts, s_ends = encode_with_offsets(tok, view.text, add_special_tokens=False)
    m_starts, m_ends, mapped = view.to_teacher(s_starts, s_ends)
    al_f = featurize(row)
    checked = 0
    for q in np.flatnonzero(al_f["kd_mask"]):
        assert mapped[q + 1]
        student_chars = row["text"][m_starts[q + 1]:m_ends[q + 1]]
        assert student_chars == view.text[s_starts[q + 1]:s_ends[q + 1]]
        checked += 1
    assert checked > 0


def test_a_student_with_the_teachers_template_reads_the_teachers_text(mistral_chat_cache, tmp_path):
    from transformers import AutoTokenizer

    from logitcache.pipeline.student.features import featurizer_for_cache
    from logitcache.storage.reader import CacheReader

    cache = CacheReader(mistral_chat_cache)
    tok = AutoTokenizer.from_pretrained(cache.tokenizer_dir)
    assert not featurizer_for_cache(cache, tok).student_chat


@pytest.mark.parametrize("loss", ["uld", "alm"])
def test_a_student_with_its_own_template_trains(mistral_chat_cache, chatml_student, tmp_path, loss):
    from logitcache.pipeline.student.train import TrainConfig, run_train

    r = run_train(TrainConfig(student=str(chatml_student), cache=str(mistral_chat_cache), out=str(tmp_path / loss),
                              loss=loss, max_steps=2, batch_size=2, logging_steps=1, progress=False))
    assert r.global_step == 2 and math.isfinite(r.train_loss)
