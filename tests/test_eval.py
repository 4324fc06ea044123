"""`eval`: bits per character and exact match, checked against slow token-by-token references."""

import json
import math
import re

import pytest
import torch

from logitcache.pipeline.student.evaluate import EvalConfig, evaluate
from logitcache.pipeline.records import TextTemplate

PAIRS = [("Q: What is 3 plus 4?\nA:", " 3 plus 4 is 7."), ("Say something:\n", "Café à 東京 🎉")]


@pytest.fixture(scope="module")
def model_and_tok(teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval(), AutoTokenizer.from_pretrained(teacher_dir)


def _write(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return path


def test_bits_per_char_equals_a_token_by_token_reference(tmp_path, teacher_dir, model_and_tok):
    model, tok = model_and_tok
    nll, chars = 0.0, 0
    for prompt, response in PAIRS:
        text = prompt + response
        enc = tok(text, return_offsets_mapping=True)
        ids = enc["input_ids"] + [tok.eos_token_id]  # the end of the answer is scored too
        for j in range(1, len(ids)):
            if j == len(ids) - 1 or enc["offset_mapping"][j][1] > len(prompt):
                # a response token: one unpadded forward over the prefix, the slow way
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids[:j]])).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, -1)[ids[j]])
        chars += len(response)
    r = evaluate(EvalConfig(model=str(teacher_dir), data=str(_write(tmp_path / "d.jsonl", PAIRS)),
                            template=TextTemplate(prompt_field="prompt", response_field="response"), accuracy=False))
    assert r.chars == chars
    assert r.bits_per_char == pytest.approx(nll / math.log(2) / chars, rel=1e-4)


def test_exact_match_counts_greedy_continuations(tmp_path, teacher_dir, model_and_tok):
    model, tok = model_and_tok
    prompt = "Q: What is the capital of Genovia?\nA:"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # greedy, one token at a time
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    greedy = tok.decode(ids[0, -6:].tolist(), skip_special_tokens=True)
    pairs = [(prompt, greedy), (prompt, greedy + " certainly not generated")]
    r = evaluate(EvalConfig(model=str(teacher_dir), data=str(_write(tmp_path / "d.jsonl", pairs)),
                            template=TextTemplate(prompt_field="prompt", response_field="response"), max_new_tokens=6))
    assert (r.answered, r.correct) == (2, 1)


def test_cli_eval_prints_bits_per_char_and_accuracy(tmp_path, teacher_dir):
    from typer.testing import CliRunner

    from logitcache.cli import app

    data = _write(tmp_path / "d.jsonl", PAIRS)
    r = CliRunner().invoke(app, ["eval", "--model", str(teacher_dir), "--data", str(data), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["examples"] == 2 and res["answered"] == 2 and res["bits_per_char"] > 0
    assert 0 <= res["exact_match"] <= res["accuracy"]  # an exact match is also a prefix match


def test_cli_eval_logs_progress_on_stderr_and_keeps_stdout_for_the_result(tmp_path, teacher_dir):
    from typer.testing import CliRunner

    from logitcache.cli import app

    data = _write(tmp_path / "d.jsonl", [(f"Q{i}: What is {i} plus 4?\nA:", f" {i + 4}.") for i in range(8)])
    r = CliRunner().invoke(app, ["eval", "--model", str(teacher_dir), "--data", str(data), "--json",
                                 "--batch-size", "2", "--log-every", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["examples"] == 8
    lines = r.stderr.splitlines()
    assert lines[0] == "eval loss: 0/8 examples (0%), elapsed 0:00"
    assert re.fullmatch(r"eval loss: 4/8 examples \(50%\), \d+\.\d{4} bits/char, elapsed \d+:\d\d, ETA ~\d+:\d\d", lines[2])
    assert re.fullmatch(r"eval loss: 8/8 examples in \d+:\d\d, \d+\.\d{4} bits/char", lines[4])
    assert lines[5] == "eval answers: 0/8 examples (0%), elapsed 0:00"
    assert re.fullmatch(r"eval answers: 8/8 examples in \d+:\d\d, \d+\.\d% exact match", lines[-1]) and len(lines) == 10


def test_cli_eval_on_missing_model_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from logitcache.cli import app

    data = _write(tmp_path / "d.jsonl", PAIRS)
    r = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "nope"), "--data", str(data)])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output


# The demo's end-to-end test lives in tests/test_demo.py.


def test_a_token_straddling_the_boundary_is_scored_with_its_characters(tmp_path):
    """A byte-level ':\n' covering the prompt's ':' and the response's '\n' is scored; the characters
    counted run from its start (one prompt character more than the response)."""
    from test_align_cases import llama3_style_bpe
    from transformers import AutoModelForCausalLM

    from logitcache.pipeline.tiny import build_tiny_model, generate_corpus

    tok = llama3_style_bpe(generate_corpus(2000, 0))
    model = build_tiny_model(tok).eval()
    tok.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    prompt, response = "Answer:", "\nYes, it is the capital."
    enc = tok(prompt + response, return_offsets_mapping=True)
    ids = enc["input_ids"] + [tok.eos_token_id]
    first = next(j for j, (s, e) in enumerate(enc["offset_mapping"]) if e > len(prompt))
    assert tok.convert_ids_to_tokens(ids[first]) == ":Ċ" and enc["offset_mapping"][first][0] == len(prompt) - 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    nll = -sum(float(logp[j - 1, ids[j]]) for j in range(first, len(ids)))  # ':\n' onwards, EOS included
    r = evaluate(EvalConfig(model=str(tmp_path / "m"), data=str(_write(tmp_path / "d.jsonl", [(prompt, response)])),
                            template=TextTemplate(prompt_field="prompt", response_field="response"), accuracy=False))
    assert r.chars == len(response) + 1
    assert r.bits_per_char == pytest.approx(nll / math.log(2) / r.chars, rel=1e-4)


class _Scripted:
    """A stand-in model whose greedy continuation is given: generate() appends it to every prompt."""

    def __init__(self, continuation):
        self.continuation = continuation

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        new = torch.tensor(self.continuation[:max_new_tokens]).repeat(input_ids.shape[0], 1)
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("continuation, reference, prefix, exact", [
    ("Pyrus.", "Pyrus.", True, False),  # the right answer, but it does not stop
    ("Pyrus.</s>", "Pyrus.", True, True),  # the answer, then EOS
    ("Pyrus. And</s>", "Pyrus.", True, False),  # goes on, then stops
    ("Pyrus.</s>", "Pyrus.</s>\n", False, True),  # a chat template's end of turn rendered in the reference
], ids=["no-stop", "stops", "talks-on", "chat-reference"])
def test_exact_match_needs_the_answer_and_the_stop(model_and_tok, continuation, reference, prefix, exact):
    from logitcache.pipeline.student.evaluate import EvalResult, _greedy_batch

    _, tok = model_and_tok
    ids = tok(continuation, add_special_tokens=False)["input_ids"]
    result = EvalResult(examples=1, chars=0, nll_nats=0.0, answered=0, correct=0)
    _greedy_batch(_Scripted(ids), tok, [("Q: capital of Genovia?\nA: ", reference)], True, 16, "cpu", result)
    assert (result.answered, result.correct, result.exact) == (1, int(prefix), int(exact))
