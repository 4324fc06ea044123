"""Codec figure on the quality benchmark's teacher: bytes/token, decode speed and error.

    python benchmarks/codec_real.py [--quality-cache benchmarks/.quality-cache] [--work DIR]
                                    [--repeats 3] [--no-write]

Teacher: the quality benchmark's (benchmarks/quality_teacher.py: a 13.6M-parameter Llama on
the Mistral tokenizer, V = 32000, trained on Python standard-library text), found in
``--quality-cache`` (run ``python benchmarks/quality.py`` first). Text: the quality
benchmark's held-out windows (quality_data.py), which the teacher never trained on.

Stage 1 runs once (cached in ``--work``): the real pipeline (``run_teacher``, hf engine,
k = 128) gives the rows (text, tokens, offsets, label log-probs, ...), and the same engine's
``score`` gives the float32 top-128 of every position, the ground truth every format is
measured against (smaller k are its prefixes). Formats, each a whole Parquet file of the
same rows (every column counts):

* naive: float32 log-probs + int32 ids, uncompressed;
* v1: float16 + int32, zstd-3 (the default codec);
* compact v1: the compact codec as it was before version 2 (ranks only, q = 2^-6);
* compact v2: the compact codec now (ids by reference, q = 5·2^-8);
* poly: codec_poly.py, the DistillKit-style scheme, its top-k records in one binary column,
  zstd-3. Its residual bits are the fewest that reach the same error as compact v2
  (every p >= 1e-4 within 1 %); "poly, recommended" is the toolkit's recommended setting
  (exact_k = k/8 in bfloat16, no residuals), for its error.

Error: the largest |p̂ − p| / p over entries with p >= 1e-4 (p the teacher's float32
probability); ids must come back exactly. Decode: the file from memory to rows of
(ids, float32-or-float16 log-probs), one thread, the formats interleaved in each repeat.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from codec_poly import PolyConfig
from codec_poly import decode as poly_decode
from codec_poly import encode as poly_encode
from common import machine, table, update_results

from logitcache.storage.codec import decode_compact, encode_compact, write_compact_parquet
from logitcache.storage.rows import V1_PARQUET_OPTIONS, batch_to_rows, rows_to_table

KS = (16, 64, 128)
P_MIN = 1e-4
GOAL_REL = 0.01
ROOT = Path(__file__).resolve().parent


def quality_teacher(cache: Path) -> Path:
    """The quality table's teacher: the Mistral-tokenizer one trained longest."""
    found = []
    for info in sorted(cache.glob("teacher-*/teacher_info.json")):
        spec = json.loads(info.read_text())["spec"]
        if spec.get("tokenizer") == "mistral-v1" and (info.parent / "model.safetensors").exists():
            found.append((spec.get("steps", 0), info.parent))
    if not found:
        sys.exit(f"no quality teacher in {cache}: run `python benchmarks/quality.py` first (or pass --quality-cache)")
    return max(found)[1]


def teacher_cache(teacher: Path, work: Path, k: int) -> Path:
    """A v1 cache of the teacher over the quality benchmark's held-out windows (made once in ``work``)."""
    from quality_data import make_splits

    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import TeacherConfig, run_teacher

    work.mkdir(parents=True, exist_ok=True)
    data = work / "heldout.jsonl"
    if not data.exists():
        with data.open("w") as f:
            for i, text in enumerate(make_splits().heldout):
                f.write(json.dumps({"id": f"heldout-{i:05d}", "text": text}) + "\n")
    cache = work / f"cache-k{k}"
    if not (cache / "manifest.json").exists() or json.loads((cache / "manifest.json").read_text()).get("status") != "complete":
        run_teacher(TeacherConfig(model=str(teacher), data=str(data), out=str(cache), top_k=k, batch_size=8,
                                  template=TextTemplate(text_field="text"), device="cpu"), progress=False)
    return cache


def teacher_rows(teacher: Path, work: Path, k: int) -> list[dict]:
    """Rows of the teacher over the held-out windows, with float32 top-k (cached in ``work``)."""
    from logitcache.pipeline.teacher.hf import HFTeacher
    from logitcache.storage.reader import open_cache

    rows = list(open_cache(teacher_cache(teacher, work, k)))
    fp32 = work / f"topk-fp32-k{k}.npz"
    if fp32.exists():
        z = np.load(fp32)
        ids, lp = z["ids"], z["lp"]
    else:
        engine = HFTeacher(str(teacher), device="cpu", dtype="float32")
        scored = []
        for i in range(0, len(rows), 8):
            scored += engine.score([r["input_ids"].tolist() for r in rows[i : i + 8]], k)
        ids = np.concatenate([s.topk_ids for s in scored])
        lp = np.concatenate([s.topk_logprobs for s in scored])
        np.savez(fp32, ids=ids, lp=lp)
    at = 0
    for r in rows:
        m = len(r["label_logprob"])
        r["topk_ids"], r["topk_logprobs"] = ids[at : at + m], lp[at : at + m].astype(np.float32)
        at += m
    assert at == len(ids), "cached top-k does not match the cache's positions; delete the work folder"
    return rows


def truncate(rows: list[dict], k: int) -> list[dict]:
    return [{**r, "topk_ids": np.ascontiguousarray(r["topk_ids"][:, :k]),
             "topk_logprobs": np.ascontiguousarray(r["topk_logprobs"][:, :k])} for r in rows]


# --- formats: (file bytes, decode(batch) -> iterator of (ids, logprobs)) ------------------------
def _write(tab: pa.Table, **opts) -> bytes:
    buf = io.BytesIO()
    pq.write_table(tab, buf, row_group_size=max(1, tab.num_rows), **opts)
    return buf.getvalue()


def _plain_decode(batch):
    for r in batch_to_rows(batch):
        yield r["topk_ids"], r["topk_logprobs"]


def _compact_decode(batch):
    for r in decode_compact(batch):
        yield r["topk_ids"], r["topk_logprobs"]


def naive_file(rows, k):
    tab = rows_to_table(rows, k)
    lp32 = np.concatenate([r["topk_logprobs"].reshape(-1) for r in rows]).astype(np.float32)
    col = tab.column("topk_logprobs").combine_chunks()
    inner = pa.FixedSizeListArray.from_arrays(pa.array(lp32, pa.float32()), k)
    arr = pa.ListArray.from_arrays(col.offsets, inner)
    i = tab.schema.names.index("topk_logprobs")
    return _write(tab.set_column(i, pa.field("topk_logprobs", arr.type, nullable=False), arr), compression="none"), _plain_decode


def v1_file(rows, k):
    return _write(rows_to_table(rows, k), **V1_PARQUET_OPTIONS), _plain_decode


def compact_file(rows, k, version):
    step = 2.0**-6 if version == 1 else None
    tab = encode_compact(rows, k, version=version, **({"step": step} if step else {}))
    buf = io.BytesIO()
    write_compact_parquet(tab, buf)
    return buf.getvalue(), _compact_decode


def poly_file(rows, k, cfg: PolyConfig):
    tab = rows_to_table(rows, 0)  # the same base columns, no top-k
    blobs = [poly_encode(r["topk_ids"], r["topk_logprobs"], cfg) for r in rows]
    tab = tab.append_column(pa.field("topk_packed", pa.binary(), nullable=False), pa.array(blobs, pa.binary()))

    def decode(batch):
        col = batch.column(batch.schema.names.index("topk_packed"))
        for blob in col.to_pylist():
            yield poly_decode(blob, cfg)

    return _write(tab, **V1_PARQUET_OPTIONS), decode


GROUPS = ("ids (topk_ranks_*)", "log-probs (topk_steps_*)", "top-1", "the rest (text, tokens, offsets, label, lse)")


def column_bytes(data: bytes, tokens: int) -> dict[str, float]:
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    out = dict.fromkeys(GROUPS, 0.0)
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema
            group = (GROUPS[0] if name.startswith("topk_ranks") else GROUPS[1] if name.startswith("topk_steps")
                     else GROUPS[2] if name.startswith("top1") else GROUPS[3])
            out[group] += col.total_compressed_size / tokens
    return out


def decode_all(data: bytes, decode) -> list:
    f = pq.ParquetFile(pa.BufferReader(data))
    return [x for batch in f.iter_batches(batch_size=256) for x in decode(batch)]


def max_rel_error(rows, got) -> tuple[float, float]:
    """(largest relative error over p >= P_MIN, largest |Δlp| over all entries); ids must match."""
    rel, nats = 0.0, 0.0
    for r, (ids, lp) in zip(rows, got, strict=True):
        if not np.array_equal(np.asarray(ids), r["topk_ids"]):
            raise AssertionError("ids differ after decoding")
        if not len(lp):
            continue
        x = r["topk_logprobs"].astype(np.float64)
        d = np.asarray(lp, np.float64) - x
        p = np.exp(x)
        keep = p >= P_MIN
        if keep.any():
            rel = max(rel, float(np.abs(np.expm1(d[keep])).max()))
        nats = max(nats, float(np.abs(d).max()))
    return rel, nats


def poly_at_equal_error(rows, k, vocab, target) -> tuple[PolyConfig, float]:
    """The fewest residual bits (exact_k = k/8 in float16) whose error is within ``target``."""
    ids = np.concatenate([r["topk_ids"] for r in rows])
    lp = np.concatenate([r["topk_logprobs"] for r in rows])
    p = np.exp(lp.astype(np.float64))
    keep = p >= P_MIN
    for bits in range(4, 17):  # fewer never came close on this teacher (>4 % at 4 bits)
        cfg = PolyConfig(k, vocab, max(1, k // 8), "float16", bits)
        _, got = poly_decode(poly_encode(ids, lp, cfg), cfg)
        err = float(np.abs(np.expm1(got.astype(np.float64) - lp.astype(np.float64))[keep]).max())
        if err <= target:
            return cfg, err
    raise RuntimeError("no residual width reaches the target error")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality-cache", type=Path, default=ROOT / ".quality-cache",
                    help="the quality benchmark's cache folder (holds its teacher)")
    ap.add_argument("--work", type=Path, default=ROOT / ".codec-real", help="where the teacher's rows are cached")
    ap.add_argument("--repeats", type=int, default=3, help="decode timings per format (interleaved)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    teacher = quality_teacher(args.quality_cache)
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    all_rows = teacher_rows(teacher, args.work, max(KS))
    tokens = sum(len(r["input_ids"]) for r in all_rows)
    print(f"teacher {teacher.name}: {len(all_rows)} held-out windows, {tokens:,} tokens", flush=True)
    out_rows, ratios, split_rows = [], [], []
    for k in KS:
        rows = truncate(all_rows, k)
        files = {"naive fp32+int32": naive_file(rows, k), "v1 (fp16+int32, zstd-3)": v1_file(rows, k),
                 "compact v1 (before)": compact_file(rows, k, 1), "compact v2 (now)": compact_file(rows, k, 2)}
        rel_v2, _ = max_rel_error(rows, decode_all(*files["compact v2 (now)"]))
        cfg, _ = poly_at_equal_error(rows, k, vocab, max(rel_v2, GOAL_REL * 0.99))
        rec = PolyConfig(k, vocab, max(1, k // 8), "bfloat16", 0)
        files[f"poly, equal error ({cfg.residual_bits}-bit residuals)"] = poly_file(rows, k, cfg)
        files["poly, recommended (bf16, no residuals)"] = poly_file(rows, k, rec)
        times: dict[str, list[float]] = {name: [] for name in files}
        errors = {}
        for rep in range(args.repeats):
            for name, (data, decode) in files.items():
                t0 = time.perf_counter()
                got = decode_all(data, decode)
                times[name].append(time.perf_counter() - t0)
                if rep == 0:
                    errors[name] = max_rel_error(rows, got)
        v1_name = "v1 (fp16+int32, zstd-3)"
        for name, (data, _) in files.items():
            rel, nats = errors[name]
            speed = [tv / t for t, tv in zip(times[name], times[v1_name])]  # per repeat, side by side
            out_rows.append([k, name, f"{len(data) / tokens:.1f}", f"{tokens / min(times[name]):,.0f}",
                             f"{statistics.median(speed):.2f}", f"{100 * rel:.3f} %", f"{nats:.4f}"])
            print(" | ".join(map(str, out_rows[-1])), flush=True)
        v2_speed = statistics.median(tv / t for t, tv in zip(times["compact v2 (now)"], times[v1_name]))
        ratios.append((k, len(files["compact v2 (now)"][0]) / tokens, errors["compact v2 (now)"][0], v2_speed))
        for name in ("compact v1 (before)", "compact v2 (now)"):
            parts = column_bytes(files[name][0], tokens)
            split_rows.append([k, name, *(f"{parts[g]:.1f}" for g in GROUPS)])
    goal = next(r for r in ratios if r[0] == 64)
    verdict = "PASS" if goal[1] <= 100 and goal[2] <= GOAL_REL else "MISS"
    report = (
        f"## Codec on the quality teacher ({time.strftime('%Y-%m-%d')}, {time.perf_counter() - t_start:.0f} s)\n\n"
        f"Machine: {machine()}\n\n"
        f"Command: `python benchmarks/codec_real.py --repeats {args.repeats}`. Teacher: the quality benchmark's ({teacher.name}, "
        f"V={vocab}, trained on Python standard-library text), scored by the real stage 1 over the quality "
        f"benchmark's held-out windows ({len(all_rows)} windows, {tokens:,} tokens, text it never trained on); "
        f"the truth is its float32 top-128.\n\n"
        + table(["k", "format", "bytes/token (whole file)", "decode tokens/s (best)", "decode speed ÷ v1 (median)",
                 f"max relative error, p ≥ {P_MIN:g}", "max |Δ log p| (nats), all entries"], out_rows)
        + "\n\nWhere the compact files' bytes go (bytes/token, compressed column chunks):\n\n"
        + table(["k", "format", *GROUPS], split_rows)
        + f"\n\n**Goal (issue 17 §3): ≤ 100 B/token at k=64 with every p ≥ 1e-4 within 1 %: {verdict}** "
        f"(compact v2: {goal[1]:.1f} B/token, {100 * goal[2]:.3f} %). "
        f"**Decoding no slower than v1: {'PASS' if goal[3] >= 1 else 'MISS'}** (compact v2 at k=64: "
        f"{goal[3]:.2f}× v1's speed, median of the side-by-side repeats; for the training reader see "
        "the reader section).\n\n"
        "Every file holds the same rows and all their columns (text, tokens, offsets, label log-prob, "
        "log-normaliser: about 12 B/token of the total); one row group, decoded from memory to per-row "
        "(ids, log-probs) arrays, one thread. The ratio to v1 is the median over the repeats of the "
        "timings taken side by side (each repeat decodes every format once), since this 2-core machine is "
        "shared and absolute rates move by 2× between runs. What bounds them: v1 and naive are bounded "
        "by Parquet decompression and slicing rows; compact adds the steps' cumulative sum and, in "
        "version 2, resolving the id references (about ten numpy passes over the k entries of every "
        "referencing position, one level of same-token repeats at a time, each level one contiguous "
        "gather), which is why version 2 decodes slower than compact version 1; it reads less from "
        "Parquet than v1 (half the bytes), which pays for that at k ≥ 64, while at k=16 the "
        "per-position work (finding each position's previous same token, sorting by level) weighs more. "
        "The bytes are bounded by the ids: even by reference, 6-7 bits per id at k=64; the "
        "log-probs take 3.5 bits per entry at the 1 % bound. Poly is our numpy reimplementation of the "
        "DistillKit scheme (benchmarks/codec_poly.py), so its decode speed is bounded by our bit "
        "unpacking, not theirs; its bytes are exact for the scheme (fixed-size records, then zstd-3 "
        "like v1). Its recommended setting stores the top k/8 in bfloat16 and fits the rest with no "
        "residuals: the fit misses the real curves by up to the error shown.\n"
    )
    print(report)
    if not args.no_write:
        update_results("codec-real", report)


if __name__ == "__main__":
    main()
