"""Stage-2 reader soak: a >=1M-token cache, two DDP ranks (gloo), dataloader workers.

    python benchmarks/soak.py [--examples 4096] [--tokens 256] [--epochs 2] [--workers 3] [--leak]

Builds a synthetic cache with ``CacheWriter`` (random but valid rows; no teacher), then
starts ``world`` rank processes that join a gloo process group and stream the cache with
``LogitCacheDataset`` (rank and world size taken from ``torch.distributed``) through a
``DataLoader`` with several workers, for several shuffled epochs. Each rank records the
example ids it received per epoch and, every few batches, the memory of itself and of its
live dataloader workers (RSS, USS, PSS); each worker also reports its own live heap
(tracemalloc: Python objects and numpy arrays, plus pyarrow's pool). The script prints
whether every example came exactly once per epoch, peak and growth figures per rank, and
memory over time as a markdown table. ``--leak`` makes the workers keep every example they
yield, to see what a leaking reader looks like in those figures.

``tests/test_soak.py`` runs the same harness and asserts on it.
This file is also the rank process: ``python benchmarks/soak.py _rank ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MiB = 2**20
VOCAB = 512
K = 8


# --- a synthetic cache ----------------------------------------------------------------------


def _text_pool(chars: int, seed: int) -> str:
    """Generated corpus text (ASCII, accents, CJK, emoji), at least ``chars`` characters."""
    from logitcache.pipeline.tiny import generate_corpus

    lines: list[str] = []
    total, i = 0, 0
    while total < chars:
        batch = generate_corpus(2000, seed + i)
        lines += batch
        total += sum(len(s) + 1 for s in batch)
        i += 1
    return "\n".join(lines)


def synthetic_rows(n: int, mean_tokens: int, *, k: int = K, vocab: int = VOCAB, seed: int = 0):
    """``n`` valid rows: token spans tile a slice of generated text, top-k ids unique and in the
    vocabulary, top-k logprobs sorted descending, <= 0 and summing to at most 1 in probability."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean_tokens // 2, mean_tokens + mean_tokens // 2 + 1, size=n)
    pool = _text_pool(int(lengths.sum() * 4 // 5 + 4 * mean_tokens), seed)
    stride = 37  # k * stride < vocab: base + stride * j (mod vocab) are k distinct ids
    assert k * stride < vocab
    for i, t in enumerate(lengths.tolist()):
        span = rng.integers(1, 5, size=t)  # 1..4 characters per token
        ends = np.cumsum(span).astype(np.int32)
        starts = (ends - span).astype(np.int32)
        at = int(rng.integers(0, len(pool) - int(ends[-1])))
        text = pool[at : at + int(ends[-1])]
        base = rng.integers(0, vocab, size=(t - 1, 1))
        topk_ids = rng.permuted((base + stride * np.arange(k)) % vocab, axis=1).astype(np.int32)
        logprobs = -np.cumsum(rng.exponential(0.5, size=(t - 1, k)), axis=1) - math.log(k)
        yield {
            "id": f"ex-{i:07d}",
            "text": text,
            "prompt_chars": int(ends[t // 4]),
            "truncated": False,
            "input_ids": rng.integers(0, vocab, size=t).astype(np.int32),
            "char_start": starts,
            "char_end": ends,
            "topk_ids": topk_ids,
            "topk_logprobs": logprobs.astype(np.float16),
            "label_logprob": (logprobs[:, 0] - rng.exponential(1.0, size=t - 1)).astype(np.float32),
            "logsumexp": rng.normal(5.0, 1.0, size=t - 1).astype(np.float32),
        }


def build_cache(out: Path, n: int, mean_tokens: int, *, seed: int = 0, row_group_bytes: int = MiB,
                shard_bytes: int = 16 * MiB, tokenizer_dir: Path | None = None) -> Path:
    """A complete v1 cache of ``n`` synthetic examples (about ``n * mean_tokens`` tokens)."""
    from logitcache.storage.manifest import Manifest
    from logitcache.storage.writer import CacheWriter

    manifest = Manifest(
        teacher={"name": "synthetic-soak", "dtype": "float16"},
        tokenizer={"name": "synthetic", "vocab_size": VOCAB},
        k=K,
        mode="score",
        dataset={"source": "synthetic", "fingerprint": f"soak-{n}-{mean_tokens}-{seed}", "num_records": n},
        template={"kind": "fields", "prompt_field": "prompt", "response_field": "response",
                  "add_special_tokens": True},
    )
    with CacheWriter(out, manifest, tokenizer_dir=tokenizer_dir, shard_bytes=shard_bytes,
                     row_group_bytes=row_group_bytes) as w:
        for row in synthetic_rows(n, mean_tokens, seed=seed):
            w.write(row)
        w.mark_complete()
    return out


# --- one rank -------------------------------------------------------------------------------


_calls = 0  # batches collated by this process (a dataloader worker)
_rows = 0


def collate(rows: list[dict], sample_every: int = 0) -> dict[str, Any]:
    """What a worker sends to its rank: ids, token counts, a real tensor (through shared
    memory), and every ``sample_every`` batches the worker's own memory."""
    global _calls, _rows
    import numpy as np
    import torch

    key = "topk_logprobs" if "topk_logprobs" in rows[0] else "teacher_logprobs"  # raw rows / features
    batch = {"id": [r["id"] for r in rows], "tokens": [len(r["input_ids"]) for r in rows],
             "worker": [int(r["_worker"]) for r in rows],
             "payload": torch.from_numpy(np.concatenate([r[key] for r in rows])), "mem": None}
    _calls += 1
    _rows += len(rows)
    if sample_every and _calls == 1:
        # Trace from the first batch on: the one-time imports of the first read (pyarrow pulls in
        # pandas, ~17 MiB of module objects) stay out of the heap figure, and out of its cost.
        import tracemalloc

        tracemalloc.start()
    if sample_every and _calls % sample_every == 0:
        batch["mem"] = {"pid": os.getpid(), "rows": _rows, **_own_memory()}
    return batch


def _own_memory() -> dict[str, int]:
    """This worker's RSS, USS, PSS, and its live heap: what tracemalloc sees (Python objects and
    numpy arrays) plus pyarrow's memory pool. The heap is exact where RSS is blurred by the
    allocators (glibc, mimalloc) keeping freed pages, so a leak shows in it row by row."""
    import tracemalloc

    import psutil
    import pyarrow as pa

    m = psutil.Process().memory_full_info()
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
    arrow = pa.total_allocated_bytes()
    return {"rss": m.rss, "uss": m.uss, "pss": m.pss, "traced": traced, "arrow": arrow, "heap": traced + arrow}


def _tree_memory() -> dict[str, Any]:
    """This process (a rank) and its live children (its dataloader workers). PSS splits shared
    pages between the processes that map them, so the tree's PSS is its real footprint; RSS
    counts the pages a forked worker shares with its rank once per process."""
    import psutil

    me = psutil.Process()
    main = me.memory_full_info()
    kids = []
    for c in me.children(recursive=True):
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                continue
            m = c.memory_full_info()
        except psutil.Error:  # a worker that just exited
            continue
        kids.append({"pid": c.pid, "rss": m.rss, "uss": m.uss, "pss": m.pss})
    return {"main_rss": main.rss, "main_uss": main.uss, "workers": kids,
            "rss": main.rss + sum(k["rss"] for k in kids), "pss": main.pss + sum(k["pss"] for k in kids)}


_LEAK: list = []


def _dataset_class(leak: bool):
    from logitcache.pipeline.student.dataset import LogitCacheDataset

    if not leak:
        return LogitCacheDataset

    class LeakyDataset(LogitCacheDataset):
        """For the soak's own check: keeps every example it yields (a reader that leaks rows)."""

        def __iter__(self):
            for example in super().__iter__():
                _LEAK.append(example)
                yield example

    return LeakyDataset


def _read_epoch(ds, loader_kwargs: dict, epoch: int, samples: list, worker_samples: list, sample_every: int,
                seen_before: int) -> dict[str, Any]:
    from functools import partial

    from torch.utils.data import DataLoader

    ds.set_epoch(epoch)
    ids: list[str] = []
    workers: list[int] = []
    tokens = positions = 0
    t0 = time.perf_counter()
    loader = DataLoader(ds, collate_fn=partial(collate, sample_every=sample_every), **loader_kwargs)
    for b, batch in enumerate(loader):
        ids += batch["id"]
        workers += batch["worker"]
        tokens += sum(batch["tokens"])
        positions += int(batch["payload"].shape[0])
        if batch["mem"] is not None:
            worker_samples.append({"epoch": epoch, "worker": batch["worker"][0], "seen": seen_before + len(ids),
                                   **batch["mem"]})
        del batch
        if sample_every and b % sample_every == sample_every - 1:
            samples.append({"epoch": epoch, "seen": seen_before + len(ids), "t": time.perf_counter(), **_tree_memory()})
    return {"ids": ids, "workers": workers, "tokens": tokens, "positions": positions,
            "seconds": time.perf_counter() - t0}


def rank_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--init", required=True)  # file:// rendezvous
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shuffle-buffer", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sample-every", type=int, default=8)
    p.add_argument("--padded-cache", default=None)  # one more epoch over a cache with N % world != 0
    p.add_argument("--student-tokenizer", default=None)  # featurize the padded cache with it
    p.add_argument("--leak", action="store_true")  # keep every example (checks the memory check)
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    # pyarrow imports pandas on a process's first Array.to_numpy (0.2-0.3 s, ~17 MiB in each
    # dataloader worker, every epoch). A training rank has it already (transformers' Trainer
    # imports it), so the workers inherit it from the fork: do the same here.
    try:
        import pandas  # noqa: F401
    except ImportError:
        pass
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    dist.init_process_group("gloo", init_method=a.init, rank=a.rank, world_size=a.world)
    samples: list[dict] = []
    worker_samples: list[dict] = []
    try:
        ds = _dataset_class(a.leak)(a.cache, None, shuffle=True, seed=a.seed, shuffle_buffer=a.shuffle_buffer,
                                    num_workers=a.workers)  # rank and world size: from torch.distributed
        kwargs = {"batch_size": a.batch_size, "num_workers": a.workers}
        result: dict[str, Any] = {"rank": a.rank, "world": a.world, "pid": os.getpid(),
                                  "dataset_rank_world": list(ds.rank_and_world()), "len": len(ds), "epochs": []}
        samples.append({"epoch": -1, "seen": 0, "t": time.perf_counter(), **_tree_memory()})
        seen = 0
        for epoch in range(a.epochs):
            ep = _read_epoch(ds, kwargs, epoch, samples, worker_samples, a.sample_every, seen)
            seen += len(ep["ids"])
            # A training loop's collective: every rank must have read the same number of examples.
            counts = [torch.zeros(1, dtype=torch.int64) for _ in range(a.world)]
            dist.all_gather(counts, torch.tensor([len(ep["ids"])]))
            ep["all_counts"] = [int(c) for c in counts]
            result["epochs"].append(ep)
        result["samples"] = samples
        result["worker_samples"] = worker_samples
        if a.padded_cache:
            tok = None
            if a.student_tokenizer:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(a.student_tokenizer)
            pds = _dataset_class(False)(a.padded_cache, tok, shuffle=True, seed=a.seed,
                                        shuffle_buffer=a.shuffle_buffer)
            t0 = time.perf_counter()
            result["padded"] = _read_epoch(pds, kwargs, 0, [], [], 0, 0)
            result["padded"].update(len=len(pds), featurized=tok is not None, seconds=time.perf_counter() - t0)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    result["seconds"] = time.perf_counter() - t_start
    Path(a.out).write_text(json.dumps(result))


# --- the parent -----------------------------------------------------------------------------


def run_ranks(work: Path, cache: Path, *, world: int = 2, timeout: float = 300, **opts: Any) -> list[dict]:
    """Start ``world`` rank processes over ``cache``; return their results (rank order)."""
    work.mkdir(parents=True, exist_ok=True)
    store = work / "rendezvous"
    if store.exists():
        store.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    procs = []
    with contextlib.ExitStack() as logs:
        for r in range(world):
            cmd = [sys.executable, str(Path(__file__).resolve()), "_rank", "--init", f"file://{store}",
                   "--rank", str(r), "--world", str(world), "--cache", str(cache), "--out", str(work / f"rank{r}.json")]
            for key, value in opts.items():
                flag = f"--{key.replace('_', '-')}"
                if value is True:
                    cmd.append(flag)
                elif value is not None and value is not False:
                    cmd += [flag, str(value)]
            log = logs.enter_context(open(work / f"rank{r}.log", "w"))
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        try:
            # A rank that fails leaves the others waiting in a collective: stop them all at once.
            while any(proc.poll() is None for proc in procs):
                if time.monotonic() > deadline or any(proc.poll() not in (None, 0) for proc in procs):
                    break
                time.sleep(0.05)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    failed = [r for r, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        why = f"timed out after {timeout:.0f} s" if time.monotonic() > deadline else "failed"
        raise RuntimeError(f"rank(s) {failed} {why}:\n" + "\n".join(
            f"--- rank {r} (exit {procs[r].returncode}) ---\n{(work / f'rank{r}.log').read_text()[-3000:]}"
            for r in failed))
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(world)]


def tree_series(result: dict) -> list[dict]:
    """One rank's samples from its first batch on (MiB): examples seen, epoch, the rank's own
    RSS, the RSS summed over it and its live workers, and the PSS of that tree."""
    return [{"epoch": s["epoch"], "seen": s["seen"], "main_rss": s["main_rss"] / MiB, "rss": s["rss"] / MiB,
             "pss": s["pss"] / MiB, "workers": len(s["workers"])}
            for s in result["samples"] if s["epoch"] >= 0]


def growth_after_warmup(series: list[dict], key: str, warmup: float = 0.1) -> tuple[float, float]:
    """(baseline, growth): ``key`` at the first sample past ``warmup`` of the run, and the highest
    value after it minus that baseline."""
    total = series[-1]["seen"]
    i = next(i for i, s in enumerate(series) if s["seen"] >= warmup * total)
    base = series[i][key]
    return base, max(s[key] for s in series[i:]) - base


def worker_heaps(result: dict, warmup: float = 0.1) -> list[dict]:
    """Per dataloader worker process of one rank (a (epoch, worker) pair): its rows, the live heap
    (MiB) at ``warmup`` of its stream, the growth after that, and its peak USS."""
    out = []
    keys = sorted({(w["epoch"], w["worker"]) for w in result["worker_samples"]})
    for epoch, worker in keys:
        ws = sorted((w for w in result["worker_samples"] if (w["epoch"], w["worker"]) == (epoch, worker)),
                    key=lambda w: w["rows"])
        rows = ws[-1]["rows"]
        i = next(i for i, w in enumerate(ws) if w["rows"] >= warmup * rows)
        base = ws[i]["heap"] / MiB
        out.append({"epoch": epoch, "worker": worker, "rows": rows, "samples": len(ws), "heap_base": base,
                    "heap_growth": max(w["heap"] for w in ws[i:]) / MiB - base,
                    "heap_peak": max(w["heap"] for w in ws) / MiB, "uss_peak": max(w["uss"] for w in ws) / MiB})
    return out


def memory_table(results: list[dict], points: int = 10) -> str:
    """Markdown: per tenth of each rank's run, the peak of its tree's PSS and RSS sum (rank + live
    workers) and of its workers' live heap, in MiB."""
    headers = ["run %", "epoch"]
    for r in results:
        headers += [f"rank {r['rank']} PSS", f"rank {r['rank']} RSS sum", f"rank {r['rank']} worker heap"]
    rows = []
    for i in range(points):
        cells: list[Any] = [f"{100 * (i + 1) // points}", ""]
        for r in results:
            series = tree_series(r)
            n = series[-1]["seen"]
            part = [s for s in series if i * n / points < s["seen"] <= (i + 1) * n / points] or [series[-1]]
            cells[1] = str(part[-1]["epoch"])
            lo, hi = i * n / points, (i + 1) * n / points
            heap = [w["heap"] / MiB for w in r["worker_samples"] if lo < w["seen"] <= hi]
            cells += [f"{max(s['pss'] for s in part):.0f}", f"{max(s['rss'] for s in part):.0f}",
                      f"{max(heap):.1f}" if heap else "-"]
        rows.append(cells)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """Per rank: epoch times, peak memory, growth after the first tenth of the run, workers' heaps."""
    lines = []
    for r in results:
        series = tree_series(r)
        _, rss_growth = growth_after_warmup(series, "rss")
        _, main_growth = growth_after_warmup(series, "main_rss")
        heaps = worker_heaps(r)
        lines.append(
            f"rank {r['rank']}: epochs {[round(e['seconds'], 1) for e in r['epochs']]} s; peak PSS "
            f"{max(s['pss'] for s in series):.0f} MiB, peak RSS sum (rank + {max(s['workers'] for s in series)} "
            f"workers) {max(s['rss'] for s in series):.0f} MiB, rank RSS {max(s['main_rss'] for s in series):.0f} MiB; "
            f"growth after 10%: RSS sum {rss_growth:+.0f} MiB, rank RSS {main_growth:+.0f} MiB; "
            f"{len(heaps)} worker processes: live heap peak {max(h['heap_peak'] for h in heaps):.1f} MiB, "
            f"growth after 10% of each stream at most {max(h['heap_growth'] for h in heaps):+.1f} MiB, "
            f"USS peak {max(h['uss_peak'] for h in heaps):.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_rank":
        rank_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=256, help="mean tokens per example")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--leak", action="store_true", help="keep every example in the workers (a simulated leak)")
    p.add_argument("--work", default=None, help="directory for the cache (default: a temp dir)")
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    a = p.parse_args()
    import tempfile

    from logitcache.storage import load_manifest

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine, update_results

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        t0 = time.perf_counter()
        cache = build_cache(work / "cache", a.examples, a.tokens)
        build_s = time.perf_counter() - t0
        m = load_manifest(cache)
        t0 = time.perf_counter()
        results = run_ranks(work / "run", cache, world=a.world, epochs=a.epochs, workers=a.workers, leak=a.leak)
        run_s = time.perf_counter() - t0
        ids = {i for r in results for e in r["epochs"] for i in e["ids"]}
        once = all(sorted(i for r in results for i in r["epochs"][e]["ids"]) == sorted(ids) for e in range(a.epochs))
        report = "\n".join([
            f"## Reader soak ({time.strftime('%Y-%m-%d')})\n",
            f"Machine: {machine()}\n",
            f"Cache: {m.num_examples} examples, {m.num_tokens:,} tokens, {m.num_bytes / MiB:.1f} MiB in "
            f"{len(m.shards)} shards; built in {build_s:.1f} s. "
            f"{a.world} ranks (gloo) x {a.workers} dataloader workers x {a.epochs} epochs in {run_s:.1f} s; "
            f"every example exactly once per epoch: {once and len(ids) == m.num_examples}.\n",
            summary(results),
            "",
            memory_table(results),
        ])
        print(report)
        if not (a.no_write or a.leak):
            update_results("soak", report)


if __name__ == "__main__":
    main()
