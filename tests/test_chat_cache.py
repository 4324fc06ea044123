"""Multi-turn chats through stage 1 and 2: every assistant turn is a target, everything else context.

The tiny teacher's chat template (`<|role|>\\ncontent</s>\\n` per message, logitcache/pipeline/tiny.py)
has no generation blocks, so its turns are found by rendering prefixes (pipeline/chat.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.storage import open_cache, verify_cache

U, A, S, T = "user", "assistant", "system", "tool"
LONG = " ".join(f"step {i} of the long answer." for i in range(80))
CHATS = {
    "two-turns": [(U, "What is 2+2?"), (A, "It is 4.")],
    "four-turns-system": [(S, "Be brief."), (U, "Name a colour."), (A, "Blue."), (U, "Another?"), (A, "Green.")],
    "tool-turn": [(U, "Weather in Paris?"), (A, "Let me look it up."), (T, "sunny, 21 C"), (A, "Sunny and 21 degrees.")],
    "six-turns-unicode": [(U, "Bonjour, ça va ?"), (A, "Très bien, merci."), (U, "日本語は？"), (A, "少し話せます。"),
                          (U, "Emoji?"), (A, "Sure 👍🏽 e\u0301")],
    "empty-assistant-turn": [(U, "Say nothing."), (A, ""), (U, "Now say hi."), (A, "Hi.")],
    "no-assistant": [(S, "You are kind."), (U, "Hello?")],
    "long-turn": [(U, "Explain at length."), (A, LONG)],
}
NOT_TRAINED = ("Let me look it up.",)  # marked "train": false in the data


def _messages(turns):
    return [{"role": r, "content": c, **({"train": False} if c in NOT_TRAINED else {})} for r, c in turns]


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory, teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("chats")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"id": k, "messages": _messages(v)}) + "\n" for k, v in CHATS.items()))
    out = root / "cache"
    r = CliRunner().invoke(app, ["teacher", "--model", str(teacher_dir), "--data", str(data), "--out", str(out),
                                 "--messages-field", "messages", "--top-k", "8", "--max-length", "192", "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def _targets(row) -> list[str]:
    return [row["text"][a:b] for a, b in row["target_spans"]]


def test_each_assistant_turn_is_a_target_through_its_end_marker(chat_cache):
    row = open_cache(chat_cache)["four-turns-system"]
    assert _targets(row) == ["Blue.</s>", "Green.</s>"]


def test_system_user_and_tool_text_is_never_inside_a_target(chat_cache):
    for row in open_cache(chat_cache):
        turns = CHATS[row["id"]]
        for target in _targets(row):
            assert not any(c and c in target for r, c in turns if r != A), (row["id"], target)


def test_a_tool_turn_is_context_and_train_false_keeps_an_assistant_turn_out(chat_cache):
    row = open_cache(chat_cache)["tool-turn"]
    assert _targets(row) == ["Sunny and 21 degrees.</s>"]
    assert "Let me look it up." in row["text"] and "sunny, 21 C" in row["text"]


def test_unicode_turns_are_spanned_by_characters(chat_cache):
    row = open_cache(chat_cache)["six-turns-unicode"]
    assert _targets(row) == ["Très bien, merci.</s>", "少し話せます。</s>", "Sure 👍🏽 e\u0301</s>"]


def test_an_empty_assistant_turn_is_no_target_but_the_chat_is_kept(chat_cache):
    assert _targets(open_cache(chat_cache)["empty-assistant-turn"]) == ["Hi.</s>"]


def test_a_chat_without_an_assistant_turn_is_skipped_as_no_target(chat_cache):
    m = open_cache(chat_cache).manifest
    assert m.skipped == {"no-assistant": "no target"}


def test_a_turn_longer_than_max_length_is_cut_with_its_span(chat_cache):
    row = open_cache(chat_cache)["long-turn"]
    assert row["truncated"]
    ((a, b),) = row["target_spans"]
    assert b == len(row["text"]) and LONG.startswith(row["text"][a:b])


def test_the_chat_cache_is_sound(chat_cache):
    report = verify_cache(chat_cache)
    assert report.ok, report.problems


def test_a_student_with_another_tokenizer_trains_on_the_chat_cache(chat_cache, metaspace_student, tmp_path):
    from logitcache.pipeline.student.train import TrainConfig, run_train

    for loss in ("uld", "alm"):
        r = run_train(TrainConfig(student=str(metaspace_student), cache=str(chat_cache), out=str(tmp_path / loss),
                                  loss=loss, max_steps=2, batch_size=3, logging_steps=1, progress=False))
        assert r.global_step == 2 and r.train_loss == r.train_loss  # finite, not NaN
        assert 0 < r.feature_stats["fraction_matched"] <= 1


def test_a_chat_cache_written_before_every_turn_was_a_target_is_not_resumed(chat_cache, teacher_dir, tmp_path):
    """Caches written before took the last message alone as the response: a resume would mix the two."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(chat_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("chat_targets", "message_train_field"):
        del manifest["template"][key]
    manifest["status"] = "partial"
    (old / "manifest.json").write_text(json.dumps(manifest))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"id": k, "messages": _messages(v)}) + "\n" for k, v in CHATS.items()))

    r = CliRunner().invoke(app, ["teacher", "--model", str(teacher_dir), "--data", str(data), "--out", str(old),
                                 "--messages-field", "messages", "--top-k", "8", "--max-length", "192", "--no-progress"])
    assert r.exit_code == 2 and "template" in r.output, r.output


def test_generate_mode_writes_the_last_assistant_turn_afresh(teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    from logitcache.pipeline.chat import last_assistant_prefix

    chat = _messages(CHATS["four-turns-system"])
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"id": "c", "messages": chat}) + "\n")
    out = tmp_path / "cache"
    r = CliRunner().invoke(app, ["teacher", "--model", str(teacher_dir), "--data", str(data), "--out", str(out),
                                 "--messages-field", "messages", "--mode", "generate", "--max-new-tokens", "6",
                                 "--temperature", "0", "--top-k", "8", "--no-progress"])
    assert r.exit_code == 0, r.output
    row = open_cache(out)["c"]
    prompt = last_assistant_prefix(chat, AutoTokenizer.from_pretrained(teacher_dir))
    assert "Blue." in prompt and "Green." not in prompt  # earlier turns as written, the last one dropped
    assert row["text"].startswith(prompt) and row["target_spans"].tolist() == [[len(prompt), len(row["text"])]]
