"""Work per record is bounded by --max-length, not by the record's size (issue 13 §2).

A 100 MB record used to kill the teacher (the whole text was tokenized with offsets before the
cut), and every rerun died on it. Stage 1 now tokenizes growing prefixes until they hold what
``--max-length`` keeps; the tokens kept are exactly those of the whole text. Records longer than
``--max-chars`` characters are skipped before any tokenizing and counted in the manifest (the
default limit where no context length bounds the work).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import make_config
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.pipeline.offsets import (
    PREFIX_MARGIN_TOKENS,
    encode_prefix_with_offsets,
    encode_suffix_with_offsets,
    encode_with_offsets,
)
from logitcache.pipeline.records import TextTemplate
from logitcache.pipeline.teacher.run import TOO_LONG, UNBOUNDED_MAX_CHARS, TeacherConfig, part_name, run_teacher
from logitcache.storage import load_manifest, open_cache
from logitcache.storage.merge import merge_caches


def _stdlib_text(chars: int) -> str:
    """Real text that ships with Python: the standard library's source."""
    out, n = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        n += len(text)
        if n >= chars:
            break
    return "".join(out)[:chars]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from logitcache.pipeline.tiny import generate_corpus, load_mistral_tokenizer, mistral_model_file, train_bpe_tokenizer
    from logitcache.pipeline.tiny import train_unigram_tokenizer

    corpus = generate_corpus(1000, 0)
    out = {"bpe": train_bpe_tokenizer(corpus, 512), "unigram": train_unigram_tokenizer(corpus, 400)}
    if mistral_model_file() is not None and importlib.util.find_spec("sentencepiece") is not None:
        out["mistral"] = load_mistral_tokenizer(tmp_path_factory.mktemp("mistral"))
    return out


@pytest.mark.parametrize("name", ["bpe", "unigram", "mistral"])
@pytest.mark.parametrize("max_tokens", [1, 7, 100, 1000])
def test_the_kept_tokens_are_the_whole_texts(tokenizers, name, max_tokens):
    if name not in tokenizers:
        pytest.skip("the Mistral tokenizer needs mistral_common and sentencepiece")
    tok = tokenizers[name]
    text = _stdlib_text(200_000)
    whole_ids, whole_s, whole_e = encode_with_offsets(tok, text)

    ids, starts, ends = encode_prefix_with_offsets(tok, text, max_tokens)

    assert max_tokens + PREFIX_MARGIN_TOKENS < len(ids) < len(whole_ids)  # a prefix, not all of it
    assert ids[:max_tokens] == whole_ids[:max_tokens]
    assert (starts[:max_tokens] == whole_s[:max_tokens]).all() and (ends[:max_tokens] == whole_e[:max_tokens]).all()


def _mixed_text(chars: int) -> str:
    """Accents, CJK and emoji between the ASCII: characters that tokenize into several tokens."""
    from logitcache.pipeline.tiny import generate_corpus

    return ("\n".join(generate_corpus(chars // 40, 5)) + " 東京は日本の首都です。🎉👍🏽 naïve")[-chars:]


@pytest.fixture(scope="module")
def whole(tokenizers):
    """(tokenizer name, text kind) -> (text, its whole tokenization): tokenized once per module."""
    texts = {"stdlib": _stdlib_text(200_000), "mixed": _mixed_text(100_000)}
    return {(name, kind): (text, encode_with_offsets(tok, text)) for name, tok in tokenizers.items()
            for kind, text in texts.items()}


@pytest.mark.parametrize("name", ["bpe", "unigram", "mistral"])
@pytest.mark.parametrize("kind", ["stdlib", "mixed"])
@pytest.mark.parametrize("max_tokens", [1, 7, 100, 1000])
def test_the_kept_end_is_the_whole_texts(tokenizers, whole, name, kind, max_tokens):
    """--truncate-prompts: the end of a prompt, tokenized alone, is the whole prompt cut from the left."""
    if name not in tokenizers:
        pytest.skip("the Mistral tokenizer needs mistral_common and sentencepiece")
    text, (whole_ids, whole_s, whole_e) = whole[name, kind]

    ids, starts, ends = encode_suffix_with_offsets(tokenizers[name], text, max_tokens)

    assert ids == whole_ids[-max_tokens:]
    assert (starts == whole_s[-max_tokens:]).all() and (ends == whole_e[-max_tokens:]).all()


def test_the_end_of_a_short_text_is_cut_from_its_whole_tokenization(tokenizers):
    tok = tokenizers["bpe"]
    ids, starts, ends = encode_with_offsets(tok, "a short text")

    got_ids, got_s, got_e = encode_suffix_with_offsets(tok, "a short text", 2)

    assert got_ids == ids[-2:] and (got_s == starts[-2:]).all() and (got_e == ends[-2:]).all()


def test_a_short_text_or_no_limit_is_tokenized_whole(tokenizers):
    tok = tokenizers["bpe"]
    for text, limit in [("a short text", 1000), (_stdlib_text(5000), None)]:
        got, want = encode_prefix_with_offsets(tok, text, limit), encode_with_offsets(tok, text)
        assert got[0] == want[0] and (got[1] == want[1]).all() and (got[2] == want[2]).all()


def _cli_limited(args: list[str], memory_bytes: int, timeout: int) -> subprocess.CompletedProcess:
    """The real console script under an address-space limit (RLIMIT_AS)."""
    limit = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({memory_bytes}, {memory_bytes})); "
             "sys.argv = ['logitcache', *sys.argv[1:]]; runpy.run_module('logitcache', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", limit, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.mark.parametrize("megabytes", [10, pytest.param(100, marks=pytest.mark.slow)])
def test_a_huge_record_is_cut_at_max_length_within_4_gb(tmp_path, teacher_dir, megabytes):
    from logitcache.storage import open_cache, verify_cache

    data = tmp_path / "data.jsonl"
    chunk = _stdlib_text(1 << 20)
    huge = (chunk * (megabytes + 1))[: megabytes << 20]
    with data.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a small record first."}) + "\n")
        f.write(json.dumps({"text": huge}) + "\n")
        f.write(json.dumps({"text": "and a small one after."}) + "\n")
    out = tmp_path / "cache"

    r = _cli_limited(["teacher", "--model", str(teacher_dir), "--data", str(data), "--out", str(out),
                      "--text-field", "text", "--top-k", "4", "--max-length", "256", "--no-progress"],
                     memory_bytes=4 << 30, timeout=600)

    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["text"][:20]: row for row in open_cache(out).iter_rows()}
    assert len(rows) == 3
    cut = rows[huge[:20]]
    assert cut["truncated"] and len(cut["input_ids"]) == 256 and huge.startswith(cut["text"])
    assert verify_cache(out).ok


# --- --truncate-prompts -------------------------------------------------------------------------

ROOM = 56  # --max-length 64 less --max-new-tokens 8: the prompt tokens that fit


def _prompts_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return path


def test_a_prompt_cut_from_the_left_is_the_whole_prompts_end(tmp_path, teacher_dir):
    from transformers import AutoTokenizer

    from logitcache.pipeline.teacher.engine import GenerationConfig

    prompts = [_stdlib_text(3000), _mixed_text(2000), "a short prompt:"]
    cfg = make_config(teacher_dir, _prompts_file(tmp_path / "p.jsonl", prompts), tmp_path / "c", mode="generate",
                      template=TextTemplate(prompt_field="prompt"), max_length=64, truncate_prompts=True,
                      generation=GenerationConfig(max_new_tokens=8, temperature=0.0))

    run_teacher(cfg, progress=False)

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    kept = sorted(row["text"][: row["prompt_chars"]] for row in open_cache(tmp_path / "c"))
    expected = []
    for prompt in prompts:  # tokenized whole, cut to ROOM - 1 tokens (the prompt's BOS is the last one)
        ids, starts, _ = encode_with_offsets(tok, prompt)
        expected.append(prompt[int(starts[len(ids) - ROOM + 1]):] if len(ids) > ROOM else prompt)
    assert kept == sorted(expected)


def test_cutting_a_long_prompt_tokenizes_only_its_ends(tmp_path, teacher_dir, monkeypatch):
    """What the 4 GB test below checks by the process's fate, checked here by the texts tokenized."""
    import logitcache.pipeline.offsets as offsets
    import logitcache.pipeline.teacher.run as run
    from logitcache.pipeline.teacher.engine import GenerationConfig

    tokenized: list[int] = []
    encode = offsets.encode_with_offsets

    def spy(tok, text, **kw):
        tokenized.append(len(text))
        return encode(tok, text, **kw)

    monkeypatch.setattr(offsets, "encode_with_offsets", spy)
    monkeypatch.setattr(run, "encode_with_offsets", spy)
    cfg = make_config(teacher_dir, _prompts_file(tmp_path / "p.jsonl", [_stdlib_text(2 << 20)]), tmp_path / "c",
                      mode="generate", template=TextTemplate(prompt_field="prompt"), max_length=64,
                      truncate_prompts=True, generation=GenerationConfig(max_new_tokens=8, temperature=0.0))

    r = run_teacher(cfg, progress=False)

    assert r.written == 1 and max(tokenized) < 50_000  # of 2 MiB


# A teacher process starts in about 10 s here: the default suite keeps the in-process check above.
@pytest.mark.slow
@pytest.mark.parametrize("megabytes", [10, 100])
def test_a_huge_prompt_is_cut_from_the_left_within_4_gb(tmp_path, teacher_dir, megabytes):
    chunk = _stdlib_text(1 << 20)
    huge = (chunk * (megabytes + 1))[-(megabytes << 20):]
    data = _prompts_file(tmp_path / "p.jsonl", ["a small prompt:", huge])
    out = tmp_path / "cache"

    r = _cli_limited(["teacher", "--model", str(teacher_dir), "--data", str(data), "--out", str(out), "--mode", "generate",
                      "--prompt-field", "prompt", "--top-k", "4", "--max-length", "64", "--max-new-tokens", "8",
                      "--temperature", "0", "--truncate-prompts", "--no-progress"],
                     memory_bytes=4 << 30, timeout=600)

    assert r.returncode == 0, r.stderr[-2000:]
    (cut,) = [row for row in open_cache(out) if row["truncated"] and row["prompt_chars"] > 20]
    assert huge.endswith(cut["text"][: cut["prompt_chars"]])


# --- --max-chars ------------------------------------------------------------------------------

LIMIT = 1000
TEXTS = ["a short record.", "x" * 5000, "another short record.", "y " * 600, "and a third.", "z" * 1001]
LONG_IDS = {"r1", "r3", "r5"}


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("long") / "data.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def _capped(teacher_dir, data, out, **kw) -> TeacherConfig:
    return make_config(teacher_dir, data, out, template=TextTemplate(text_field="text"), max_chars=LIMIT, **kw)


@pytest.fixture(scope="module")
def capped_cli(tmp_path_factory, teacher_dir, long_data):
    """`logitcache teacher --max-chars 1000` over three short records and three long ones."""
    out = tmp_path_factory.mktemp("capped") / "cache"
    r = CliRunner().invoke(app, ["teacher", "--model", str(teacher_dir), "--data", str(long_data), "--out", str(out),
                                 "--text-field", "text", "--top-k", "4", "--max-chars", str(LIMIT), "--no-progress"])
    assert r.exit_code == 0, r.output
    return r, out


def _skips_and_rows(cache: Path) -> tuple[dict, set]:
    return load_manifest(cache).skipped, {row["id"] for row in open_cache(cache).iter_rows(columns=["id"])}


def test_records_over_max_chars_are_skipped_and_the_others_written(capped_cli):
    _, out = capped_cli
    skipped, rows = _skips_and_rows(out)
    assert skipped == {rid: TOO_LONG for rid in LONG_IDS}
    assert rows == {"r0", "r2", "r4"}


def test_the_manifest_records_the_limit_and_the_cache_is_complete(capped_cli):
    m = load_manifest(capped_cli[1])
    assert m.max_chars == LIMIT and m.status == "complete"


def test_the_summary_and_inspect_count_them(capped_cli):
    r, out = capped_cli
    assert f"skipped 3 {TOO_LONG} (1,000 characters)" in r.output
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and f"3 (3 {TOO_LONG})" in shown.output


def test_a_long_record_is_never_tokenized(tmp_path, teacher_dir, long_data, monkeypatch):
    import logitcache.pipeline.teacher.run as run

    seen: list[int] = []
    encode = run.encode_prefix_with_offsets
    monkeypatch.setattr(run, "encode_prefix_with_offsets", lambda tok, text, *a, **kw: seen.append(len(text)) or encode(tok, text, *a, **kw))

    run_teacher(_capped(teacher_dir, long_data, tmp_path / "c"), progress=False)

    assert len(seen) == 3 and max(seen) <= LIMIT


def test_a_resumed_run_and_a_split_run_skip_what_one_run_skips(tmp_path, teacher_dir, long_data, capped_cli):
    resumed = tmp_path / "resumed"
    run_teacher(_capped(teacher_dir, long_data, resumed, limit=2), progress=False)
    run_teacher(_capped(teacher_dir, long_data, resumed), progress=False)
    parts = tmp_path / "parts"
    for i in range(2):
        run_teacher(_capped(teacher_dir, long_data, parts, num_workers=2, worker_index=i), progress=False)
    merge_caches(tmp_path / "merged", [parts / part_name(i, 2) for i in range(2)])

    one_run = _skips_and_rows(capped_cli[1])
    assert _skips_and_rows(resumed) == one_run and _skips_and_rows(tmp_path / "merged") == one_run


def test_the_default_limit_holds_only_where_no_context_length_bounds_the_work():
    cfg = TeacherConfig(model="m", data="d", out="o")
    assert cfg.effective_max_chars(max_length=None) == UNBOUNDED_MAX_CHARS
    assert cfg.effective_max_chars(max_length=512) is None  # records are cut to 512 tokens instead
    assert TeacherConfig(model="m", data="d", out="o", max_chars=50).effective_max_chars(512) == 50
