"""Generate mode: the teacher writes the response, and its own distribution along it is stored."""

import json

import numpy as np
import pytest
from conftest import make_config

from logitcache import LogitCacheError, open_cache, verify_cache
from logitcache.pipeline.records import TextTemplate
from logitcache.pipeline.teacher.engine import GenerationConfig
from logitcache.pipeline.teacher.run import run_teacher


def _gen_config(teacher_dir, data, out, **kw):
    base = dict(mode="generate", template=TextTemplate(prompt_field="prompt"), generation=GenerationConfig(max_new_tokens=12, temperature=0.0))
    base.update(kw)
    return make_config(teacher_dir, data, out, **base)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, teacher_dir, data_file):
    out = tmp_path_factory.mktemp("gen") / "cache"
    r = run_teacher(_gen_config(teacher_dir, data_file, out), progress=False)
    return out, r


def test_rows_are_prompt_plus_the_teachers_response(generated, data_file):
    out, r = generated
    prompts = {json.loads(l)["id"]: json.loads(l)["prompt"] for l in data_file.read_text().splitlines()}
    rows = list(open_cache(out))
    assert r.written + sum(r.skipped.values()) == 24 and r.written > 0
    for row in rows:
        assert row["text"].startswith(prompts[row["id"]])
        assert row["prompt_chars"] == len(prompts[row["id"]])
        assert len(row["text"]) > row["prompt_chars"]  # a response was written
    assert verify_cache(out).ok


def test_manifest_records_the_generation_settings(generated):
    m = open_cache(generated[0]).manifest
    assert m.mode == "generate"
    assert m.generation == {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def test_rescoring_the_generated_text_gives_the_same_numbers(generated, teacher_dir, tmp_path):
    out, _ = generated
    rows = {r["id"]: r for r in open_cache(out)}
    data = tmp_path / "rescore.jsonl"
    data.write_text("".join(
        json.dumps({"id": rid, "prompt": r["text"][: r["prompt_chars"]], "response": r["text"][r["prompt_chars"]:]}) + "\n"
        for rid, r in rows.items()
    ))
    scored = tmp_path / "scored"
    run_teacher(make_config(teacher_dir, data, scored), progress=False)
    eos = open_cache(out).manifest.eos_id
    for row in open_cache(scored):
        g = rows[row["id"]]
        assert row["text"] == g["text"] and row["prompt_chars"] == g["prompt_chars"]
        # A response cut at max_new_tokens has no end; score mode ends the same text with EOS.
        n = len(g["input_ids"])
        assert row["input_ids"][-1] == eos and len(row["input_ids"]) == n + (g["input_ids"][-1] != eos)
        np.testing.assert_array_equal(row["input_ids"][:n], g["input_ids"])
        np.testing.assert_array_equal(row["topk_ids"][: n - 1], g["topk_ids"])
        np.testing.assert_allclose(row["topk_logprobs"][: n - 1].astype(float), g["topk_logprobs"].astype(float), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(row["label_logprob"][: n - 1], g["label_logprob"], rtol=1e-5, atol=1e-5)


def test_a_response_cut_at_max_new_tokens_gets_no_end_and_is_flagged(generated):
    """The teacher did not stop there: no EOS is appended, and the row says it was cut."""
    out, r = generated
    eos = open_cache(out).manifest.eos_id
    assert eos is not None
    cut = [row for row in open_cache(out) if row["input_ids"][-1] != eos]
    assert cut and r.unfinished == len(cut)  # the random tiny teacher rarely stops within 12 tokens
    assert all(row["truncated"] for row in cut)
    assert verify_cache(out).ok


def test_sampling_is_stored_at_temperature_one(teacher_dir, data_file, tmp_path):
    """Sampling at T=2 changes which text is written, not the numbers stored along it: they are
    the model's own temperature-1 distribution, as a direct scoring of the same tokens gives."""
    from logitcache.pipeline.teacher.hf import HFTeacher

    out = tmp_path / "hot"
    gen = GenerationConfig(max_new_tokens=8, temperature=2.0, seed=3)
    run_teacher(_gen_config(teacher_dir, data_file, out, generation=gen, limit=6), progress=False)
    engine = HFTeacher(str(teacher_dir), dtype="float32", device="cpu")
    rows = list(open_cache(out))
    assert rows
    for row in rows:
        (direct,) = engine.score([row["input_ids"].tolist()], k=row["topk_ids"].shape[1])
        np.testing.assert_array_equal(row["topk_ids"], direct.topk_ids)
        np.testing.assert_allclose(row["label_logprob"], direct.label_logprob, rtol=1e-5, atol=1e-5)


def test_empty_prompts_are_skipped_and_counted(teacher_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Q: What is 3 plus 4?\nA:", "", "  ", "Say something:\n"]))
    r = run_teacher(_gen_config(teacher_dir, data, tmp_path / "c"), progress=False)
    assert r.skipped.get("empty prompt") == 2 and r.written + sum(r.skipped.values()) == 4


def test_prompts_too_long_are_skipped_or_truncated_on_request(teacher_dir, data_file, tmp_path):
    r = run_teacher(_gen_config(teacher_dir, data_file, tmp_path / "skip", max_length=20), progress=False)
    assert r.skipped.get("prompt too long", 0) > 0 and r.written + sum(r.skipped.values()) == 24
    t = run_teacher(_gen_config(teacher_dir, data_file, tmp_path / "cut", max_length=20, truncate_prompts=True), progress=False)
    assert "prompt too long" not in t.skipped and t.truncated > 0
    assert all(len(row["input_ids"]) <= 20 for row in open_cache(tmp_path / "cut"))


def test_generate_mode_refuses_a_response_field(teacher_dir, data_file, tmp_path):
    with pytest.raises(LogitCacheError, match="drop --response-field"):
        run_teacher(_gen_config(teacher_dir, data_file, tmp_path / "c", template=TextTemplate(prompt_field="prompt", response_field="response")), progress=False)


def test_max_new_tokens_must_leave_room_for_the_prompt(teacher_dir, data_file, tmp_path):
    with pytest.raises(LogitCacheError, match="leaves no room"):
        run_teacher(_gen_config(teacher_dir, data_file, tmp_path / "c", max_length=10, generation=GenerationConfig(max_new_tokens=10)), progress=False)
    assert not (tmp_path / "c").exists()
