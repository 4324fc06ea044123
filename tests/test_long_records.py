"""Work per record is bounded by --max-length, not by the record's size (issue 13 §2).

A 100 MB record used to kill the teacher (the whole text was tokenized with offsets before the
cut), and every rerun died on it. Stage 1 now tokenizes growing prefixes until they hold what
``--max-length`` keeps; the tokens kept are exactly those of the whole text.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from logitcache.pipeline.offsets import PREFIX_MARGIN_TOKENS, encode_prefix_with_offsets, encode_with_offsets


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
