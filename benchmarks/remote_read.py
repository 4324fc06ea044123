"""Stage-2 read throughput from object storage vs local disk, same cache, side by side.

    python benchmarks/remote_read.py [--cache DIR] [--repeats 3] [--no-write]

The cache (default: the quality benchmark's top-64 teacher cache if `make quality` left one,
else a tiny-teacher cache built here) is read, one rank, no workers, through
``LogitCacheDataset`` exactly as ``train`` builds it, from:

- local disk;
- a loopback S3 server (moto's ThreadedMotoServer, started here), row groups streamed by
  ranged GETs, each checked against its sha256 before parsing (the default for URLs);
- the same with the per-row-group digests removed from the manifest (a cache written before
  them: each shard fetched whole, checked, parsed from memory);
- the S3 cache through ``--local-cache`` once its copies exist (a second epoch or run).

Two paths: raw rows (fetch, check, decode: what the storage layer costs) and collated student
batches (the trainer's path: the student (here the teacher's own tokenizer) retokenizes and
aligns, KDCollator pads). Sources are interleaved within each repeat; mean ± std over repeats.
A cache written before the digests is given them here from its own files, as the writer now
records them (storage/segments.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, update_results  # noqa: E402

QUALITY = Path(__file__).resolve().parent / ".quality-cache" / "full"


def default_cache(work: Path) -> Path:
    """The quality benchmark's first top-64 cache, else a small tiny-teacher cache built now."""
    for manifest in sorted(QUALITY.glob("stage1-*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("k") == 64 and m.get("status") == "complete":
            return manifest.parent
    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import TeacherConfig, run_teacher
    from logitcache.pipeline.tiny import build_tiny_teacher, write_demo_dataset

    teacher = build_tiny_teacher(work / "teacher", train_steps=0)
    data = write_demo_dataset(work / "data.jsonl", n=400, seed=1)
    out = work / "built"
    run_teacher(TeacherConfig(model=str(teacher), data=str(data), out=str(out), top_k=64,
                              template=TextTemplate(text_field="text"), batch_size=8), progress=False)
    return out


def with_digests(src: Path, dst: Path, digests: bool) -> Path:
    """A copy of the cache whose manifest has (or lacks) the per-row-group sha256 of its shards."""
    from logitcache.storage.segments import shard_segments

    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    for shard in data["shards"]:
        if digests:
            groups, footer = shard_segments(dst / shard["path"])
            shard["row_groups"], shard["footer"] = [list(g) for g in groups], list(footer)
        else:
            shard.pop("row_groups", None)
            shard.pop("footer", None)
    (dst / "manifest.json").write_text(json.dumps(data, indent=2))
    return dst


def start_s3() -> object:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}"})
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="bench")
    return server


def read_once(cache: str, tokenizer, local_cache: Path | None) -> tuple[float, float, int]:
    """Wall and CPU seconds (this process: the S3 server's thread included) to build the dataset and
    read one epoch (raw rows, or collated batches), and its tokens."""
    from torch.utils.data import DataLoader

    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.dataset import LogitCacheDataset

    t0, c0 = time.perf_counter(), time.process_time()
    ds = LogitCacheDataset(cache, tokenizer, shuffle=True, seed=0, rank=0, world_size=1, local_cache=local_cache,
                           batch_size=8)
    tokens = 0
    if tokenizer is None:
        for row in ds:
            tokens += len(row["input_ids"])
    else:
        for batch in DataLoader(ds, batch_size=8, collate_fn=KDCollator(pad_token_id=tokenizer.pad_token_id or 0)):
            tokens += int(batch["attention_mask"].sum())
    return time.perf_counter() - t0, time.process_time() - c0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, help="a local cache to read (default: see the module docstring)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = ap.parse_args()

    import fsspec
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="remote-read-"))
    server = start_s3()
    try:
        src = args.cache or default_cache(work)
        local = with_digests(src, work / "cache", digests=True)
        old = with_digests(src, work / "old", digests=False)
        fs = fsspec.filesystem("s3")
        fs.put(str(local), "bench/cache", recursive=True)
        fs.put(str(old), "bench/old", recursive=True)
        copies = work / "copies"
        sources = {
            "local disk": (str(local), None),
            "S3, row groups by range (sha256 each)": ("s3://bench/cache", None),
            "S3, older cache (shard whole, sha256)": ("s3://bench/old", None),
            "S3, --local-cache (copies made)": ("s3://bench/cache", copies),
        }
        read_once("s3://bench/cache", None, copies)  # makes the copies: later reads are the reuse
        tok = AutoTokenizer.from_pretrained(local / "tokenizer")
        m = json.loads((local / "manifest.json").read_text())
        times: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        counted: dict[str, int] = {}
        for path, tokenizer in (("raw rows", None), ("student batches", tok)):
            for name, (cache, lc) in sources.items():
                read_once(cache, tokenizer, lc)  # warm: imports, tokenizer download, featurizer
            for _ in range(args.repeats):
                for name, (cache, lc) in sources.items():
                    seconds, cpu_seconds, tokens = read_once(cache, tokenizer, lc)
                    times.setdefault((path, name), []).append(seconds)
                    cpu.setdefault((path, name), []).append(cpu_seconds)
                    counted[path] = tokens
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    def rate(path: str, name: str, of=times) -> str:
        rates = [counted[path] / s for s in of[(path, name)]]
        return f"{statistics.mean(rates):,.0f} ± {statistics.stdev(rates) if len(rates) > 1 else 0:,.0f}"

    base = {p: statistics.mean(counted[p] / s for s in times[(p, "local disk")]) for p in ("raw rows", "student batches")}
    rows = []
    for name in sources:
        rel = [f"{statistics.mean(counted[p] / s for s in times[(p, name)]) / base[p]:.2f}" for p in base]
        rows.append([name, rate("raw rows", name), rel[0], rate("raw rows", name, cpu),
                     rate("student batches", name), rel[1], rate("student batches", name, cpu)])
    shards = m["shards"]
    groups = sum(len(s.get("row_groups") or []) for s in shards)
    what = "the quality teacher's top-64 v1 cache" if src.parent == QUALITY or args.cache else "a tiny-teacher cache"
    command = "python benchmarks/remote_read.py" + (f" --cache {args.cache}" if args.cache else "")
    body = f"""## Stage 2: reading from S3 (loopback) vs local disk ({time.strftime('%Y-%m-%d')}, {args.repeats} repeats)

`{command}` on {machine()}.

Cache: {what} (k={m['k']}, {sum(s['rows'] for s in shards)} examples, {sum(s['tokens'] for s in shards):,} tokens,
{sum(s['bytes'] for s in shards) / 2**20:.1f} MiB in {len(shards)} shard(s) of {groups} row groups). One rank, no
dataloader workers, `LogitCacheDataset` as `train` builds it (shuffled, every shard checked at construction); each
figure includes building the dataset. S3 is moto's ThreadedMotoServer on 127.0.0.1: a Python server whose per-request
cost stands in for network latency; its bandwidth is above a real bucket's and far below a local disk's. Tokens/s,
mean ± std over the repeats (wall clock; and per CPU-second of this process, the S3 server's thread included,
which other jobs on the machine disturb less).

{table(["source", "raw rows: tokens/s", "vs local", "tokens/CPU-s", "student batches: tokens/s", "vs local",
        "tokens/CPU-s"], rows)}

Raw rows: fetch, sha256, Parquet decode, row assembly. Student batches: the trainer's path, the teacher's own
tokenizer as the student's (retokenize, align by offset, collate to padded tensors), which costs far more than the
reading. `--local-cache` reads its verified copies (made before timing; sha256 checked once per process).
"""
    print(body)
    if not args.no_write:
        update_results("remote-read", body)


if __name__ == "__main__":
    main()
