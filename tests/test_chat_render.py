"""render_chat: the rendered chat and the character spans of the assistant turns to learn.

Templates: ChatML as Qwen writes it and Llama-3's header template, each written onto a tiny
fast tokenizer (with and without ``{% generation %}`` blocks), and Mistral's real templates,
generated offline by ``mistral_common`` for its real v1 SentencePiece tokenizer.
"""

from __future__ import annotations

import json

import pytest

from logitcache.errors import LogitCacheError
from logitcache.pipeline.chat import last_assistant_prefix, render_chat
from logitcache.pipeline.tiny import generate_corpus, train_bpe_tokenizer

# Qwen2.5's ChatML, tool calls and tool responses as Qwen renders them (tools list left out).
CHATML = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for tc in message.tool_calls or [] %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' ~ tc.function.name ~ '\", \"arguments\": ' ~ (tc.function.arguments | tojson) ~ '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' ~ message.content ~ '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' ~ message.content ~ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The same template with the assistant turn (content, tool calls, end marker) in a
# {% generation %} block, as TRL's training templates for Qwen do.
CHATML_GENERATION = CHATML.replace(
    "{{- '<|im_start|>assistant\\n' }}{%- if message.content %}",
    "{{- '<|im_start|>assistant\\n' }}{%- generation %}{%- if message.content %}",
).replace("{{- '<|im_end|>\\n' }}{%- elif", "{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}{%- elif")
# Llama-3-8B-Instruct's template, with Llama-3.1's JSON tool calls and ipython tool role.
LLAMA3 = (
    "{%- for message in messages %}"
    "{%- if loop.index0 == 0 %}{{- bos_token }}{%- endif %}"
    "{%- set role = 'ipython' if message.role == 'tool' else message.role %}"
    "{{- '<|start_header_id|>' ~ role ~ '<|end_header_id|>\\n\\n' }}"
    "{%- if message.tool_calls %}"
    "{%- for tc in message.tool_calls %}"
    "{{- '{\"name\": \"' ~ tc.function.name ~ '\", \"parameters\": ' ~ (tc.function.arguments | tojson) ~ '}' }}"
    "{%- endfor %}"
    "{%- else %}{{- message.content | trim }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zorvik"}}}

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of Freedonia?"},
    {"role": "assistant", "content": "The capital of Freedonia is Zorvik."},
]
TOOL_CHAT = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Is it raining in Zorvik?"},
    {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "content": "{\"rain\": true, \"celsius\": 11}"},
    {"role": "assistant", "content": "Yes, it is raining in Zorvik (11 °C)."},
]
SIX_TURNS = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And 5 plus 8?"},
    {"role": "assistant", "content": "5 plus 8 is 13."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


def _tiny(template: str):
    tok = train_bpe_tokenizer(generate_corpus(300, seed=3), vocab_size=400, chat_template=False)
    tok.add_tokens(CHAT_TOKENS, special_tokens=True)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chatml():
    return _tiny(CHATML)


@pytest.fixture(scope="module")
def chatml_generation(chatml):
    import copy

    tok = copy.deepcopy(chatml)
    tok.chat_template = CHATML_GENERATION
    return tok


@pytest.fixture(scope="module")
def llama3():
    return _tiny(LLAMA3)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """Mistral-7B's real tokenizer and the real v1 chat template mistral_common generates for it."""
    pytest.importorskip("sentencepiece")
    chat_templates = pytest.importorskip("mistral_common.integrations.chat_templates.chat_templates")
    from logitcache.pipeline.tiny import load_mistral_tokenizer, mistral_model_file

    if mistral_model_file() is None:
        pytest.skip("mistral_common without data/tokenizer.model.v1")
    tok = load_mistral_tokenizer(tmp_path_factory.mktemp("mistral"))
    tok.chat_template = chat_templates.convert_tokenizer_to_chat_template(mistral_model_file())
    return tok


@pytest.fixture
def mistral_v3(mistral):
    """The same tokenizer with the real v3 (function calling) template."""
    import copy

    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template

    from logitcache.pipeline.tiny import mistral_model_file

    tok = copy.deepcopy(mistral)
    tok.chat_template = convert_tokenizer_to_chat_template(
        mistral_model_file().parent / "mistral_instruct_tokenizer_240323.model.v3"
    )
    return tok


def targets(text: str, spans) -> list[str]:
    return [text[s:e] for s, e in spans]


def assert_only_assistant(text: str, spans, messages, trained=None) -> None:
    """Each trained assistant content lies inside a span; no other message's content does."""
    trained = trained if trained is not None else [m for m in messages if m["role"] == "assistant"]
    inside = targets(text, spans)
    for m in trained:
        if m.get("content"):
            assert any(m["content"].strip() in t for t in inside), m["content"]
    for m in messages:
        if m["role"] != "assistant" and m.get("content"):
            assert not any(m["content"] in t for t in inside), m["content"]
    assert all(0 <= s < e <= len(text) for s, e in spans)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))


# --------------------------------------------------------------------------------------------------
# ChatML (Qwen)


def test_chatml_two_turns_target_is_the_answer_and_its_end_marker(chatml):
    text, spans = render_chat(TWO_TURNS, chatml)
    assert text == (
        "<|im_start|>user\nWhat is the capital of Freedonia?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of Freedonia is Zorvik.<|im_end|>\n"
    )
    # The newline after <|im_end|> is never generated: context.
    assert targets(text, spans) == ["The capital of Freedonia is Zorvik.<|im_end|>"]


def test_chatml_tool_call_turn_is_a_target_and_the_tool_output_is_not(chatml):
    text, spans = render_chat(TOOL_CHAT, chatml)
    assert targets(text, spans) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zorvik"}}\n</tool_call><|im_end|>',
        "Yes, it is raining in Zorvik (11 °C).<|im_end|>",
    ]
    assert_only_assistant(text, spans, TOOL_CHAT)


def test_chatml_six_turns_give_three_targets(chatml):
    text, spans = render_chat(SIX_TURNS, chatml)
    assert targets(text, spans) == ["2 plus 3 is 5.<|im_end|>", "5 plus 8 is 13.<|im_end|>", "You are welcome.<|im_end|>"]
    assert_only_assistant(text, spans, SIX_TURNS)


def test_train_false_keeps_an_assistant_turn_as_context(chatml):
    chat = [dict(m) for m in SIX_TURNS]
    chat[3]["train"] = False
    text, spans = render_chat(chat, chatml)
    assert targets(text, spans) == ["2 plus 3 is 5.<|im_end|>", "You are welcome.<|im_end|>"]
    assert text == render_chat(SIX_TURNS, chatml)[0]  # the flag does not reach the template


def test_train_key_is_configurable(chatml):
    chat = [dict(m) for m in TWO_TURNS]
    chat[1]["learn"] = False
    assert render_chat(chat, chatml, train_key="learn")[1] == ()
    chat[1]["learn"] = True
    assert len(render_chat(chat, chatml, train_key="learn")[1]) == 1


def test_unicode_spans_are_str_indices(chatml):
    answer = "東京は首都です 😀👍🏽 — nai\u0308ve café 🇫🇷"  # CJK, emoji, skin tone, combining diaeresis, flag
    chat = [{"role": "user", "content": "Dis quelque chose: 数字"}, {"role": "assistant", "content": answer}]
    text, spans = render_chat(chat, chatml)
    assert targets(text, spans) == [answer + "<|im_end|>"]
    assert_only_assistant(text, spans, chat)


def test_empty_assistant_content_gives_no_span(chatml):
    chat = [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now say hi."},
        {"role": "assistant", "content": "Hi."},
    ]
    text, spans = render_chat(chat, chatml)
    assert "<|im_start|>assistant\n<|im_end|>" in text
    assert targets(text, spans) == ["Hi.<|im_end|>"]


def test_an_answer_that_repeats_the_question_is_found_in_its_own_turn(chatml):
    chat = [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"}]
    text, spans = render_chat(chat, chatml)
    (s, e), = spans
    assert text[s:e] == "assistant<|im_end|>" and s > text.index("<|im_start|>assistant\n")


def test_a_very_long_turn_is_spanned_whole(chatml):
    answer = "Zorvik " * 20_000
    text, spans = render_chat([{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": answer}], chatml)
    assert targets(text, spans) == [answer + "<|im_end|>"]


# --------------------------------------------------------------------------------------------------
# Mask way vs prefix way


def test_generation_blocks_use_the_mask_way(chatml_generation, monkeypatch):
    import logitcache.pipeline.chat as chat_mod

    monkeypatch.setattr(chat_mod, "_turn_by_prefix", lambda *a: pytest.fail("prefix way used"))
    text, spans = render_chat(TOOL_CHAT, chatml_generation)
    assert targets(text, spans)[1] == "Yes, it is raining in Zorvik (11 °C).<|im_end|>"
    assert_only_assistant(text, spans, TOOL_CHAT)


@pytest.mark.parametrize("chat", [TWO_TURNS, TOOL_CHAT, SIX_TURNS], ids=["2-turn", "tool", "6-turn"])
def test_mask_way_and_prefix_way_give_the_same_spans(chat, chatml, chatml_generation):
    assert render_chat(chat, chatml_generation) == render_chat(chat, chatml)


def test_template_without_generation_blocks_uses_the_prefix_way(chatml, monkeypatch):
    import logitcache.pipeline.chat as chat_mod

    monkeypatch.setattr(chat_mod, "_turns_from_mask", lambda *a: pytest.fail("mask way used"))
    assert len(render_chat(SIX_TURNS, chatml)[1]) == 3


def test_mask_way_honours_train_false_and_empty_turns(chatml_generation):
    chat = [dict(m) for m in SIX_TURNS]
    chat[1]["train"] = False
    chat[3]["content"] = ""
    text, spans = render_chat(chat, chatml_generation)
    assert targets(text, spans) == ["You are welcome.<|im_end|>"]


def test_without_a_generation_prompt_the_turn_header_is_found_with_a_sentinel(chatml):
    import copy

    tok = copy.deepcopy(chatml)
    tok.chat_template = CHATML.split("{%- if add_generation_prompt %}")[0]
    # "assistant" is also in the header; the answer is found after it, not inside it.
    chat = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "assistant"}]
    text, spans = render_chat(chat, tok)
    assert text.endswith("<|im_start|>assistant\nassistant<|im_end|>\n")
    assert spans == ((len(text) - len("assistant<|im_end|>\n"), len(text) - 1),)


def test_train_true_on_a_user_message_does_not_make_it_a_target(chatml):
    chat = [{**TWO_TURNS[0], "train": True}, TWO_TURNS[1]]
    text, spans = render_chat(chat, chatml)
    assert_only_assistant(text, spans, chat)


# --------------------------------------------------------------------------------------------------
# Llama-3


def test_llama3_two_turns_target_ends_with_eot(llama3):
    text, spans = render_chat(TWO_TURNS, llama3)
    assert text.startswith("<s><|start_header_id|>user<|end_header_id|>\n\nWhat is")
    assert targets(text, spans) == ["The capital of Freedonia is Zorvik.<|eot_id|>"]


def test_llama3_system_tool_call_and_ipython_turn(llama3):
    text, spans = render_chat(TOOL_CHAT, llama3)
    assert "<|start_header_id|>ipython<|end_header_id|>" in text
    assert targets(text, spans) == [
        '{"name": "get_weather", "parameters": {"city": "Zorvik"}}<|eot_id|>',
        "Yes, it is raining in Zorvik (11 °C).<|eot_id|>",
    ]
    assert_only_assistant(text, spans, TOOL_CHAT)


def test_llama3_six_turns(llama3):
    text, spans = render_chat(SIX_TURNS, llama3)
    assert targets(text, spans) == ["2 plus 3 is 5.<|eot_id|>", "5 plus 8 is 13.<|eot_id|>", "You are welcome.<|eot_id|>"]


def test_llama3_trims_content_and_the_span_follows(llama3):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello.\n"}]
    text, spans = render_chat(chat, llama3)
    assert targets(text, spans) == ["Hello.<|eot_id|>"]


# --------------------------------------------------------------------------------------------------
# Mistral's real templates


def test_mistral_two_turns(mistral):
    text, spans = render_chat(TWO_TURNS, mistral)
    assert text == "<s> [INST] What is the capital of Freedonia? [/INST] The capital of Freedonia is Zorvik.</s>"
    assert targets(text, spans) == ["The capital of Freedonia is Zorvik.</s>"]


def test_mistral_system_message_goes_into_the_first_user_turn(mistral):
    chat = [{"role": "system", "content": "Answer in one line."}] + SIX_TURNS[:4]
    text, spans = render_chat(chat, mistral)
    assert "[INST] Answer in one line.\n\nWhat is 2 plus 3?" in text
    assert targets(text, spans) == ["2 plus 3 is 5.</s>", "5 plus 8 is 13.</s>"]
    assert_only_assistant(text, spans, chat)


def test_mistral_six_turns_with_unicode(mistral):
    chat = [dict(m) for m in SIX_TURNS]
    chat[5]["content"] = "De rien — 不客气 😀"
    text, spans = render_chat(chat, mistral)
    assert targets(text, spans) == ["2 plus 3 is 5.</s>", "5 plus 8 is 13.</s>", "De rien — 不客气 😀</s>"]


def test_mistral_v3_tool_call_and_tool_result(mistral_v3):
    # v3 moves a system message to the last user turn (see the refusal test) and wants call ids.
    chat = [dict(m) for m in TOOL_CHAT[1:]]
    chat[1]["tool_calls"] = [{**WEATHER_CALL, "id": "call00042"}]
    chat[2]["tool_call_id"] = "call00042"
    text, spans = render_chat(chat, mistral_v3)
    assert "[TOOL_RESULTS]" in text
    assert len(spans) == 2 and targets(text, spans)[0].startswith("[TOOL_CALLS]")
    assert "get_weather" in targets(text, spans)[0] and targets(text, spans)[0].endswith("</s>")
    assert targets(text, spans)[1] == "Yes, it is raining in Zorvik (11 °C).</s>"
    assert_only_assistant(text, spans, chat)


# --------------------------------------------------------------------------------------------------
# Refusals


def test_real_template_that_moves_the_system_prompt_is_refused(mistral_v3):
    chat = [{"role": "system", "content": "Be brief."}] + SIX_TURNS[:4]
    with pytest.raises(LogitCacheError, match="cannot be located") as err:
        render_chat(chat, mistral_v3)
    assert "\n" not in str(err.value) and "--prompt-field" in str(err.value) and "generation" in str(err.value)


def test_template_that_counts_turns_at_the_top_is_refused(chatml):
    import copy

    tok = copy.deepcopy(chatml)
    tok.chat_template = "{{- 'Turns: ' ~ (messages | length) ~ '\\n' }}" + CHATML
    with pytest.raises(LogitCacheError, match="cannot be located"):
        render_chat(SIX_TURNS, tok)


def test_template_that_writes_the_last_answer_differently_is_refused(chatml):
    import copy

    tok = copy.deepcopy(chatml)
    tok.chat_template = CHATML.replace(
        "{%- if message.content %}{{- message.content }}{%- endif %}",
        "{%- if message.content %}{{- message.content ~ (' [final]' if loop.last else '') }}{%- endif %}",
    )
    with pytest.raises(LogitCacheError, match="cannot be located"):
        render_chat(TWO_TURNS + [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}], tok)


def test_template_error_is_one_line(chatml):
    import copy

    tok = copy.deepcopy(chatml)
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate\\nuser/assistant') }}"
    with pytest.raises(LogitCacheError, match="refused this chat: Conversation roles must alternate user") as err:
        render_chat(TWO_TURNS, tok)
    assert "\n" not in str(err.value)


def test_a_message_without_role_is_refused(chatml):
    with pytest.raises(LogitCacheError, match="message 2"):
        render_chat([TWO_TURNS[0], {"content": "no role"}], chatml)


# --------------------------------------------------------------------------------------------------
# Generate mode


def test_last_assistant_prefix_ends_with_the_generation_prompt(chatml):
    prompt = last_assistant_prefix(SIX_TURNS, chatml)
    text, spans = render_chat(SIX_TURNS, chatml)
    assert prompt.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    # The earlier answers stay as written; the last one starts where the prompt ends.
    assert text.startswith(prompt) and spans[-1][0] == len(prompt)


def test_last_assistant_prefix_of_a_chat_ending_in_a_user_turn(llama3):
    prompt = last_assistant_prefix(SIX_TURNS[:5], llama3)
    assert prompt.endswith("Thanks!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_last_assistant_prefix_drops_the_last_answer(mistral):
    prompt = last_assistant_prefix(SIX_TURNS, mistral)
    assert prompt.endswith("[INST] Thanks! [/INST]") and "welcome" not in prompt


def test_last_assistant_prefix_after_a_tool_result_answers_it(chatml):
    prompt = last_assistant_prefix(TOOL_CHAT[:4], chatml)
    assert prompt.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_generation_blocks_that_skip_turns_fall_back_to_the_prefix_way(chatml, chatml_generation):
    import copy

    tok = copy.deepcopy(chatml_generation)
    # Only the last answer in a block: the mask cannot say where the earlier ones are.
    tok.chat_template = CHATML.replace(
        "{{- '<|im_start|>assistant\\n' }}{%- if message.content %}",
        "{{- '<|im_start|>assistant\\n' }}{%- if loop.last %}{%- generation %}{{- message.content ~ '<|im_end|>' }}"
        "{%- endgeneration %}{{- '\\n' }}{%- else %}{%- if message.content %}",
    ).replace("{{- '<|im_end|>\\n' }}{%- elif", "{{- '<|im_end|>\\n' }}{%- endif %}{%- elif")
    assert "{%- generation %}" in tok.chat_template
    assert tok.apply_chat_template(SIX_TURNS, tokenize=False) == chatml.apply_chat_template(SIX_TURNS, tokenize=False)
    assert render_chat(SIX_TURNS, tok) == render_chat(SIX_TURNS, chatml)
