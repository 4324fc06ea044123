"""Soak test of the stage-2 reader (issue 7, item 8).

A synthetic cache of >= 1M teacher tokens (CacheWriter, random but valid rows, several shards
and ~70 row groups) is streamed by two DDP ranks (separate processes in a gloo process group;
``LogitCacheDataset`` takes rank and world size from ``torch.distributed``), each through a
``DataLoader`` with several workers, for two shuffled epochs. Checks: every example exactly
once per epoch over all ranks and workers, the epochs' orders differ, and memory stays flat:

* each dataloader worker's live heap (tracemalloc: Python objects and numpy arrays, plus
  pyarrow's pool) must not grow after the first tenth of its stream by more than
  ``HEAP_GROWTH_MIB``; ``test_the_memory_check_catches_a_reader_that_keeps_its_rows`` shows
  that a reader keeping its rows fails that bound;
* each rank's RSS, and the RSS summed over the rank and its live workers, must not grow after
  the first tenth of the run by more than ``MAIN_RSS_GROWTH_MIB`` / ``RSS_SUM_GROWTH_MIB``:
  coarse end-to-end bounds (allocators keep freed pages, so RSS moves in steps of tens of MiB).

The harness is ``benchmarks/soak.py`` (also a script printing the same tables). Run with
``-s`` to see the memory over time. Takes about 20-30 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from logitcache.storage import CacheReader, load_manifest

_SOAK_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
_spec = importlib.util.spec_from_file_location("logitcache_bench_soak", _SOAK_PY)
soak = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = soak
_spec.loader.exec_module(soak)

WORLD = 2
WORKERS = 3
EPOCHS = 2
N = 4096  # divisible by WORLD: no padding, so "exactly once" is strict
MEAN_TOKENS = 256  # ~1.05M tokens
N_PADDED = 1001  # odd: WORLD * ceil(N / WORLD) - N = 1 example is read twice per epoch
SEED = 1234
SHUFFLE_BUFFER = 64
SAMPLE_EVERY = 8  # batches of 8 rows between memory samples

# Bounds, from measured runs (benchmarks/soak.py, 2 ranks x 2-3 workers, 2 epochs, 1M tokens):
# - a worker's live heap is ~3 MiB (one row group read, ~1.5 MiB in pyarrow, plus the 64-row
#   shuffle buffer, ~1.1 MiB) and grew by at most 0.5 MiB after the first tenth of its stream;
#   a reader that keeps its rows grows it by ~17 MiB per 1000 rows. 4 MiB is room for another
#   row group and buffer on top of the noise, and a quarter of that leak.
HEAP_GROWTH_MIB = 4.0
# - a rank's own RSS grew by ~3 MiB (first epoch's allocator warm-up);
MAIN_RSS_GROWTH_MIB = 16.0
# - the RSS summed over a rank and its workers grew by 9 to 44 MiB: every worker's RSS moves by
#   up to ~20 MiB as glibc and mimalloc keep or return freed pages. 64 MiB is above that noise;
#   it catches gross growth (e.g. a rank keeping the batches it was sent, ~36 MiB per epoch
#   here) but not a 17 MiB leak per worker, which the heap bound above catches.
RSS_SUM_GROWTH_MIB = 64.0


@pytest.fixture(scope="module")
def soak_cache(tmp_path_factory) -> Path:
    cache = soak.build_cache(tmp_path_factory.mktemp("soak") / "cache", N, MEAN_TOKENS, seed=0)
    m = load_manifest(cache)
    assert m.num_examples == N and m.num_tokens >= 1_000_000 and len(m.shards) >= 2
    return cache


@pytest.fixture(scope="module")
def padded_cache(tmp_path_factory) -> Path:
    """A smaller cache that no 2 ranks divide evenly, in many small row groups."""
    return soak.build_cache(tmp_path_factory.mktemp("soak") / "padded", N_PADDED, 96, seed=5,
                            row_group_bytes=64 * 1024, shard_bytes=2**20)


@pytest.fixture(scope="module")
def student_tokenizer_dir(tmp_path_factory) -> Path:
    from logitcache.pipeline.tiny import build_tiny_student_tokenizer

    return build_tiny_student_tokenizer(tmp_path_factory.mktemp("soak") / "student-tok")


@pytest.fixture(scope="module")
def soak_run(tmp_path_factory, soak_cache, padded_cache, student_tokenizer_dir) -> list[dict]:
    """The two ranks' records: ids per epoch, memory samples, then one featurized epoch of the
    padded cache."""
    t0 = time.perf_counter()
    results = soak.run_ranks(
        tmp_path_factory.mktemp("soak-run"), soak_cache, world=WORLD, timeout=240, epochs=EPOCHS,
        workers=WORKERS, batch_size=8, shuffle_buffer=SHUFFLE_BUFFER, seed=SEED, sample_every=SAMPLE_EVERY,
        padded_cache=padded_cache, student_tokenizer=student_tokenizer_dir,
    )
    m = load_manifest(soak_cache)
    print(f"\nsoak: {m.num_examples} examples, {m.num_tokens} tokens, {m.num_bytes / 2**20:.1f} MiB in "
          f"{len(m.shards)} shards; {WORLD} ranks x {WORKERS} workers x {EPOCHS} epochs in "
          f"{time.perf_counter() - t0:.1f} s")
    print(soak.summary(results))
    print(soak.memory_table(results))
    return results


def row_groups(cache: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(cache / s.path).num_row_groups for s in load_manifest(cache).shards)


# --- every example exactly once ----------------------------------------------------------------


def test_ranks_take_rank_and_world_size_from_the_gloo_process_group(soak_run):
    assert [r["dataset_rank_world"] for r in soak_run] == [[r, WORLD] for r in range(WORLD)]
    assert [r["len"] for r in soak_run] == [N // WORLD] * WORLD


def test_every_example_is_read_exactly_once_per_epoch_over_ranks_and_workers(soak_run, soak_cache):
    all_ids = sorted(CacheReader(soak_cache).ids())
    assert len(all_ids) == N and row_groups(soak_cache) >= 4 * WORLD * WORKERS  # a real split
    for e in range(EPOCHS):
        per_rank = [r["epochs"][e]["ids"] for r in soak_run]
        for r, ids in enumerate(per_rank):
            assert len(ids) == N // WORLD, f"epoch {e}, rank {r}"
            repeated = [i for i, c in Counter(ids).items() if c > 1]
            assert not repeated, f"epoch {e}, rank {r} read {len(repeated)} examples twice, e.g. {repeated[:3]}"
            assert set(soak_run[r]["epochs"][e]["workers"]) == set(range(WORKERS)), "every worker had work"
        assert not set(per_rank[0]) & set(per_rank[1]), f"epoch {e}: an example went to both ranks"
        assert sorted(per_rank[0] + per_rank[1]) == all_ids, f"epoch {e}: examples lost or invented"
        # The ranks agreed on the count in a collective (a short rank would hang DDP).
        assert all(r["epochs"][e]["all_counts"] == [N // WORLD] * WORLD for r in soak_run)


def test_every_token_arrives_once_per_epoch(soak_run, soak_cache):
    m = load_manifest(soak_cache)
    for e in range(EPOCHS):
        assert sum(r["epochs"][e]["tokens"] for r in soak_run) == m.num_tokens
        # the top-k tensors that crossed from the workers: one row per position (tokens - 1 per example)
        assert sum(r["epochs"][e]["positions"] for r in soak_run) == m.num_tokens - N


def test_each_epoch_has_another_order_and_another_split(soak_run, soak_cache):
    cache_order = list(CacheReader(soak_cache).ids())
    for r in soak_run:
        first, second = r["epochs"][0]["ids"], r["epochs"][1]["ids"]
        assert first != second
        assert set(first) != set(second), "the unit permutation changes which examples a rank reads"
        mine = set(first)
        assert first != [i for i in cache_order if i in mine], "shuffled, not in cache order"


def test_a_cache_the_ranks_do_not_divide_is_padded_with_at_most_world_minus_one_repeats(soak_run, padded_cache):
    all_ids = sorted(CacheReader(padded_cache).ids())
    per_rank = [r["padded"]["ids"] for r in soak_run]
    per = -(-N_PADDED // WORLD)
    assert [r["padded"]["len"] for r in soak_run] == [per] * WORLD
    assert [len(ids) for ids in per_rank] == [per] * WORLD
    seen = Counter(i for ids in per_rank for i in ids)
    assert sorted(seen) == all_ids
    repeats = sum(c - 1 for c in seen.values())
    assert repeats == WORLD * per - N_PADDED
    assert repeats <= WORLD - 1 and max(seen.values()) <= 2


def test_the_padded_epoch_was_featurized_with_the_student_tokenizer(soak_run):
    for r in soak_run:
        p = r["padded"]
        assert p["featurized"]
        # teacher_logprobs has one row per student token: as many rows as input_ids entries
        assert p["tokens"] == p["positions"] > 0


# --- memory flat ---------------------------------------------------------------------------


def test_every_workers_live_heap_stays_flat_over_its_stream(soak_run):
    for r in soak_run:
        heaps = soak.worker_heaps(r)
        assert len(heaps) == WORKERS * EPOCHS, "one worker process per worker and epoch, each sampled"
        for h in heaps:
            assert h["samples"] >= 6, h
            assert h["heap_growth"] < HEAP_GROWTH_MIB, (
                f"rank {r['rank']}, epoch {h['epoch']}, worker {h['worker']}: live heap grew "
                f"{h['heap_growth']:.1f} MiB after the first tenth of its {h['rows']} rows"
            )


def test_each_ranks_memory_stays_flat_over_the_run(soak_run):
    for r in soak_run:
        series = soak.tree_series(r)
        assert len(series) >= 20 and max(s["workers"] for s in series) == WORKERS
        _, main_growth = soak.growth_after_warmup(series, "main_rss")
        _, sum_growth = soak.growth_after_warmup(series, "rss")
        assert main_growth < MAIN_RSS_GROWTH_MIB, f"rank {r['rank']}: RSS grew {main_growth:.0f} MiB"
        assert sum_growth < RSS_SUM_GROWTH_MIB, f"rank {r['rank']} + workers: RSS grew {sum_growth:.0f} MiB"


def test_the_memory_check_catches_a_reader_that_keeps_its_rows(soak_cache):
    """The same measurement on a dataset that keeps every example it yields: the heap bound fails."""
    # A quarter of the cache (~1000 rows, ~260k tokens) through one worker keeps this short.
    ds = soak._dataset_class(leak=True)(soak_cache, None, shuffle=True, seed=SEED, shuffle_buffer=SHUFFLE_BUFFER,
                                        rank=0, world_size=4)
    worker_samples: list[dict] = []
    soak._read_epoch(ds, {"batch_size": 8, "num_workers": 1}, 0, [], worker_samples, SAMPLE_EVERY, 0)

    (heap,) = soak.worker_heaps({"worker_samples": worker_samples})
    assert heap["rows"] == N // 4
    assert heap["heap_growth"] > 2 * HEAP_GROWTH_MIB, heap
