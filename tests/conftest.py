"""Fixtures: tiny teachers, tokenizers and data, built once per session, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("LOGITCACHE_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A random tiny Llama with a byte-level BPE tokenizer (vocab 512)."""
    from logitcache.pipeline.tiny import build_tiny_teacher

    return build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "llama", train_steps=0)


@pytest.fixture(scope="session")
def gpt2_teacher_dir(tmp_path_factory) -> Path:
    """The same tokenizer with a tiny GPT-2: a second architecture for the engine."""
    from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_teacher

    return build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "gpt2", model_cfg=TinyModelConfig(arch="gpt2"))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """24 records with id, prompt, response, text and messages fields (ASCII, accents, CJK, emoji)."""
    from logitcache.pipeline.tiny import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "train.jsonl", n=24, seed=3)


def make_config(teacher: Path, data: Path, out: Path, **overrides):
    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import TeacherConfig

    kwargs = dict(
        model=str(teacher), data=str(data), out=str(out), top_k=8, batch_size=4,
        template=TextTemplate(prompt_field="prompt", response_field="response"),
        shard_bytes=6_000,  # several shards from 24 examples
    )
    kwargs.update(overrides)
    return TeacherConfig(**kwargs)


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    """A finished cache of the 24 records, k=8, several shards. Copy it before damaging it."""
    from logitcache.pipeline.teacher.run import run_teacher

    out = tmp_path_factory.mktemp("cache") / "cache"
    run_teacher(make_config(teacher_dir, data_file, out), progress=False)
    return out


@pytest.fixture
def cache_copy(built_cache, tmp_path) -> Path:
    """A private copy of ``built_cache`` that a test may modify."""
    import shutil

    dst = tmp_path / "cache"
    shutil.copytree(built_cache, dst)
    return dst


@pytest.fixture(scope="session")
def student(tmp_path_factory, built_cache) -> Path:
    """A tiny student (1 layer, hidden 32) sharing the teacher's tokenizer."""
    from transformers import AutoTokenizer

    from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_model

    out = tmp_path_factory.mktemp("student") / "tiny"
    tok = AutoTokenizer.from_pretrained(built_cache / "tokenizer")
    build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=1)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def metaspace_student(tmp_path_factory) -> Path:
    """A tiny student with a tokenizer of its own (Metaspace BPE): another vocabulary than the teacher's."""
    from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_model, generate_corpus, train_metaspace_bpe_tokenizer

    tok = train_metaspace_bpe_tokenizer(generate_corpus(2000, 7), 400)
    out = tmp_path_factory.mktemp("student") / "metaspace"
    build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, seed=1)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def other_teacher_cache(tmp_path_factory, data_file) -> Path:
    """The built_cache's 24 records from a second teacher with another tokenizer (unigram, 350 pieces)."""
    from logitcache.pipeline.teacher.run import run_teacher
    from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_teacher, generate_corpus, train_unigram_tokenizer

    tok = train_unigram_tokenizer(generate_corpus(2000, 11), 350)
    teacher = build_tiny_teacher(tmp_path_factory.mktemp("teacher") / "unigram", tokenizer=tok,
                                 model_cfg=TinyModelConfig(seed=5))
    out = tmp_path_factory.mktemp("cache") / "other-teacher"
    run_teacher(make_config(teacher, data_file, out), progress=False)
    return out


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 API on loopback (moto's standalone server), for the whole session.

    The environment points every s3fs client (ours, and the console script's in a subprocess)
    at it through fsspec's FSSPEC_S3_ENDPOINT_URL, with throwaway credentials.
    """
    import logging

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read its environment at import
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
    """A fresh, empty bucket on the loopback S3 server: ``s3://<name>``."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def assert_same_rows(cache: Path, single: Path) -> None:
    """``cache`` holds exactly the examples of ``single`` (one uninterrupted run), row for row, in
    any order: what a split, merged or resumed run must give."""
    import numpy as np

    from logitcache import open_cache

    want = {row["id"]: row for row in open_cache(single)}
    got = {row["id"]: row for row in open_cache(cache)}
    assert got.keys() == want.keys()
    for rid, row in got.items():
        np.testing.assert_array_equal(row["input_ids"], want[rid]["input_ids"])
        np.testing.assert_array_equal(row["topk_ids"], want[rid]["topk_ids"])
        # batches are made up differently in the two runs: fp32 results move by an ulp
        np.testing.assert_allclose(row["label_logprob"], want[rid]["label_logprob"], rtol=1e-5, atol=1e-6)
