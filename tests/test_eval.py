"""`eval`: bits per character and exact match, checked against slow token-by-token references."""

import json
import math

import pytest
import torch

from logitcache.pipeline.student.evaluate import EvalConfig, evaluate
from logitcache.pipeline.teacher.data import TextTemplate

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
        ids = enc["input_ids"]
        for j in range(1, len(ids)):
            if enc["offset_mapping"][j][0] >= len(prompt):
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


def test_cli_eval_on_missing_model_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from logitcache.cli import app

    data = _write(tmp_path / "d.jsonl", PAIRS)
    r = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "nope"), "--data", str(data)])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output


def test_demo_runs_end_to_end_at_toy_size(tmp_path):
    """The main job, shrunk: teacher, one cache, five students, the table."""
    from typer.testing import CliRunner

    from logitcache.cli import app

    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--examples", "24", "--eval-examples", "8",
                                 "--teacher-steps", "3", "--student-steps", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    table = (out / "results.md").read_text().splitlines()
    names = [line.split("|")[1].strip() for line in table[2:]]
    assert names == ["teacher", "sft-bpe", "kl-bpe", "sft-sp", "uld-sp", "mlot-sp"]
    assert "OK " in r.output  # the cache verified
