"""What the non-finite checks cost (issue 13 §1), beside the work they guard, in one run.

    python benchmarks/finite_checks.py [--quick] [--no-write]

Stage 1: the teacher's scoring (``engine.score``: forward, chunked top-k, copy to the host)
against ``first_bad_value`` on what it returns, over the same batches. Stage 2: decoding a
cache's row groups into rows (``decode_rows``, both codecs) against ``value_problems`` on the
same row groups. One thread; each figure the best of 3 passes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, update_results  # noqa: E402


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def stage1_rows(work: Path, quick: bool) -> tuple[list[list], str]:
    from logitcache.pipeline.teacher.engine import first_bad_value
    from logitcache.pipeline.teacher.hf import HFTeacher
    from logitcache.pipeline.tiny import (
        TinyModelConfig, build_tiny_teacher, generate_pairs, load_mistral_tokenizer, mistral_model_file,
    )

    tok = load_mistral_tokenizer(work / "mistral-tok") if mistral_model_file() is not None else None
    what = "Mistral-7B tokenizer, V=32000" if tok is not None else "byte-level BPE, V=512"
    teacher = build_tiny_teacher(work / "teacher", tokenizer=tok, train_steps=0, model_cfg=TinyModelConfig(hidden_size=128))
    engine = HFTeacher(str(teacher), device="cpu", dtype="float32")
    texts = [p + s for p, s in generate_pairs(64 if quick else 256, 1)]
    seqs = sorted((engine.tokenizer(t)["input_ids"] for t in texts), key=len, reverse=True)
    batches = [seqs[a : a + 8] for a in range(0, len(seqs), 8)]
    rows = []
    for k in (64, 256):
        scored: list = []
        score_s = _best(lambda: scored.__setitem__(slice(None), [s for b in batches for s in engine.score(b, k)]))
        check_s = _best(lambda: [first_bad_value(s) for s in scored])
        rows.append([f"stage 1, k={k}", f"{score_s * 1e3:.0f}", f"{check_s * 1e3:.1f}", f"{check_s / score_s:.2%}"])
    tokens = sum(map(len, seqs))
    return rows, f"{len(seqs)} sequences, {tokens:,} tokens, teacher Llama hidden 128 x 2 layers ({what})"


def stage2_rows(work: Path, quick: bool) -> tuple[list[list], str]:
    import pyarrow.parquet as pq

    from logitcache.pipeline.records import TextTemplate
    from logitcache.pipeline.teacher.run import TeacherConfig, run_teacher
    from logitcache.pipeline.tiny import build_tiny_teacher, write_demo_dataset
    from logitcache.storage import open_cache
    from logitcache.storage.decode import decode_rows, shard_id_table
    from logitcache.storage.integrity import value_problems

    from transformers import AutoTokenizer

    from logitcache.pipeline.student.collate import KDCollator
    from logitcache.pipeline.student.dataset import LogitCacheDataset

    data = write_demo_dataset(work / "data.jsonl", n=256 if quick else 2048, seed=1)
    teacher = build_tiny_teacher(work / "t2", train_steps=0)
    tok = AutoTokenizer.from_pretrained(teacher)
    rows = []
    for codec in ("v1", "compact"):
        out = work / f"cache-{codec}"
        run_teacher(TeacherConfig(model=str(teacher), data=str(data), out=str(out), top_k=64, codec=codec,
                                  template=TextTemplate(prompt_field="prompt", response_field="response")), progress=False)
        cache = open_cache(out)
        groups = []
        for i in range(len(cache.manifest.shards)):
            f = pq.ParquetFile(cache.shard_path(i))
            ids = shard_id_table(f)
            groups += [(f.read_row_group(g), ids) for g in range(f.num_row_groups)]
        decode_s = _best(lambda: [list(decode_rows(t, ids)) for t, ids in groups])
        check_s = _best(lambda: [value_problems(t) for t, _ in groups])
        assert all(not value_problems(t) for t, _ in groups)

        def batches() -> None:  # what training reads: decode + check + featurize (align) + collate
            collate, buf = KDCollator(pad_token_id=tok.pad_token_id or 0), []
            for ex in LogitCacheDataset(out, tok, alignment="offset", shuffle=False):
                buf.append(ex)
                if len(buf) == 8:
                    collate(buf)
                    buf = []

        reader_s = _best(batches)
        rows.append([f"stage 2, {codec} codec, k=64: decoding row groups into rows", f"{decode_s * 1e3:.0f}",
                     f"{check_s * 1e3:.1f}", f"{check_s / decode_s:.2%}"])
        rows.append([f"stage 2, {codec} codec, k=64: the training reader (decode, check, align, collate)",
                     f"{reader_s * 1e3:.0f}", f"{check_s * 1e3:.1f}", f"{check_s / reader_s:.2%}"])
    m = open_cache(work / "cache-v1").manifest
    return rows, f"{m.num_examples} examples, {m.num_tokens:,} tokens"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        s1, d1 = stage1_rows(Path(tmp), args.quick)
        s2, d2 = stage2_rows(Path(tmp), args.quick)
    report = (
        f"## Non-finite checks ({time.strftime('%Y-%m-%d')}, {'quick' if args.quick else 'full'} run, "
        f"{time.perf_counter() - t0:.0f} s)\n\n"
        f"Machine: {machine()}; one torch thread\n\n"
        f"Stage 1: {d1}; `engine.score` (forward, top-k, copy to the host) against `first_bad_value` on its output. "
        f"Stage 2: {d2}; `value_problems` on every row group against decoding them into rows (numpy views: the values "
        "are not touched) and against the whole training reader (student batches of 8, offset alignment), which "
        "includes the checks. "
        "Best of 3 passes each.\n\n"
        + table(["where", "the work (ms)", "the checks (ms)", "checks / work"], s1 + s2)
        + "\n"
    )
    print(report)
    if not args.no_write:
        update_results("finite-checks", report)


if __name__ == "__main__":
    main()
