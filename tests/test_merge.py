"""`merge_caches` and `logitcache merge`: the parts of a cluster run become one cache.

The parts are built by hand with ``CacheWriter`` (no teacher needed): 12 records, worker i of
3 holds the records whose index r has r % 3 == i, ``ex-00005`` is skipped (no row). Each
refusal test spoils one thing and checks the error names it and that ``out`` holds no
manifest afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from logitcache.cli.merge import merge
from logitcache.errors import LogitCacheError
from logitcache.storage import CacheWriter, Manifest, load_manifest, open_cache, verify_cache
from logitcache.storage import merge as merge_module
from logitcache.storage.fsutil import hash_files
from logitcache.storage.merge import MergeReport, expand_parts, merge_caches

K = 8
VOCAB = 100
N_RECORDS = 12
SKIPPED = {"ex-00005": "empty response"}
ALL_IDS = [f"ex-{r:05d}" for r in range(N_RECORDS)]


# --- building parts by hand --------------------------------------------------------------


def make_row(rid: str, n: int, seed: int, k: int = K) -> dict:
    """A well-formed row with ``n`` tokens whose numbers pass every check of ``verify_cache``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n - 1, VOCAB))
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    input_ids = rng.integers(0, VOCAB, size=n).astype(np.int32)
    topk_ids = np.argsort(-logprobs, axis=1)[:, :k]
    return {
        "id": rid,
        "text": "".join(chr(ord("a") + int(c)) for c in rng.integers(0, 26, size=2 * n)),
        "prompt_chars": n // 2,
        "target_spans": np.array([[n // 2, 2 * n]], np.int32),
        "truncated": False,
        "input_ids": input_ids,
        "char_start": (2 * np.arange(n)).astype(np.int32),
        "char_end": (2 * np.arange(n) + 2).astype(np.int32),
        "topk_ids": topk_ids.astype(np.int32),
        "topk_logprobs": np.take_along_axis(logprobs, topk_ids, axis=1).astype(np.float16),
        "label_logprob": logprobs[np.arange(n - 1), input_ids[1:]].astype(np.float32),
        "logsumexp": rng.normal(size=n - 1).astype(np.float32),
    }


@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text('{"model": "tiny"}')
    return d


def part_manifest(tokenizer_dir: Path, index: int, count: int, **overrides) -> Manifest:
    sha, files = hash_files(tokenizer_dir)
    fields = dict(
        teacher={"name": "tiny-teacher", "dtype": "float32"},
        tokenizer={"name": "tiny", "sha256": sha, "files": files, "vocab_size": VOCAB},
        k=K,
        mode="score",
        dataset={"source": "train.jsonl", "fingerprint": "f00d", "num_records": N_RECORDS},
        template={"kind": "fields", "prompt_field": "prompt", "response_field": "response"},
        worker={"index": index, "count": count},
    )
    fields.update(overrides)
    return Manifest(**fields)


def write_part(root: Path, tokenizer_dir: Path, index: int, count: int = 3, *, ids=None,
               complete: bool = True, **overrides) -> Path:
    """Worker ``index``'s part: its records (r % count == index) as rows, except the skipped ones."""
    path = root / f"part-{index:05d}-of-{count:05d}"
    m = part_manifest(tokenizer_dir, index, count, **overrides)
    ids = [rid for r, rid in enumerate(ALL_IDS) if r % count == index] if ids is None else ids
    # Tiny shards: about two rows each, so every part has several.
    with CacheWriter(path, m, tokenizer_dir=tokenizer_dir, shard_bytes=1, row_group_bytes=1_400) as w:
        for rid in ids:
            if rid in SKIPPED:
                w.skip(rid, SKIPPED[rid])
            else:
                w.write(make_row(rid, 4 + int(rid[-2:]) % 5, seed=int(rid[-5:]), k=m.k))
        if complete:
            w.mark_complete()
    return path


@pytest.fixture
def parts(tmp_path, tokenizer_dir) -> list[Path]:
    """The three complete parts of one run, under ``tmp_path / "parts"``."""
    return [write_part(tmp_path / "parts", tokenizer_dir, i) for i in range(3)]


def rows_by_id(cache: Path) -> dict[str, dict]:
    return {row["id"]: row for row in open_cache(cache)}


def refuse(out: Path, parts: list[Path], match: str, **kwargs) -> str:
    """merge_caches refuses with a message matching ``match`` and leaves no manifest in ``out``."""
    existed = out.exists()
    with pytest.raises(LogitCacheError) as e:
        merge_caches(out, parts, **kwargs)
    message = str(e.value)
    # Match without the paths: pytest names the tmp directories after the test.
    assert re.search(match, message.replace(str(out.parent), "")), message
    assert "\n" not in message, "one line"
    assert not (out / "manifest.json").exists()
    assert out.exists() == existed, "a refused merge leaves no directory behind"
    return message


# --- a good merge ------------------------------------------------------------------------


def test_three_parts_merge_into_one_cache_that_verifies(tmp_path, parts):
    out = tmp_path / "cache"

    report = merge_caches(out, parts)

    assert isinstance(report, MergeReport) and report.parts == 3
    v = verify_cache(out)  # every value, not just the hashes
    assert v.ok, v.problems
    ids = list(open_cache(out).ids())
    assert len(ids) == len(set(ids)), "every example once"
    assert set(ids) | set(SKIPPED) == set(ALL_IDS), "and none missing"
    m = load_manifest(out)
    assert m.status == "complete" and m.worker is None
    assert m.skipped == SKIPPED


def test_the_merged_cache_holds_the_parts_rows_and_numbers(tmp_path, parts):
    out = tmp_path / "cache"

    report = merge_caches(out, parts)

    merged, pm = rows_by_id(out), [load_manifest(p) for p in parts]
    assert report.shards == len(load_manifest(out).shards) == sum(len(m.shards) for m in pm)
    assert report.examples == len(merged) == sum(m.num_examples for m in pm) == N_RECORDS - len(SKIPPED)
    assert report.tokens == load_manifest(out).num_tokens == sum(m.num_tokens for m in pm)
    assert report.bytes == load_manifest(out).num_bytes == sum(m.num_bytes for m in pm)
    assert report.skipped == len(SKIPPED)
    for part in parts:
        for rid, row in rows_by_id(part).items():
            for name, value in row.items():
                np.testing.assert_array_equal(merged[rid][name], value, err_msg=f"{rid} {name}")


def test_the_merged_manifest_keeps_the_settings_and_the_earliest_creation_time(tmp_path, parts):
    data = json.loads((parts[2] / "manifest.json").read_text())
    data["created_at"] = "2020-01-01T00:00:00+00:00"
    (parts[2] / "manifest.json").write_text(json.dumps(data))
    out = tmp_path / "cache"

    merge_caches(out, parts)

    m, p0 = load_manifest(out), load_manifest(parts[0])
    assert {**m.settings(), "worker": p0.worker} == p0.settings()
    assert m.created_at == "2020-01-01T00:00:00+00:00"
    assert (out / "tokenizer" / "tokenizer.json").read_text() == '{"model": "tiny"}'
    assert "| examples | 11 |" in (out / "README.md").read_text()
    assert [s.path for s in m.shards][:2] == ["data/part-00000-shard-00000.parquet", "data/part-00000-shard-00001.parquet"]


def test_shards_are_hard_linked_by_default(tmp_path, parts):
    out = tmp_path / "cache"

    report = merge_caches(out, parts)

    sources = [p / s.path for p in parts for s in load_manifest(p).shards]
    merged = [out / s.path for s in load_manifest(out).shards]
    assert [os.stat(a).st_ino for a in sources] == [os.stat(b).st_ino for b in merged]
    assert report.linked == len(merged) and report.copied == 0


def test_link_false_copies_the_shards(tmp_path, parts):
    out = tmp_path / "cache"

    report = merge_caches(out, parts, link=False)

    sources = [p / s.path for p in parts for s in load_manifest(p).shards]
    merged = [out / s.path for s in load_manifest(out).shards]
    assert all(os.stat(a).st_ino != os.stat(b).st_ino for a, b in zip(sources, merged))
    assert [a.read_bytes() for a in sources] == [b.read_bytes() for b in merged]
    assert report.copied == len(merged) and report.linked == 0
    assert verify_cache(out).ok


def test_shards_are_copied_where_a_hard_link_cannot_be_made(tmp_path, parts, monkeypatch):
    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(merge_module.os, "link", cross_device)

    report = merge_caches(tmp_path / "cache", parts)

    assert report.linked == 0 and report.copied == report.shards > 0
    assert verify_cache(tmp_path / "cache").ok


def test_parts_may_come_in_any_order_and_into_an_empty_directory(tmp_path, parts):
    out = tmp_path / "cache"
    out.mkdir()

    merge_caches(out, parts[::-1])

    assert load_manifest(out).shards[0].path == "data/part-00000-shard-00000.parquet"
    assert verify_cache(out).ok


def test_parts_without_num_records_merge_with_a_warning(tmp_path, tokenizer_dir):
    dataset = {"source": "train.jsonl", "fingerprint": "f00d"}
    parts = [write_part(tmp_path / "parts", tokenizer_dir, i, dataset=dataset) for i in range(3)]

    with pytest.warns(UserWarning, match="num_records"):
        report = merge_caches(tmp_path / "cache", parts)

    assert report.warnings and verify_cache(tmp_path / "cache").ok


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, value, named",
    [
        ("teacher", {"name": "other-teacher", "dtype": "float32"}, "teacher.name"),
        ("k", 4, "k:"),
        ("template", {"kind": "fields", "text_field": "text"}, "template"),
        ("dataset", {"source": "train.jsonl", "fingerprint": "beef", "num_records": N_RECORDS}, "dataset.fingerprint"),
    ],
)
def test_parts_with_different_settings_are_refused(tmp_path, tokenizer_dir, setting, value, named):
    root = tmp_path / "parts"
    parts = [write_part(root, tokenizer_dir, 0), write_part(root, tokenizer_dir, 1, **{setting: value}),
             write_part(root, tokenizer_dir, 2)]

    message = refuse(tmp_path / "cache", parts, "different settings")

    assert named in message and str(parts[0]) in message and str(parts[1]) in message


def test_a_missing_part_is_refused_naming_its_index(tmp_path, parts):
    message = refuse(tmp_path / "cache", [parts[0], parts[2]], "missing")

    assert "part 1 of 3" in message and "part-00001-of-00003" in message


def test_a_duplicated_part_is_refused_naming_both_paths(tmp_path, parts):
    twin = tmp_path / "elsewhere" / parts[1].name
    shutil.copytree(parts[1], twin)

    message = refuse(tmp_path / "cache", [*parts, twin], "both part 1 of 3")

    assert str(parts[1]) in message and str(twin) in message


def test_parts_of_different_splits_are_refused(tmp_path, tokenizer_dir, parts):
    other = write_part(tmp_path / "other", tokenizer_dir, 1, count=2)

    refuse(tmp_path / "cache", [parts[0], other], "different splits")


def test_a_partial_part_is_refused(tmp_path, tokenizer_dir):
    root = tmp_path / "parts"
    parts = [write_part(root, tokenizer_dir, i, complete=i != 1) for i in range(3)]

    message = refuse(tmp_path / "cache", parts, "is partial")

    assert str(parts[1]) in message and "rerun its teacher command (--num-parts 3 --part-index 1)" in message


def test_a_cache_that_is_not_a_worker_part_is_refused(tmp_path, tokenizer_dir, parts):
    whole = write_part(tmp_path / "whole", tokenizer_dir, 0, worker=None, ids=ALL_IDS)

    refuse(tmp_path / "cache", [whole, *parts[1:]], "not a part of a split run")


def test_an_example_in_two_parts_is_refused(tmp_path, tokenizer_dir):
    root = tmp_path / "parts"
    own = [rid for r, rid in enumerate(ALL_IDS) if r % 3 == 1]
    parts = [write_part(root, tokenizer_dir, 0), write_part(root, tokenizer_dir, 1, ids=[*own, "ex-00003"]),
             write_part(root, tokenizer_dir, 2)]

    message = refuse(tmp_path / "cache", parts, "'ex-00003' is in both")

    assert str(parts[0]) in message and str(parts[1]) in message


def test_a_missing_example_is_refused(tmp_path, tokenizer_dir):
    dataset = {"source": "train.jsonl", "fingerprint": "f00d", "num_records": N_RECORDS + 1}
    parts = [write_part(tmp_path / "parts", tokenizer_dir, i, dataset=dataset) for i in range(3)]

    message = refuse(tmp_path / "cache", parts, "13 records")

    assert "part-00000-of-00003 has 4 of 5" in message  # record 12 belongs to worker 0


def test_an_out_directory_that_is_not_empty_is_refused(tmp_path, parts):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    refuse(out, parts, "not empty")

    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_part_with_a_corrupted_shard_is_refused(tmp_path, parts):
    shard = parts[1] / load_manifest(parts[1]).shards[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))

    message = refuse(tmp_path / "cache", parts, "damaged")

    assert str(parts[1]) in message and "rerun its teacher command (--part-index 1)" in message


def test_a_shard_whose_sha256_differs_is_refused_unless_verify_is_off(tmp_path, parts):
    # Another valid shard in place of the listed one, its size recorded: only the hash tells.
    data = json.loads((parts[1] / "manifest.json").read_text())
    first, second = data["shards"][0], data["shards"][1]
    shutil.copyfile(parts[1] / second["path"], parts[1] / first["path"])
    first["bytes"] = second["bytes"]
    (parts[1] / "manifest.json").write_text(json.dumps(data))
    refuse(tmp_path / "cache", parts, "sha256")  # the ids would also clash; the hash check comes first

    message = refuse(tmp_path / "cache", parts, "'ex-0000.' is in it twice", verify=False)

    assert str(parts[1]) in message


def test_a_damaged_tokenizer_is_refused(tmp_path, parts):
    (parts[0] / "tokenizer" / "tokenizer.json").write_text('{"model": "edited"}')

    message = refuse(tmp_path / "cache", parts, "tokenizer/tokenizer.json: sha256 differs")

    assert str(parts[0]) in message


def test_a_shard_linked_from_outside_the_part_is_refused(tmp_path, parts):
    # Same bytes, so size and sha256 match: only the link itself gives it away.
    shard = parts[1] / load_manifest(parts[1]).shards[0].path
    outside = tmp_path / "elsewhere.parquet"
    shutil.move(shard, outside)
    shard.symlink_to(outside)

    refuse(tmp_path / "cache", parts, "outside the cache directory")


def test_a_tokenizer_file_linked_from_outside_the_part_is_refused_even_without_verify(tmp_path, parts):
    tok = parts[0] / "tokenizer" / "tokenizer.json"
    outside = tmp_path / "tokenizer.json"
    shutil.move(tok, outside)
    tok.symlink_to(outside)

    refuse(tmp_path / "cache", parts, "tokenizer", verify=False)


def test_an_out_directory_inside_a_part_is_refused_before_anything_is_made(tmp_path, parts):
    out = parts[0] / "merged"

    refuse(out, parts, "inside the part")


@pytest.mark.parametrize("existing", [True, False], ids=["empty-out", "new-out"])
def test_a_failure_while_writing_leaves_no_cache(tmp_path, parts, monkeypatch, existing):
    calls = []
    place = merge_module._place

    def flaky(src, dst, link):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return place(src, dst, link)

    monkeypatch.setattr(merge_module, "_place", flaky)
    out = tmp_path / "cache" if existing else tmp_path / "new" / "cache"
    if existing:
        out.mkdir()

    refuse(out, parts, "No space left")

    assert len(calls) == 3
    if existing:
        assert list(out.iterdir()) == [], "what the merge made is removed; the empty directory stays"
    else:
        assert not (tmp_path / "new").exists(), "directories the merge made are removed"
    assert all(verify_cache(p).ok for p in parts), "the parts are untouched"


# --- the command line --------------------------------------------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    app.command("merge")(merge)
    return app


def test_cli_merges_the_parts_of_a_directory(tmp_path, parts):
    out = tmp_path / "cache"

    r = CliRunner().invoke(cli(), ["merge", str(out), str(tmp_path / "parts")])

    assert r.exit_code == 0, r.output
    assert r.output.startswith("merged 3 parts into") and len(r.output.strip().splitlines()) == 1
    assert expand_parts([tmp_path / "parts"]) == parts
    assert verify_cache(out).ok


def test_cli_logs_each_stage_of_a_long_merge_on_stderr(tmp_path, parts):
    shards = sum(len(load_manifest(p).shards) for p in parts)

    r = CliRunner().invoke(cli(), ["merge", str(tmp_path / "cache"), str(tmp_path / "parts"), "--log-every", "0"])

    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("merged 3 parts into") and len(r.stdout.strip().splitlines()) == 1
    stages = [re.match(rf"merge, ([a-z ]+): (\d+)/{shards} shards", line) for line in r.stderr.splitlines()]
    assert all(stages), r.stderr
    for stage in ("hashing", "reading ids", "placing"):
        assert [int(m[2]) for m in stages if m[1] == stage] == list(range(shards)), stage


def test_cli_refusal_is_one_error_line(tmp_path, parts):
    shutil.rmtree(parts[2])

    r = CliRunner().invoke(cli(), ["merge", str(tmp_path / "cache"), str(tmp_path / "parts")])

    assert r.exit_code != 0 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "part 2 of 3 missing" in errors[0], r.output
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("point", ["merge.placed", "merge.saved"])
def test_a_killed_merge_reruns_as_is(tmp_path, parts, point):
    import os
    import subprocess
    import sys

    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "logitcache", "merge", str(out), *map(str, parts)]
    killed = subprocess.run(cmd, env={**os.environ, "LOGITCACHE_CRASH_AT": f"{point}:1"}, capture_output=True,
                            text=True, timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr
    assert (out / ".merging").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)

    assert again.returncode == 0, again.stderr
    assert verify_cache(out).ok and not (out / ".merging").exists()
    assert sorted(rows_by_id(out)) == sorted(i for p in parts for i in rows_by_id(p))


def test_a_merge_marker_with_foreign_files_is_refused_touching_nothing(tmp_path, parts):
    out = tmp_path / "merged"
    out.mkdir()
    (out / ".merging").write_text('{"logitcache": ".merging", "creates": ["data"]}')
    (out / "notes.txt").write_text("mine")

    with pytest.raises(LogitCacheError, match=r"notes.txt.*nothing was removed"):
        merge_caches(out, parts)
    assert (out / "notes.txt").read_text() == "mine"


def test_parts_claiming_a_billion_workers_are_refused_without_listing_them(tmp_path, parts):
    for part in parts:  # hostile manifests: the same huge split in every part
        data = json.loads((part / "manifest.json").read_text())
        data["worker"]["count"] = 10**9
        (part / "manifest.json").write_text(json.dumps(data))

    message = refuse(tmp_path / "merged", parts, r"parts 3, 4, .* \(999,999,997 in all\) of 1000000000 missing")
    assert len(message) < 2000
