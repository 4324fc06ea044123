"""LogitCacheDataset: order, shuffle, DDP split, dataloader workers, memory, resume, integrity.

Most tests read ``built_cache`` (24 examples, 6 row groups of 3 to 5 rows in 3 shards) in raw
mode (no student tokenizer), so they look at example ids only. ``cache23`` holds 23 examples,
so that no world size from 2 to 5 divides it.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from conftest import make_config
from logitcache.errors import LogitCacheError
from logitcache.pipeline.student import dataset as dataset_module
from logitcache.pipeline.student.dataset import LogitCacheDataset
from logitcache.storage import CacheReader, load_manifest

N = 24


@pytest.fixture(scope="module")
def cache23(tmp_path_factory, teacher_dir, data_file) -> Path:
    from logitcache.pipeline.teacher.run import run_teacher

    out = tmp_path_factory.mktemp("cache23") / "cache"
    run_teacher(make_config(teacher_dir, data_file, out, limit=23, shard_bytes=4_000), progress=False)
    return out


@pytest.fixture(scope="module")
def student_tokenizer():
    from logitcache.pipeline.tiny import generate_corpus, train_unigram_tokenizer

    return train_unigram_tokenizer(generate_corpus(2000, 7), 400)


def ids(examples) -> list[str]:
    return [ex["id"] for ex in examples]


def cache_order(cache: Path) -> list[str]:
    return list(CacheReader(cache).ids())


def row_group_sizes(cache: Path) -> list[int]:
    return [
        pq.ParquetFile(cache / s.path).metadata.row_group(g).num_rows
        for s in load_manifest(cache).shards
        for g in range(pq.ParquetFile(cache / s.path).num_row_groups)
    ]


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """Rows decoded so far, one entry per row-group read (in this process)."""
    seen: list[int] = []
    original = LogitCacheDataset._read_piece

    def counting(self, piece):
        table = original(self, piece)
        seen.append(table.num_rows)
        return table

    monkeypatch.setattr(LogitCacheDataset, "_read_piece", counting)
    return seen


def consume(ds: LogitCacheDataset, m: int) -> list[str]:
    """Take ``m`` examples as a training loop would, reporting each one consumed."""
    taken = []
    for ex in ds:
        if len(taken) == m:
            break
        taken.append(ex["id"])
        ds.mark_consumed([ex["_worker"]], [ex["_index"]])
    return taken


# --- order -----------------------------------------------------------------------------


def test_raw_rows_without_shuffle_come_once_in_cache_order(built_cache):
    ds = LogitCacheDataset(built_cache, shuffle=False)

    examples = list(ds)

    assert ids(examples) == cache_order(built_cache)
    assert len(ds) == N
    assert [ex["_index"] for ex in examples] == list(range(N))
    assert {ex["_worker"] for ex in examples} == {0}
    assert examples[0]["topk_ids"].shape[1] == 8  # raw cache rows


def test_shuffle_permutes_every_example_differently_per_seed_and_epoch(built_cache):
    def order(seed: int, epoch: int) -> list[str]:
        ds = LogitCacheDataset(built_cache, shuffle_buffer=8, seed=seed)
        ds.set_epoch(epoch)
        return ids(ds)

    base = order(0, 0)

    assert sorted(base) == sorted(cache_order(built_cache))
    assert base != cache_order(built_cache)
    assert order(0, 0) == base
    assert order(0, 1) != base
    assert order(1, 0) != base


# --- DDP split -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*not complete")  # cache23 stopped at --limit
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("which", ["built_cache", "cache23"])
def test_ranks_get_equal_counts_covering_all_examples_with_wrap_around_padding(
    request, reads, which, world, shuffle
):
    cache = request.getfixturevalue(which)
    n = len(cache_order(cache))
    per_rank = math.ceil(n / world)
    pad = per_rank * world - n
    # The epoch's global order: units in epoch order, rows within them (a 1-row buffer keeps it).
    global_order = ids(LogitCacheDataset(cache, shuffle=shuffle, shuffle_buffer=1, seed=3))

    got, reads_per_rank = [], []
    for rank in range(world):
        ds = LogitCacheDataset(cache, shuffle=shuffle, shuffle_buffer=4, seed=3, rank=rank, world_size=world)
        before = len(reads)
        examples = ids(ds)
        reads_per_rank.append(len(reads) - before)
        assert len(examples) == len(ds) == per_rank
        got += examples

    counts = Counter(got)
    assert set(counts) == set(global_order)
    assert sorted(i for i, c in counts.items() if c > 1) == sorted(global_order[:pad])  # none when n % world == 0
    assert max(counts.values()) <= 2
    # Each rank reads only its block: fewer row groups than the cache has; a row group on a
    # block boundary is read twice, and the padding rereads the first one.
    units = len(row_group_sizes(cache))
    assert all(r < units for r in reads_per_rank)
    assert sum(reads_per_rank) <= units + (world - 1) + (pad > 0)


def test_a_partial_cache_is_read_with_a_warning(cache23):
    with pytest.warns(UserWarning, match="not complete"):
        ds = LogitCacheDataset(cache23, shuffle=False)

    assert ids(ds) == cache_order(cache23)


def test_rank_without_world_size_is_refused(built_cache):
    with pytest.raises(LogitCacheError, match="rank and world_size"):
        LogitCacheDataset(built_cache, rank=1)


# --- dataloader workers ----------------------------------------------------------------


def test_two_dataloader_workers_share_the_examples_without_loss_or_repeat(built_cache):
    ds = LogitCacheDataset(built_cache, shuffle_buffer=4)

    examples = list(DataLoader(ds, batch_size=None, num_workers=2))

    assert sorted(ids(examples)) == sorted(cache_order(built_cache))
    assert {ex["_worker"] for ex in examples} == {0, 1}
    for w in (0, 1):
        assert sorted(ex["_index"] for ex in examples if ex["_worker"] == w) == list(
            range(sum(ex["_worker"] == w for ex in examples))
        )


def test_two_ranks_with_two_workers_each_cover_every_example_once(built_cache):
    got = []
    for rank in range(2):
        ds = LogitCacheDataset(built_cache, shuffle_buffer=4, rank=rank, world_size=2)
        got += ids(DataLoader(ds, batch_size=None, num_workers=2))

    assert sorted(got) == sorted(cache_order(built_cache))


def test_a_dataloader_with_another_number_of_workers_than_declared_is_refused(built_cache):
    ds = LogitCacheDataset(built_cache, num_workers=1)

    assert "num_workers=1" in first_error(DataLoader(ds, batch_size=None, num_workers=2))


def first_error(loader) -> str:
    try:
        next(iter(loader))
    except LogitCacheError as e:
        # Drop the traceback: it holds the loader's iterator in a reference cycle, and a
        # late garbage collection shuts its workers down only after join timeouts (10 s).
        e.__traceback__ = None
        return str(e)
    return ""


# --- memory ----------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_streaming_holds_at_most_one_row_group_plus_the_buffer(built_cache, reads, shuffle):
    buffer = 5
    largest = max(row_group_sizes(built_cache))
    ds = LogitCacheDataset(built_cache, shuffle=shuffle, shuffle_buffer=buffer)

    held = []  # rows decoded but not yet handed out, at every step
    for yielded, _ in enumerate(ds, start=1):
        held.append(sum(reads) - yielded)

    assert sum(reads) == N  # every row group decoded once
    assert max(held) <= (buffer if shuffle else 0) + largest
    if shuffle:
        assert max(held) >= buffer  # the bound is not vacuous: the buffer does fill


# --- resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0, 1, 7, 16, 23, 24])
def test_resume_continues_the_interrupted_epoch_exactly(built_cache, m):
    def make():
        ds = LogitCacheDataset(built_cache, shuffle_buffer=5, seed=11)
        ds.set_epoch(2)
        return ds

    uninterrupted = ids(make())
    first = make()
    head = consume(first, m)

    resumed = make()
    resumed.load_state_dict(first.state_dict())
    rest = list(resumed)

    assert head + ids(rest) == uninterrupted
    assert [ex["_index"] for ex in rest] == list(range(m, N))


def test_resume_with_two_dataloader_workers_continues_each_workers_stream(built_cache):
    def loader(ds):
        return DataLoader(ds, batch_size=3, num_workers=2, collate_fn=list)

    def make():
        return LogitCacheDataset(built_cache, shuffle_buffer=5, seed=5)

    uninterrupted = [ex["id"] for batch in loader(make()) for ex in batch]

    first = make()
    head = []
    for step, batch in enumerate(loader(first)):
        if step == 2:  # an even number of batches: the loader's worker turn starts again at 0
            break
        head += ids(batch)
        first.mark_consumed([ex["_worker"] for ex in batch], [ex["_index"] for ex in batch])
    state = first.state_dict()

    resumed = make()
    resumed.load_state_dict(state)
    rest = [ex["id"] for batch in loader(resumed) for ex in batch]

    assert state["consumed"] == {0: 3, 1: 3}
    assert head + rest == uninterrupted


def test_resume_does_not_featurize_the_skipped_examples(built_cache, student_tokenizer):
    first = LogitCacheDataset(built_cache, student_tokenizer, shuffle_buffer=5)
    consume(first, 10)

    resumed = LogitCacheDataset(built_cache, student_tokenizer, shuffle_buffer=5)
    resumed.load_state_dict(first.state_dict())
    assert len(list(resumed)) == N - 10

    assert resumed.featurizer_stats()["examples"] == N - 10


@pytest.mark.parametrize("key,other", [("world_size", dict(rank=0, world_size=2)), ("seed", dict(seed=1))])
def test_a_state_from_another_world_size_or_seed_is_refused(built_cache, key, other):
    first = LogitCacheDataset(built_cache)
    consume(first, 3)

    with pytest.raises(LogitCacheError, match=key):
        LogitCacheDataset(built_cache, **other).load_state_dict(first.state_dict())


def test_a_state_from_another_number_of_workers_is_refused(built_cache):
    state = LogitCacheDataset(built_cache, num_workers=2).state_dict()

    with pytest.raises(LogitCacheError, match="num_workers"):
        LogitCacheDataset(built_cache, num_workers=1).load_state_dict(state)


def test_a_new_epoch_forgets_the_consumed_examples(built_cache):
    ds = LogitCacheDataset(built_cache)
    consume(ds, 5)

    ds.set_epoch(0)
    assert ds.state_dict()["consumed"] == {0: 5}
    ds.set_epoch(1)
    assert ds.state_dict()["consumed"] == {}
    assert len(list(ds)) == N


# --- student features ------------------------------------------------------------------


def test_student_mode_yields_training_features(built_cache, student_tokenizer):
    ds = LogitCacheDataset(built_cache, student_tokenizer, max_length=64)

    examples = list(ds)

    assert sorted(ids(examples)) == sorted(cache_order(built_cache))
    ex = examples[0]
    assert {"input_ids", "labels", "teacher_logprobs", "teacher_ids", "kd_mask", "_worker", "_index"} <= ex.keys()
    n = len(ex["input_ids"])
    assert ex["teacher_logprobs"].shape == ex["teacher_ids"].shape == (n, 8)
    assert ds.featurizer_stats()["examples"] == N
    assert LogitCacheDataset(built_cache).featurizer_stats() is None


# --- cache integrity -------------------------------------------------------------------


def test_not_a_cache_is_refused(tmp_path):
    with pytest.raises(LogitCacheError, match="not a logitcache cache"):
        LogitCacheDataset(tmp_path)


def test_a_corrupted_shard_is_refused_before_the_first_example(cache_copy):
    shard = cache_copy / load_manifest(cache_copy).shards[1].path
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # inside the first column chunk; the footer still reads
    shard.write_bytes(bytes(data))

    with pytest.raises(LogitCacheError, match=f"{shard.name}.*logitcache verify.*--skip-bad-shards"):
        LogitCacheDataset(cache_copy, shuffle=False)


@pytest.mark.parametrize("verify", [True, False])
def test_shards_are_hashed_once_per_process_and_only_when_asked(cache_copy, monkeypatch, verify):
    hashed = []
    from logitcache.storage import integrity

    # (the cache's tokenizer files are hashed through the same function: not counted here)
    monkeypatch.setattr(integrity, "sha256_file", lambda p: (Path(p).suffix == ".parquet" and hashed.append(p)) or _sha(p))
    ds = LogitCacheDataset(cache_copy, verify_shards=verify)

    list(ds), list(ds)

    assert len(hashed) == (len(load_manifest(cache_copy).shards) if verify else 0)


def _sha(path):
    from logitcache.storage.fsutil import sha256_file

    return sha256_file(path)


# --- the cache's tokenizer: read once per process, again when a file changes ----------------------


def test_the_cache_tokenizer_is_read_once_for_the_datasets_and_the_featurizer(cache_copy, student_tokenizer, monkeypatch):
    """Training builds up to three datasets over one cache (train, eval, the alignment check), and
    the featurizer loads the tokenizer's byte lengths: one hashing and one parse serve them all."""
    from logitcache.pipeline.student.dataset import aligned_fraction
    from logitcache.storage import integrity

    hashed, parsed = [], []
    problems, size = integrity.tokenizer_problems, integrity.tokenizer_json_size
    monkeypatch.setattr(integrity, "tokenizer_problems", lambda *a: hashed.append(a) or problems(*a))
    monkeypatch.setattr(integrity, "tokenizer_json_size", lambda *a: parsed.append(a) or size(*a))

    LogitCacheDataset(cache_copy, student_tokenizer)
    LogitCacheDataset(cache_copy, student_tokenizer)
    aligned_fraction(cache_copy, student_tokenizer)

    assert len(hashed) == 1 and len(parsed) == 1


def test_a_tokenizer_file_changed_between_reads_is_caught(cache_copy, student_tokenizer):
    LogitCacheDataset(cache_copy, student_tokenizer)
    tok = cache_copy / "tokenizer" / "tokenizer.json"
    data = tok.read_bytes()

    tok.write_bytes(data.replace(b'"type"', b'"TYPE"', 1))  # the same size: only its mtime tells

    assert tok.stat().st_size == len(data)

    with pytest.raises(LogitCacheError, match="tokenizer/tokenizer.json: sha256 differs"):
        LogitCacheDataset(cache_copy, student_tokenizer)
