"""Storage benchmark: bytes/token on disk of the top-k cache, naive vs v1 vs compact codec.

    python benchmarks/storage.py              # full run, a few minutes on 2 CPU cores
    python benchmarks/storage.py --quick      # smaller sizes (smoke run)
    python benchmarks/storage.py --no-write   # do not update benchmarks/RESULTS.md

Teachers: (1) a tiny Llama on the real Mistral-7B tokenizer (V=32000) trained ~100 steps on
the generated corpus, run over generated data at k=128 (smaller k are prefixes of its
top-128); (2) a synthetic Zipf-like teacher at V=32000 and V=128000. Formats: (a) naive
fp32 logprobs + int32 ids, uncompressed (k*8 B/token); (b) v1 (fp16 + int32, zstd-3
Parquet via ``rows_to_table``); (c) the compact codec (``logitcache.storage.codec``). Bytes
are whole Parquet files (all columns, footer, id table) divided by tokens; the floor is
k*log2(V) bits for the ids alone. Decode speed is read-from-memory + decode to rows, one
thread.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, table, update_results

from logitcache.storage.codec import (
    decode_compact,
    encode_compact,
    error_bound,
    write_compact_parquet,
)
from logitcache.storage.rows import V1_PARQUET_OPTIONS, batch_to_rows, rows_to_table

KS = (8, 32, 64, 128)


# --- teachers ------------------------------------------------------------------------------
def tiny_teacher_rows(work: Path, n_examples: int, steps: int, k: int) -> list[dict]:
    """Rows of a tiny Llama on the real Mistral tokenizer, scored by the real pipeline."""
    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import TeacherConfig, run_teacher
    from logitcache.pipeline.tiny import (
        TinyModelConfig,
        build_tiny_teacher,
        load_mistral_tokenizer,
        write_demo_dataset,
    )
    from logitcache.storage.reader import open_cache

    tok = load_mistral_tokenizer(work / "mistral-tok")
    teacher = build_tiny_teacher(work / "mistral", tokenizer=tok, train_steps=steps,
                                 model_cfg=TinyModelConfig(hidden_size=128))
    data = write_demo_dataset(work / "data.jsonl", n=n_examples, seed=11)
    cache = work / "cache"
    run_teacher(TeacherConfig(model=str(teacher), data=str(data), out=str(cache), top_k=k, batch_size=16,
                              template=TextTemplate(prompt_field="prompt", response_field="response"),
                              device="cpu"), progress=False)
    return list(open_cache(cache))


def zipf_rows(V: int, n_tokens: int, k: int, seed: int = 0, row_len: int = 256) -> list[dict]:
    """A synthetic Zipf-like teacher.

    Per position: exponent s ~ U(0.8, 1.6); logprobs of a power law r^-s over V ranks with a
    little noise on the leading ranks, sorted; the normaliser is the partial zeta sum over V.
    Ids: k distinct ids drawn from a global Zipf(1.1) popularity over a fixed random
    permutation of the vocabulary, so frequent tokens recur across positions like real text.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(V).astype(np.int32)
    pop = np.arange(1, V + 1, dtype=np.float64) ** -1.1
    pop_cdf = np.cumsum(pop / pop.sum())
    logr = np.log(np.arange(1, V + 1, dtype=np.float64))
    ranks_considered = min(V, 4 * k)
    s_grid = np.linspace(0.8, 1.6, 161)  # partial zeta sums on a grid, interpolated
    log_z_grid = np.array([np.log(np.exp(-g * logr).sum()) for g in s_grid])
    rows, made = [], 0
    while made < n_tokens:
        n = min(row_len, n_tokens - made)
        m = n - 1
        s = rng.uniform(0.8, 1.6, size=m)
        log_z = np.interp(s, s_grid, log_z_grid)
        raw = -s[:, None] * logr[None, :ranks_considered] + rng.normal(0, 0.3, size=(m, ranks_considered))
        lp = -np.sort(-raw, axis=1)[:, :k] - log_z[:, None]
        ids = np.empty((m, k), dtype=np.int32)
        for p in range(m):
            draws = np.searchsorted(pop_cdf, rng.random(4 * k))
            _, first = np.unique(draws, return_index=True)
            chosen = draws[np.sort(first)][:k]
            while len(chosen) < k:  # top up (rare): unused ids at random
                extra = rng.integers(0, V, size=k)
                chosen = np.concatenate([chosen, extra[~np.isin(extra, chosen)]])
                _, first = np.unique(chosen, return_index=True)
                chosen = chosen[np.sort(first)][:k]
            ids[p] = perm[chosen]
        input_ids = perm[np.searchsorted(pop_cdf, rng.random(n))].astype(np.int32)
        ends = np.cumsum(rng.integers(1, 8, size=n)).astype(np.int32)
        rows.append({
            "id": f"zipf-{len(rows):06d}", "text": "x" * int(ends[-1]), "prompt_chars": 0, "truncated": False,
            "input_ids": input_ids, "char_start": np.concatenate([[0], ends[:-1]]).astype(np.int32), "char_end": ends,
            "topk_ids": ids, "topk_logprobs": lp.astype(np.float16),
            "label_logprob": (lp[:, 0] - rng.exponential(2.0, size=m)).astype(np.float32),
            "logsumexp": rng.normal(12, 2, size=m).astype(np.float32),
        })
        made += n
    return rows


def truncate(rows: list[dict], k: int) -> list[dict]:
    return [{**r, "topk_ids": r["topk_ids"][:, :k], "topk_logprobs": r["topk_logprobs"][:, :k]} for r in rows]


# --- formats -------------------------------------------------------------------------------
def parquet_bytes(tab: pa.Table, **opts) -> bytes:
    buf = io.BytesIO()
    pq.write_table(tab, buf, row_group_size=max(1, tab.num_rows), **opts)
    return buf.getvalue()


def decode_rate(data: bytes, decode, n_tokens: int, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f = pq.ParquetFile(pa.BufferReader(data))
        for batch in f.iter_batches(batch_size=256):
            for _row in decode(batch):
                pass
        best = min(best, time.perf_counter() - t0)
    return n_tokens / best


def measure(rows: list[dict], k: int, V: int, repeats: int) -> dict:
    tokens = sum(len(r["input_ids"]) for r in rows)
    v1 = parquet_bytes(rows_to_table(rows, k), **V1_PARQUET_OPTIONS)
    ctab = encode_compact(rows, k)
    buf = io.BytesIO()
    write_compact_parquet(ctab, buf)
    compact = buf.getvalue()
    id_table_bytes = len(ctab.schema.metadata[b"logitcache.id_table"])
    # Round trip + error against the (float16) values given.
    got = [r for b in pq.ParquetFile(pa.BufferReader(compact)).iter_batches() for r in decode_compact(b)]
    err = 0.0
    for a, b in zip(rows, got):
        assert np.array_equal(a["topk_ids"], b["topk_ids"])
        if len(a["topk_logprobs"]):
            err = max(err, float(np.abs(a["topk_logprobs"].astype(np.float64) - b["topk_logprobs"]).max()))
    assert err <= error_bound()
    return {
        "tokens": tokens, "naive": 8 * k, "v1": len(v1) / tokens, "compact": len(compact) / tokens, "ids": id_table_bytes / tokens,
        "floor": k * math.log2(V) / 8, "err": err,
        "v1_rate": decode_rate(v1, batch_to_rows, tokens, repeats),
        "c_rate": decode_rate(compact, decode_compact, tokens, repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    t0 = time.perf_counter()
    n_examples, train_steps, zipf_tokens, repeats = (128, 30, 4000, 1) if args.quick else (1024, 100, 24000, 3)
    teachers: list[tuple[str, int, list[dict]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            teachers.append((f"tiny Llama, Mistral tokenizer ({train_steps} steps)", 32000,
                             tiny_teacher_rows(Path(tmp), n_examples, train_steps, max(KS))))
        except ImportError as e:  # no mistral_common / sentencepiece
            print(f"skipping the tiny teacher: {e}", file=sys.stderr)
    for V in (32000, 128000):
        teachers.append(("synthetic Zipf", V, zipf_rows(V, zipf_tokens, max(KS), seed=V)))
    out_rows, figures = [], {}
    for label, V, rows in teachers:
        for k in KS:
            m = measure(truncate(rows, k), k, V, repeats)
            figures[f"{label} V={V} k={k}"] = m
            out_rows.append([label, V, k, m["tokens"], m["naive"], f"{m['v1']:.1f}", f"{m['compact']:.1f}", f"{m['ids']:.2f}",
                             f"{m['floor']:.1f}", f"{m['compact'] / m['v1']:.2f}", f"{m['err']:.4f}",
                             f"{m['v1_rate']:,.0f}", f"{m['c_rate']:,.0f}"])
            print(" | ".join(map(str, out_rows[-1])), flush=True)
    report = (
        f"## Storage ({time.strftime('%Y-%m-%d')}, {'quick' if args.quick else 'full'} run, "
        f"{time.perf_counter() - t0:.0f} s)\n\nMachine: {machine()}\n\n"
        "### Bytes per token on disk: naive vs v1 vs compact codec\n\n"
        + table(["teacher", "V", "k", "tokens", "naive fp32+int32", "v1 (fp16+int32, zstd-3)", "compact", "of which id table",
                 "id floor k·log2(V)/8", "compact ÷ v1", "max logprob error (nats)",
                 "v1 decode tokens/s", "compact decode tokens/s"], out_rows)
        + f"\n\nAll columns count (text, spans, label logprob, log-normaliser, footer, the compact id table), "
        f"whole Parquet files of one row group each. The id table (at most one int32 per distinct id, in the "
        f"footer) is a fixed cost per shard: here the sample is small, in a 256 MiB shard it is < 0.1 B/token. 'naive' is the top-k alone (k·8 B). The floor is for "
        f"the ids alone, if they were uniform over V. Error: largest |logprob − decoded| over all entries, "
        f"against the float16 values v1 stores (bound {error_bound():.5f} nats). Decode: read the file from "
        f"memory and build v1-layout rows, one thread, best of {repeats}.\n"
    )
    print(report)
    if not args.no_write:
        update_results("storage", report)


if __name__ == "__main__":
    main()
