"""Bad input, command by command: one line that names the problem, no traceback, nothing written.

The table covers teacher, inspect, verify, merge, train, eval and demo: wrong paths, a
directory or a file where the other is expected, empty files, lines that are not JSON or not
UTF-8, missing fields, wrong types, zero/negative/huge/non-numeric numbers, unknown names,
mismatched caches, parts and students, bad --config files. Every case below is something a user can type or a file a user can hand over. For each, the
command must exit non-zero and print exactly one line, ``error: ...``, on stderr, that names
the problem (the table lists the words it must contain); it prints no traceback (that is what
``--debug`` is for) and leaves no output a reader could take for a result: nothing is created
under the test's directory and the inputs are untouched.

Usage errors that click/typer find while parsing (a missing option, ``--top-k abc``) follow the
same rule: ``logitcache`` prints them as one ``error:`` line (exit 2) instead of click's boxed
usage panel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from logitcache.cli import app

runner = CliRunner()


# --- the inputs -----------------------------------------------------------------------------


@dataclass
class Inputs:
    """What the cases point at. ``bad`` holds the broken files (module-wide, read-only)."""

    bad: Path
    teacher: Path  # a tiny Llama with a byte-level BPE tokenizer (vocab 512, 512 positions)
    data: Path  # 24 good records: id, prompt, response, text, messages
    cache: Path  # a finished cache of ``data`` by ``teacher``, k=8
    other_student: Path  # a tiny Llama with a SentencePiece-style tokenizer (another vocabulary)
    parts: Path  # the two complete parts of a cluster run by ``teacher``
    mixed_parts: Path  # part-00000-of-00002 by ``teacher``, part-00001-of-00002 by a GPT-2 teacher


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _bad_files(root: Path) -> Path:
    _write(root / "empty.jsonl", "")
    _write(root / "not-json.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    _write(root / "a-list.jsonl", '{"text": "fine"}\n[1, 2, 3]\n')
    _write(root / "missing-text.jsonl", '{"text": "one"}\n{"body": "two"}\n{"text": "three"}\n')
    _write(root / "number-text.jsonl", '{"text": 5}\n{"text": 6}\n')
    _write(root / "long-id.jsonl", '{"id": "short", "text": "one"}\n{"id": "' + "x" * 70_000 + '", "text": "two"}\n')
    _write(root / "latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    _write(root / "latin1.txt", b"a good line\nna\xefve line\n")
    _write(root / "latin1.csv", b"text\ngood\nbad \xff\n")
    _write(root / "notes.xyz", "text\n")
    (root / "empty-dir").mkdir()
    _write(root / "mixed-dir" / "a.jsonl", "".join(f'{{"text": "json {i}"}}\n' for i in range(4)))
    _write(root / "mixed-dir" / "b.csv", "text\n" + "".join(f"csv {i}\n" for i in range(4)))
    _write(root / "no-data-dir" / "README", "no data files here\n")
    _write(root / "not-a-model" / "notes.txt", "not a model\n")
    _write(root / "a-file", "just a file\n")
    _write(root / "not-a-cache" / "notes.txt", "precious\n")
    _write(root / "unknown-key.yaml", "lerning_rate: 0.1\n")
    _write(root / "not-yaml.yaml", "loss: [uld\n")
    _write(root / "a-list.yaml", "- uld\n- kl\n")
    _write(root / "bad-type.yaml", "batch_size: many\n")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, teacher_dir, gpt2_teacher_dir, data_file, built_cache) -> Inputs:
    from conftest import make_config

    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import run_teacher
    from logitcache.pipeline.tiny import (
        TinyModelConfig,
        build_tiny_model,
        generate_corpus,
        train_metaspace_bpe_tokenizer,
    )

    root = tmp_path_factory.mktemp("bad-inputs")
    bad = _bad_files(root / "bad")

    other = root / "other-student"
    tok = train_metaspace_bpe_tokenizer(generate_corpus(300, 7), 300)
    tok.save_pretrained(other)
    build_tiny_model(tok, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2)).save_pretrained(other)

    small = _write(root / "small.jsonl", "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(4)))

    def part(teacher, out, index):
        cfg = make_config(teacher, small, out, template=TextTemplate(text_field="text"), num_workers=2, worker_index=index)
        run_teacher(cfg, progress=False)

    for index in range(2):
        part(teacher_dir, root / "parts", index)
    part(teacher_dir, root / "mixed-parts", 0)
    part(gpt2_teacher_dir, root / "mixed-parts", 1)
    return Inputs(bad, teacher_dir, data_file, built_cache, other, root / "parts", root / "mixed-parts")


# --- the cases ------------------------------------------------------------------------------


def teacher(i: Inputs, out: Path, *extra, data=None, model=None):
    return ["teacher", "--model", model or i.teacher, "--data", data or i.data, "--out", out,
            "--prompt-field", "prompt", "--response-field", "response", "--top-k", 8, "--no-progress", *extra]


def text_teacher(i: Inputs, out: Path, data: Path):
    return ["teacher", "--model", i.teacher, "--data", data, "--out", out, "--top-k", 8, "--no-progress"]


def train(i: Inputs, out: Path, *extra, student=None, cache=None):
    return ["train", "--student", student or i.teacher, "--cache", cache or i.cache, "--out", out,
            "--max-steps", 1, "--batch-size", 2, "--no-progress", *extra]


def eval_(i: Inputs, *extra, model=None, data=None):
    return ["eval", "--model", model or i.teacher, "--data", data or i.data,
            "--prompt-field", "prompt", "--response-field", "response", "--limit", 2, *extra]


def own_parts(i: Inputs, o: Path) -> Path:
    """A private copy of the good parts (for a case that may write into them)."""
    import shutil

    return Path(shutil.copytree(i.parts, o / "parts"))


# (id, args from (inputs, a fresh directory for outputs), words the error line must hold)
CASES = [
    # teacher: the data
    pytest.param(lambda i, o: teacher(i, o / "c", data=i.bad / "nope.jsonl"), ["nope.jsonl", "no such file"], id="teacher-data-missing"),
    # a relative path that is also a valid hub id by its characters: the suffix keeps it a path
    pytest.param(lambda i, o: teacher(i, o / "c", data="./nope/missing.jsonl"), ["./nope/missing.jsonl", "no such file"], id="teacher-data-missing-relative"),
    pytest.param(lambda i, o: teacher(i, o / "c", data=i.bad / "empty.jsonl"), ["empty.jsonl", "empty"], id="teacher-data-empty-file"),
    pytest.param(lambda i, o: teacher(i, o / "c", data=i.bad / "empty-dir"), ["empty-dir", "no data files"], id="teacher-data-empty-dir"),
    pytest.param(lambda i, o: teacher(i, o / "c", data=i.bad / "no-data-dir"), ["no-data-dir", "no data files"], id="teacher-data-dir-without-data"),
    pytest.param(lambda i, o: teacher(i, o / "c", data=i.bad / "notes.xyz"), ["notes.xyz", "unknown file type"], id="teacher-data-unknown-type"),
    pytest.param(lambda i, o: text_teacher(i, o / "c", i.bad / "mixed-dir"), ["mixed-dir", "mixes data formats", "a.jsonl", "b.csv"], id="teacher-data-dir-of-two-formats"),
    pytest.param(lambda i, o: text_teacher(i, o / "c", i.bad / "not-json.jsonl"), ["line 2", "not valid JSON"], id="teacher-data-invalid-json-line"),
    pytest.param(lambda i, o: text_teacher(i, o / "c", i.bad / "a-list.jsonl"), ["line 2", "JSON list", "object"], id="teacher-data-json-line-not-object"),
    pytest.param(lambda i, o: text_teacher(i, o / "c", i.bad / "missing-text.jsonl"), ["record 2", "'text'", "missing"], id="teacher-data-line-missing-text"),
    pytest.param(lambda i, o: text_teacher(i, o / "c", i.bad / "long-id.jsonl"), ["record 2", "--id-field 'id'", "70,000 bytes"], id="teacher-data-id-too-long"),
    pytest.param(lambda i, o: text_teacher(i, o / "c", i.bad / "number-text.jsonl"), ["'text'", "int64", "expected text"], id="teacher-data-text-is-a-number"),
    pytest.param(lambda i, o: text_teacher(i, o / "c", i.bad / "latin1.jsonl"), ["latin1.jsonl", "line 2", "UTF-8", "byte"], id="teacher-data-invalid-utf8-jsonl"),
    pytest.param(lambda i, o: text_teacher(i, o / "c", i.bad / "latin1.txt"), ["latin1.txt", "line 2", "UTF-8", "byte"], id="teacher-data-invalid-utf8-txt"),
    pytest.param(lambda i, o: text_teacher(i, o / "c", i.bad / "latin1.csv"), ["latin1.csv", "line 3", "UTF-8", "byte"], id="teacher-data-invalid-utf8-csv"),
    pytest.param(lambda i, o: teacher(i, o / "c") + ["--text-field", "body"], ["give one way"], id="teacher-two-templates"),
    pytest.param(lambda i, o: ["teacher", "--model", i.teacher, "--data", i.data, "--out", o / "c", "--text-field", "body"], ["'body'", "no such field"], id="teacher-unknown-field"),
    # teacher: the model and the output
    pytest.param(lambda i, o: teacher(i, o / "c", model=i.bad / "no-model"), ["no-model", "no such directory"], id="teacher-model-missing"),
    pytest.param(lambda i, o: teacher(i, o / "c", model=i.bad / "not-a-model"), ["not-a-model", "could not load"], id="teacher-model-not-a-model"),
    pytest.param(lambda i, o: teacher(i, o / "c", model=i.bad / "a-file"), ["a-file", "could not load"], id="teacher-model-is-a-file"),
    pytest.param(lambda i, o: teacher(i, i.bad / "a-file"), ["a-file", "is a file"], id="teacher-out-is-a-file"),
    pytest.param(lambda i, o: teacher(i, i.bad / "not-a-cache"), ["not empty", "holds no cache"], id="teacher-out-holds-other-files"),
    pytest.param(lambda i, o: teacher(i, i.bad / "a-file" / "cache"), ["a-file", "not a directory"], id="teacher-out-under-a-file"),
    # teacher: numbers and names
    pytest.param(lambda i, o: teacher(i, o / "c", "--top-k", 0), ["--top-k", "positive"], id="teacher-top-k-zero"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--top-k", -3), ["--top-k", "positive"], id="teacher-top-k-negative"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--top-k", 100_000), ["--top-k 100000", "exceeds", "512"], id="teacher-top-k-above-vocab"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--top-k", "many"), ["--top-k", "valid integer", "logitcache teacher --help"], id="teacher-top-k-not-a-number"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--batch-size", 0), ["--batch-size", "positive"], id="teacher-batch-size-zero"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--max-length", -1), ["--max-length", "at least 2"], id="teacher-max-length-negative"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--limit", -1), ["--limit", "0 or more"], id="teacher-limit-negative"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--max-chars", 0), ["--max-chars", "positive"], id="teacher-max-chars-zero"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--max-chars", -5), ["--max-chars", "positive"], id="teacher-max-chars-negative"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--shard-size-mb", 0), ["--shard-size-mb", "positive"], id="teacher-shard-size-zero"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--shard-size-mb", "inf"), ["--shard-size-mb", "positive"], id="teacher-shard-size-infinite"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--num-parts", 0), ["--num-parts", "at least 1"], id="teacher-num-parts-zero"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--num-parts", 2, "--part-index", 2), ["--part-index 2", "outside 0..1"], id="teacher-part-index-out-of-range"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--num-parts", 2, "--num-workers", 2), ["--num-workers", "old name", "--num-parts only"], id="teacher-old-and-new-split-flags"),
    # teacher --ray: refused before Ray starts
    pytest.param(lambda i, o: teacher(i, o / "c", "--ray", "--num-parts", 0), ["--num-parts", "at least 1"], id="teacher-ray-num-parts-zero"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--ray"), ["--ray needs --num-parts"], id="teacher-ray-without-num-parts"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--ray", "--num-parts", 2, "--part-index", 1), ["--ray", "--part-index", "drop it"], id="teacher-ray-with-part-index"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--num-parts", 2, "--part-index", 1, "--gpus-per-part", 1), ["--gpus-per-part", "add --ray"], id="teacher-ray-flag-without-ray"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--ray", "--num-parts", 2, "--gpus-per-part", 2), ["--gpus-per-part 2", "one GPU per part"], id="teacher-ray-hf-two-gpus"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--ray", "--num-parts", 2, "--part-retries", -1), ["--part-retries", "0 or more"], id="teacher-ray-negative-retries"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--ray", "--num-parts", 2, "--limit", 4), ["--limit", "partial", "--num-parts 1"], id="teacher-ray-limit"),
    pytest.param(lambda i, o: teacher(i, i.bad / "not-a-cache", "--ray", "--num-parts", 2), ["not-a-cache", "not empty", "new or empty --out"], id="teacher-ray-out-not-empty"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--engine", "tensorrt"), ["--engine", "'tensorrt'", "hf"], id="teacher-unknown-engine"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--codec", "zip"), ["codec", "'zip'", "v1"], id="teacher-unknown-codec"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--mode", "chat"), ["--mode", "'chat'"], id="teacher-unknown-mode"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--dtype", "int8"), ["--dtype", "int8"], id="teacher-unknown-dtype"),
    pytest.param(lambda i, o: ["teacher", "--data", i.data, "--out", o / "c"], ["missing --model", "--config"], id="teacher-no-model"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--config", i.bad / "unknown-key.yaml"), ["unknown-key.yaml", "unknown keys", "lerning_rate", "top_k"], id="teacher-config-unknown-key"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--config", i.bad / "not-yaml.yaml"), ["not-yaml.yaml", "not valid YAML"], id="teacher-config-not-yaml"),
    pytest.param(lambda i, o: teacher(i, o / "c", "--log-every", -1), ["--log-every", "0 or more"], id="teacher-log-every-negative"),
    # inspect
    pytest.param(lambda i, o: ["inspect", i.bad / "nowhere"], ["nowhere", "no such cache directory"], id="inspect-missing-dir"),
    pytest.param(lambda i, o: ["inspect", i.bad / "a-file"], ["a-file", "no such cache directory"], id="inspect-a-file"),
    pytest.param(lambda i, o: ["inspect", i.bad / "empty-dir"], ["empty-dir", "not a logitcache cache"], id="inspect-empty-dir"),
    pytest.param(lambda i, o: ["inspect", i.bad / "not-a-cache"], ["not-a-cache", "not a logitcache cache"], id="inspect-not-a-cache"),
    pytest.param(lambda i, o: ["inspect", i.parts], ["split teacher run", "2 parts of 2", "`logitcache merge MERGED_DIR ", "parts`"], id="inspect-directory-of-parts"),
    pytest.param(lambda i, o: ["inspect", i.cache, "--example", "no-such-id"], ["no-such-id"], id="inspect-unknown-example"),
    pytest.param(lambda i, o: ["inspect", i.cache, "--tokens", -1], ["--tokens", "positive"], id="inspect-tokens-negative"),
    pytest.param(lambda i, o: ["inspect", i.cache, "--stats", "--limit", 0], ["--limit"], id="inspect-limit-zero"),
    pytest.param(lambda i, o: ["inspect", i.cache, "--plot", o / "stats.txt"], ["--plot", "stats.txt", ".png"], id="inspect-plot-unknown-suffix"),
    pytest.param(lambda i, o: ["inspect", i.cache, "--plot", i.bad / "nowhere" / "stats.png"], ["--plot", "nowhere"], id="inspect-plot-into-a-missing-dir"),
    pytest.param(lambda i, o: ["inspect", i.cache, "--ids", "--stats"], ["--ids", "--stats"], id="inspect-ids-with-stats"),
    pytest.param(lambda i, o: ["inspect", i.cache, "--student", i.bad / "no-student"], ["no-student"], id="inspect-student-missing"),
    pytest.param(lambda i, o: ["inspect", "foo://bucket/cache"], ["foo://bucket/cache", "unknown protocol foo://"], id="inspect-unknown-protocol"),
    # verify
    pytest.param(lambda i, o: ["verify", "foo://bucket/cache"], ["foo://bucket/cache", "unknown protocol foo://"], id="verify-unknown-protocol"),
    pytest.param(lambda i, o: ["verify", i.bad / "nowhere"], ["nowhere"], id="verify-missing-dir"),
    pytest.param(lambda i, o: ["verify", i.bad / "a-file"], ["a-file"], id="verify-a-file"),
    pytest.param(lambda i, o: ["verify", i.bad / "empty-dir"], ["empty-dir", "not a logitcache cache"], id="verify-empty-dir"),
    pytest.param(lambda i, o: ["verify", i.bad / "not-a-cache"], ["not-a-cache", "not a logitcache cache"], id="verify-not-a-cache"),
    pytest.param(lambda i, o: ["verify", i.parts], ["split teacher run", "2 parts of 2", "`logitcache merge MERGED_DIR ", "parts`"], id="verify-directory-of-parts"),
    pytest.param(lambda i, o: ["verify", i.cache, "--log-every", -1], ["--log-every", "0 or more"], id="verify-log-every-negative"),
    # convert
    pytest.param(lambda i, o: ["convert", i.cache, o / "c", "--codec", "zip"], ["--codec", "'zip'", "v1"], id="convert-unknown-codec"),
    pytest.param(lambda i, o: ["convert", i.bad / "not-a-cache", o / "c", "--codec", "compact"], ["not-a-cache", "not a logitcache cache"], id="convert-not-a-cache"),
    pytest.param(lambda i, o: ["convert", i.parts, o / "c", "--codec", "compact"], ["split teacher run", "`logitcache merge MERGED_DIR "], id="convert-directory-of-parts"),
    pytest.param(lambda i, o: ["convert", i.cache, i.bad / "not-a-cache", "--codec", "compact"], ["not-a-cache"], id="convert-out-holds-other-files"),
    # merge
    pytest.param(lambda i, o: ["merge", o / "merged"], ["Missing argument 'parts'"], id="merge-no-parts"),
    pytest.param(lambda i, o: ["merge", o / "merged", i.bad / "nowhere"], ["nowhere", "neither"], id="merge-part-missing"),
    pytest.param(lambda i, o: ["merge", o / "merged", i.bad / "empty-dir"], ["empty-dir", "neither"], id="merge-part-not-a-cache"),
    pytest.param(lambda i, o: ["merge", o / "merged", i.mixed_parts], ["teacher"], id="merge-parts-of-different-teachers"),
    pytest.param(lambda i, o: ["merge", own_parts(i, o) / "part-00000-of-00002" / "merged", o / "parts"], ["inside"], id="merge-out-inside-a-part"),
    pytest.param(lambda i, o: ["merge", i.bad / "a-file", i.mixed_parts], ["a-file", "is a file"], id="merge-out-is-a-file"),
    pytest.param(lambda i, o: ["merge", i.bad / "a-file" / "merged", i.parts], ["a-file", "not a directory"], id="merge-out-under-a-file"),
    # train
    pytest.param(lambda i, o: train(i, o / "run", cache=i.bad / "nowhere"), ["nowhere", "no such cache directory"], id="train-cache-missing"),
    pytest.param(lambda i, o: train(i, o / "run", cache=i.bad / "not-a-cache"), ["not-a-cache", "not a logitcache cache"], id="train-cache-not-a-cache"),
    pytest.param(lambda i, o: train(i, o / "run", cache=i.parts), ["split teacher run", "`logitcache merge MERGED_DIR ", "parts`"], id="train-cache-directory-of-parts"),
    pytest.param(lambda i, o: train(i, o / "run", student=i.bad / "no-student"), ["no-student", "no such directory"], id="train-student-missing"),
    pytest.param(lambda i, o: train(i, o / "run", student=i.bad / "not-a-model"), ["not-a-model", "could not load"], id="train-student-not-a-model"),
    pytest.param(lambda i, o: train(i, o / "run", "--loss", "kl", student=i.other_student), ["--loss kl", "vocabulary"], id="train-kl-student-of-another-vocabulary"),
    pytest.param(lambda i, o: train(i, o / "run", "--loss", "mse"), ["--loss", "'mse'"], id="train-unknown-loss"),
    pytest.param(lambda i, o: train(i, o / "run", cache="foo://bucket/cache"), ["foo://bucket/cache", "unknown protocol foo://"], id="train-cache-unknown-protocol"),
    pytest.param(lambda i, o: train(i, o / "run", "--alignment", "diagonal"), ["--alignment", "'diagonal'"], id="train-unknown-alignment"),
    pytest.param(lambda i, o: train(i, i.bad / "a-file" / "run"), ["a-file", "not a directory"], id="train-out-under-a-file"),
    pytest.param(lambda i, o: train(i, o / "run", "--lr", -0.1), ["--learning-rate", "positive"], id="train-lr-negative"),
    pytest.param(lambda i, o: train(i, o / "run", "--lr", "nan"), ["--learning-rate", "positive"], id="train-lr-nan"),
    pytest.param(lambda i, o: ["train", "--student", i.teacher, "--cache", i.cache, "--out", o / "run", "--num-epochs", 0], ["--num-epochs"], id="train-epochs-zero"),
    pytest.param(lambda i, o: train(i, o / "run", "--batch-size", 0), ["--batch-size", "positive"], id="train-batch-size-zero"),
    pytest.param(lambda i, o: train(i, o / "run", "--max-length", 1), ["--max-length", "at least 2"], id="train-max-length-one"),
    pytest.param(lambda i, o: train(i, o / "run", "--kd-weight", -1), ["--kd-weight", "0 or more"], id="train-kd-weight-negative"),
    pytest.param(lambda i, o: train(i, o / "run", "--fused-linear", "yes"), ["--fused-linear 'yes'", "auto, on or off"], id="train-fused-linear-unknown"),
    pytest.param(lambda i, o: train(i, o / "run", "--fused-linear", "on", "--loss", "kl", "--kd-chunk-size", 16), ["--fused-linear on", "reads the logits"], id="train-fused-linear-on-kd-chunk-size"),
    pytest.param(lambda i, o: train(i, o / "run", "--config", i.bad / "unknown-key.yaml"), ["unknown-key.yaml", "unknown keys", "lerning_rate"], id="train-config-unknown-key"),
    pytest.param(lambda i, o: train(i, o / "run", "--config", i.bad / "not-yaml.yaml"), ["not-yaml.yaml", "not valid YAML"], id="train-config-not-yaml"),
    pytest.param(lambda i, o: train(i, o / "run", "--config", i.bad / "bad-type.yaml"), ["bad-type.yaml", "batch_size", "'many'", "whole number"], id="train-config-wrong-type"),
    pytest.param(lambda i, o: train(i, o / "run", "--config", i.bad / "a-list.yaml"), ["a-list.yaml", "mapping"], id="train-config-not-a-mapping"),
    pytest.param(lambda i, o: train(i, o / "run", "--config", i.bad / "empty-dir"), ["empty-dir", "no such file"], id="train-config-is-a-directory"),
    pytest.param(lambda i, o: ["train", "--cache", i.cache, "--out", o / "run"], ["missing", "--student"], id="train-no-student"),
    pytest.param(lambda i, o: train(i, o / "run", "--log-every", -1), ["--log-every", "0 or more"], id="train-log-every-negative"),
    pytest.param(lambda i, o: train(i, o / "run", "--report-to", "nope"), ["--report-to", "'nope'", "tensorboard"], id="train-unknown-tracker"),
    pytest.param(lambda i, o: train(i, o / "run", "--deepspeed", i.bad / "unknown-key.yaml"), ["--deepspeed", "pip install deepspeed"], id="train-deepspeed-missing"),
    pytest.param(lambda i, o: train(i, o / "run", "--fsdp-config", i.bad / "unknown-key.yaml"), ["--fsdp-config", "--fsdp"], id="train-fsdp-config-without-fsdp"),
    pytest.param(lambda i, o: train(i, o / "run", "--follow", "--follow-poll", 0), ["--follow-poll", "positive"], id="train-follow-poll-zero"),
    pytest.param(lambda i, o: train(i, o / "run", "--follow", "--follow-timeout", -1), ["--follow-timeout", "positive"], id="train-follow-timeout-negative"),
    pytest.param(lambda i, o: train(i, o / "run", "--follow", "--cache", i.cache), ["--follow", "several --cache"], id="train-follow-several-caches"),
    # caches on URLs: copy, push, pull, and the commands that write
    pytest.param(lambda i, o: teacher(i, "foo://bucket/cache"), ["foo://bucket/cache", "unknown protocol foo://"], id="teacher-out-unknown-protocol"),
    pytest.param(lambda i, o: teacher(i, "foo://bucket/cache", "--ray", "--num-parts", 2), ["foo://bucket/cache", "unknown protocol foo://"], id="teacher-ray-out-unknown-protocol"),
    pytest.param(lambda i, o: ["copy", i.bad / "not-a-cache", o / "c"], ["not-a-cache", "not a logitcache cache"], id="copy-not-a-cache"),
    pytest.param(lambda i, o: ["copy", i.cache, "foo://bucket/cache"], ["unknown protocol foo://"], id="copy-unknown-protocol"),
    pytest.param(lambda i, o: ["copy", i.cache, i.bad / "not-a-cache"], ["not-a-cache", "not empty and holds no cache"], id="copy-into-other-files"),
    pytest.param(lambda i, o: ["push", i.cache, "gs://bucket/cache"], ["gcsfs", "pip install 'logitcache[gcs]'"], id="push-missing-extra"),
    pytest.param(lambda i, o: ["push", "foo://bucket/cache", "hf://datasets/me/cache"], ["push uploads a local cache", "logitcache copy"], id="push-remote-source"),
    pytest.param(lambda i, o: ["pull", "foo://bucket/cache", o / "c"], ["unknown protocol foo://"], id="pull-unknown-protocol"),
    pytest.param(lambda i, o: ["merge", "foo://bucket/merged", i.parts], ["unknown protocol foo://"], id="merge-out-unknown-protocol"),
    pytest.param(lambda i, o: ["convert", i.cache, "foo://bucket/c", "--codec", "compact"], ["unknown protocol foo://"], id="convert-out-unknown-protocol"),
    # eval
    pytest.param(lambda i, o: eval_(i, model=i.bad / "no-model"), ["no-model", "no such directory"], id="eval-model-missing"),
    pytest.param(lambda i, o: eval_(i, data=i.bad / "nope.jsonl"), ["nope.jsonl", "no such file"], id="eval-data-missing"),
    pytest.param(lambda i, o: ["eval", "--model", i.teacher, "--data", i.bad / "latin1.jsonl"], ["latin1.jsonl", "line 2", "UTF-8"], id="eval-data-invalid-utf8"),
    pytest.param(lambda i, o: ["eval", "--model", i.teacher, "--data", i.bad / "missing-text.jsonl"], ["record 2", "'text'", "missing"], id="eval-data-line-missing-text"),
    pytest.param(lambda i, o: eval_(i, "--batch-size", 0), ["--batch-size", "positive"], id="eval-batch-size-zero"),
    pytest.param(lambda i, o: eval_(i, "--limit", -2), ["--limit", "0 or more"], id="eval-limit-negative"),
    pytest.param(lambda i, o: eval_(i, "--max-new-tokens", 0), ["--max-new-tokens", "positive"], id="eval-max-new-tokens-zero"),
    # demo
    pytest.param(lambda i, o: ["demo", "--out", o / "demo", "--examples", 0], ["--examples", "at least 1"], id="demo-examples-zero"),
    pytest.param(lambda i, o: ["demo", "--out", o / "demo", "--student-steps", -5], ["--student-steps", "at least 1"], id="demo-student-steps-negative"),
    pytest.param(lambda i, o: ["demo", "--out", o / "demo", "--top-k", 8], ["--top-k 8", "50", "--teacher-only"], id="demo-top-k-too-small-for-mlot"),
]


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots; for files also size and mtime (a lock file that comes and
    goes may touch a directory's mtime: that is no output)."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
        for root in roots for p in sorted(root.rglob("*"))
    }


def _invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("build, words", CASES)
def test_bad_input_is_one_line_and_writes_nothing(build, words, inputs, tmp_path):
    args = build(inputs, tmp_path)  # may set up inputs under tmp_path: snapshot after
    before = _snapshot(tmp_path, inputs.bad, inputs.parts, inputs.mixed_parts)

    r = _invoke(args)

    assert r.exit_code not in (0, None), r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # nothing escaped
    assert "Traceback" not in r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    assert _snapshot(tmp_path, inputs.bad, inputs.parts, inputs.mixed_parts) == before  # nothing written, nothing touched


def test_debug_shows_the_traceback_of_the_same_case(tmp_path):
    """The one-line case ``inspect <missing dir>``, run for real: with --debug the traceback is there."""
    missing = tmp_path / "nowhere"
    cmd = [sys.executable, "-m", "logitcache"]
    plain = subprocess.run([*cmd, "inspect", str(missing)], capture_output=True, text=True, timeout=120, check=False)
    debug = subprocess.run([*cmd, "--debug", "inspect", str(missing)], capture_output=True, text=True, timeout=120, check=False)

    assert plain.returncode == 2 and plain.stderr.strip() == f"error: {missing}: no such cache directory; check the path."
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "LogitCacheError: " in debug.stderr and "no such cache directory" in debug.stderr


# --- the checks behind some of the cases -------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 2, 3, 7, 1 << 22])
def test_utf8_check_names_the_same_place_whatever_the_block_size(tmp_path, block_size):
    from logitcache.errors import LogitCacheError
    from logitcache.pipeline.records import check_utf8

    f = _write(tmp_path / "d.jsonl", "ok\ncafé 東京\n".encode() + b'{"t": "na\xefve"}\n')
    with pytest.raises(LogitCacheError) as e:
        check_utf8(f, "d.jsonl", block_size=block_size)
    assert str(e.value).startswith("d.jsonl: line 3 is not valid UTF-8 (byte 0xef at byte 10 of the line, offset 25 in the file)")


def test_utf8_check_passes_any_valid_text(tmp_path):
    from logitcache.pipeline.records import check_utf8

    check_utf8(_write(tmp_path / "d.txt", "é\n東京 👍🏽\u2581\x00\n" * 50), "d.txt", block_size=5)


def test_records_missing_a_field_are_found_before_any_is_read(inputs):
    """run_teacher calls this before it opens --out: one pass over the Arrow table, no record read."""
    from logitcache.errors import LogitCacheError
    from logitcache.pipeline.records import (
        TextTemplate,
        check_records,
        load_records,
    )

    ds = load_records(str(inputs.bad / "missing-text.jsonl"))
    with pytest.raises(LogitCacheError, match=r"^record 2: field 'text' is missing"):
        check_records(ds, TextTemplate(text_field="text"))
    ds = load_records(str(inputs.bad / "number-text.jsonl"))
    with pytest.raises(LogitCacheError, match=r"^--text-field 'text' holds int64 values, expected text"):
        check_records(ds, TextTemplate(text_field="text"))


def test_a_directory_of_one_format_is_read_whole(tmp_path):
    from logitcache.pipeline.records import load_records

    for name in ("a.jsonl", "b.jsonl", "sub/c.json"):
        _write(tmp_path / "d" / name, "".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(4)))
    _write(tmp_path / "d" / ".cache" / "x.csv", "text\nignored: hidden\n")  # hidden: not data

    ds = load_records(str(tmp_path / "d"))

    assert len(ds) == 12


def test_config_values_are_read_by_their_field_types(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string: it must reach the optimizer as a number."""
    from logitcache.pipeline.student.train import load_config_file

    f = _write(tmp_path / "c.yaml", "learning_rate: 1e-4\nweight_decay: 1e-2\nmax_steps: 100.0\nsave_total_limit: null\n")

    got = load_config_file(f)

    assert got == {"learning_rate": 1e-4, "weight_decay": 1e-2, "max_steps": 100, "save_total_limit": None}
    assert [type(v) for v in got.values()] == [float, float, int, type(None)]
