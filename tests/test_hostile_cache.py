"""Caches and models from elsewhere are data, never code, and never a way out of the cache.

- manifest.json is validated field by field against its schema (storage/manifest.py);
- a path a manifest names (``../``, absolute, a symlink pointing out) is refused by the
  reader, by verify and by the training dataset;
- the cache's tokenizer is loaded only after its files match the manifest's sha256, and
  never with remote code;
- no pickle: the format is Parquet + JSON, and the package never unpickles;
- ``--trust-remote-code`` is off unless given, for teacher, train and eval.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from logitcache import LogitCacheError
from logitcache.cli import app
from logitcache.pipeline.student.dataset import LogitCacheDataset
from logitcache.storage import load_manifest, open_cache, verify_cache
from logitcache.storage.fsutil import hash_files
from logitcache.storage.manifest import resolve_inside

SHARD = "data/shard-00001.parquet"
PACKAGE = Path(__file__).resolve().parent.parent / "logitcache"
runner = CliRunner()


def _edit_manifest(cache: Path, edit) -> None:
    path = cache / "manifest.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _set_shard(i: int, **fields):
    return lambda d: d["shards"][i].update(fields)


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


# --- the manifest schema ----------------------------------------------------------------------

SCHEMA_CASES = {
    "shard path with ..": (_set_shard(1, path="../x.parquet"), "'shards[1].path'"),
    "absolute shard path": (_set_shard(1, path="/etc/passwd"), "'shards[1].path'"),
    "shard path escaping through data/": (_set_shard(1, path="data/../../x.parquet"), "'shards[1].path'"),
    "shard path in a sub-directory": (_set_shard(1, path="data/sub/x.parquet"), "'shards[1].path'"),
    "shard listed twice": (lambda d: d["shards"].append(dict(d["shards"][0])), "a second time"),
    "row count as a string": (_set_shard(1, rows="12"), "'shards[1].rows' must be an integer"),
    "k of a trillion": (lambda d: d.update(k=10**12), "'k' must be between 0 and"),
    "template field holding a list": (lambda d: d["template"].update(text_field=[1]), "'template.text_field' must be text"),
    "template field holding an object": (lambda d: d["template"].update(kind={"a": 1}), "'template.kind' must be text"),
    "negative byte count": (_set_shard(1, bytes=-1), "'shards[1].bytes' must be 0 or more"),
    "sha256 not a digest": (_set_shard(1, sha256="abc"), "'shards[1].sha256'"),
    "shard entry without sha256": (lambda d: d["shards"][1].pop("sha256"), "'shards[1]' lacks sha256"),
    "k of 0": (lambda d: d.update(k=0), "'k' is 0 with no sampled targets"),
    "k as true": (lambda d: d.update(k=True), "'k' must be an integer"),
    "unknown mode": (lambda d: d.update(mode="steal"), "'mode' must be one of score, generate"),
    "teacher not an object": (lambda d: d.update(teacher="x"), "'teacher' must be an object"),
    "shards not a list": (lambda d: d.update(shards="all"), "'shards' must be a list"),
    "worker index beyond count": (lambda d: d.update(worker={"index": 3, "count": 2}), "'worker'"),
    "tokenizer file outside tokenizer/": (
        lambda d: d["tokenizer"]["files"].update({"../../etc/passwd": "0" * 64}), "'tokenizer.files'"),
    "format_version as a string": (lambda d: d.update(format_version="1"), "format_version '1' is not supported"),
    "unknown codec": (lambda d: d.update(codec="zip"), "codec 'zip' is not known"),
}


@pytest.mark.parametrize("case", SCHEMA_CASES)
def test_a_manifest_failing_the_schema_is_refused_naming_the_field(case, cache_copy):
    edit, needle = SCHEMA_CASES[case]
    _edit_manifest(cache_copy, edit)

    with pytest.raises(LogitCacheError) as e:
        load_manifest(cache_copy)

    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_manifest_field_has_a_type_in_the_schema():
    import dataclasses

    from logitcache.storage.manifest import MANIFEST_FIELD_TYPES, Manifest

    assert set(MANIFEST_FIELD_TYPES) == {f.name for f in dataclasses.fields(Manifest)}


def test_the_sound_manifest_passes_the_schema(built_cache):
    assert len(load_manifest(built_cache).shards) > 1


def test_verify_refuses_a_manifest_failing_the_schema_with_one_line(cache_copy):
    _edit_manifest(cache_copy, _set_shard(1, path="../../outside.parquet"))

    line = _one_error_line(runner.invoke(app, ["verify", str(cache_copy)]))

    assert "'shards[1].path'" in line and "outside the cache" in line


def test_training_refuses_a_manifest_failing_the_schema(cache_copy):
    _edit_manifest(cache_copy, _set_shard(1, path="/etc/passwd"))

    with pytest.raises(LogitCacheError, match=r"'shards\[1\].path'"):
        LogitCacheDataset(cache_copy, skip_bad_shards=True)  # a hostile manifest is not a bad shard


# --- paths that lead out of the cache -----------------------------------------------------------


def _link_out(cache: Path, rel: str, outside: Path) -> None:
    """Move ``rel`` out of the cache and leave a symlink to it (same bytes, same sha256)."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    (cache / rel).rename(outside)
    (cache / rel).symlink_to(outside)


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "data/../../x", ""])
def test_resolve_inside_refuses_paths_that_leave_the_directory(rel, tmp_path):
    with pytest.raises(LogitCacheError, match="outside the cache directory"):
        resolve_inside(tmp_path, rel)


def test_resolve_inside_accepts_a_symlink_that_stays_inside(tmp_path):
    (tmp_path / "real.parquet").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link.parquet").symlink_to(tmp_path / "real.parquet")

    assert resolve_inside(tmp_path, "data/link.parquet") == tmp_path / "data" / "link.parquet"


def test_reader_refuses_a_shard_symlinked_outside(cache_copy, tmp_path):
    _link_out(cache_copy, SHARD, tmp_path / "elsewhere" / "shard.parquet")

    with pytest.raises(LogitCacheError, match="outside the cache directory"):
        list(open_cache(cache_copy))


def test_verify_reports_a_shard_symlinked_outside(cache_copy, tmp_path):
    _link_out(cache_copy, SHARD, tmp_path / "elsewhere" / "shard.parquet")

    r = runner.invoke(app, ["verify", str(cache_copy)])

    assert r.exit_code == 1, r.output
    assert any(SHARD in line and "outside the cache directory" in line for line in r.output.splitlines())


def test_dataset_refuses_a_shard_symlinked_outside_even_when_skipping_bad_shards(cache_copy, tmp_path):
    _link_out(cache_copy, SHARD, tmp_path / "elsewhere" / "shard.parquet")

    with pytest.raises(LogitCacheError, match="shard-00001.parquet: links to .*outside the cache directory"):
        LogitCacheDataset(cache_copy, skip_bad_shards=True)


def test_verify_reports_a_tokenizer_file_symlinked_outside(cache_copy, tmp_path):
    _link_out(cache_copy, "tokenizer/tokenizer.json", tmp_path / "elsewhere" / "tokenizer.json")

    report = verify_cache(cache_copy, check_values=False)

    assert any(p.startswith("tokenizer/tokenizer.json") and "outside the cache directory" in p for p in report.problems)


def test_verify_reports_a_tokenizer_directory_symlinked_outside(cache_copy, tmp_path):
    _link_out(cache_copy, "tokenizer", tmp_path / "elsewhere" / "tokenizer")

    report = verify_cache(cache_copy, check_values=False)

    assert any(p.startswith("tokenizer/") and "outside the cache directory" in p for p in report.problems)


# --- the cache's tokenizer ------------------------------------------------------------------------


def test_an_altered_tokenizer_file_is_refused_before_loading(cache_copy):
    tok = cache_copy / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text(encoding="utf-8").replace("{", "{ ", 1), encoding="utf-8")

    with pytest.raises(LogitCacheError, match=r"tokenizer/tokenizer.json: sha256 differs.*logitcache verify"):
        open_cache(cache_copy).verified_tokenizer_dir()


def test_an_unlisted_tokenizer_file_is_refused_before_loading(cache_copy):
    (cache_copy / "tokenizer" / "added_tokens.json").write_text('{"<evil>": 0}')

    with pytest.raises(LogitCacheError, match="tokenizer/added_tokens.json: not listed in the manifest"):
        open_cache(cache_copy).verified_tokenizer_dir()


def test_a_sound_tokenizer_passes_the_check(built_cache):
    assert open_cache(built_cache).verified_tokenizer_dir() == built_cache / "tokenizer"


def test_train_refuses_an_altered_cache_tokenizer_with_one_line(tmp_path, cache_copy, student):
    tok = cache_copy / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text(encoding="utf-8").replace("{", "{ ", 1), encoding="utf-8")

    r = runner.invoke(app, ["train", "--student", str(student), "--cache", str(cache_copy), "--out",
                            str(tmp_path / "run"), "--loss", "kl", "--no-progress"])

    line = _one_error_line(r)
    assert "tokenizer/tokenizer.json: sha256 differs" in line and "logitcache verify" in line


def test_inspect_shows_ids_rather_than_load_an_altered_tokenizer(cache_copy):
    tok = cache_copy / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text(encoding="utf-8").replace("{", "{ ", 1), encoding="utf-8")

    r = runner.invoke(app, ["inspect", str(cache_copy)])

    assert r.exit_code == 0, r.output
    assert "showing token ids" in r.output and "sha256 differs" in r.output


def _plant_remote_code(cache: Path, marker: Path) -> None:
    """Make the cache's tokenizer ask for its own Python class (which would write ``marker``),
    and record the new files' hashes in the manifest, as a hostile writer would."""
    tok = cache / "tokenizer"
    (tok / "evil_tok.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]})
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    digest, files = hash_files(tok)
    _edit_manifest(cache, lambda d: d["tokenizer"].update(sha256=digest, files=files))


def test_the_cache_tokenizer_never_runs_its_own_code(tmp_path, cache_copy, student):
    from logitcache.pipeline.student.train import TrainConfig, check_compatibility
    from logitcache.pipeline.loading import load_tokenizer

    marker = tmp_path / "code-ran"
    _plant_remote_code(cache_copy, marker)
    cfg = TrainConfig(student=str(student), cache=str(cache_copy), out=str(tmp_path / "o"), loss="kl",
                      trust_remote_code=True)  # trusting the student's code is not trusting the cache's

    with pytest.raises(LogitCacheError, match="custom code"):
        check_compatibility(cfg, load_tokenizer(str(student), "--student"), open_cache(cache_copy))

    assert not marker.exists()


# --- no pickle --------------------------------------------------------------------------------------

_UNPICKLING = re.compile(r"\bpickle\b|\bcPickle\b|\bdill\b|\bjoblib\b|torch\.load\(|allow_pickle\s*=\s*True"
                         r"|weights_only\s*=\s*False")


def test_the_package_never_unpickles():
    hits = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _UNPICKLING.search(line)
    ]
    assert hits == []


def test_a_cache_holds_only_parquet_json_and_text(built_cache):
    for path in sorted(p for p in built_cache.rglob("*") if p.is_file()):
        data = path.read_bytes()
        rel = path.relative_to(built_cache).as_posix()
        assert not data.startswith(b"\x80"), f"{rel} looks like a pickle"
        if path.suffix == ".parquet":
            assert data[:4] == data[-4:] == b"PAR1", rel
        elif path.suffix == ".json":
            json.loads(data)
        else:
            assert path.suffix in (".md", ".jinja", ".txt"), rel
            data.decode("utf-8")


# --- trust_remote_code ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["teacher", "train", "eval"])
def test_trust_remote_code_is_an_off_by_default_flag(command):
    import typer.main

    click_cmd = typer.main.get_command(app).commands[command]
    (param,) = [p for p in click_cmd.params if p.name == "trust_remote_code"]

    assert param.opts == ["--trust-remote-code"] and param.default is False and param.is_flag


def test_configs_default_to_no_remote_code():
    from logitcache.pipeline.student.evaluate import EvalConfig
    from logitcache.pipeline.student.train import TrainConfig
    from logitcache.pipeline.teacher.run import TeacherConfig

    assert TrainConfig(student="s", cache="c", out="o").trust_remote_code is False
    assert EvalConfig(model="m", data="d").trust_remote_code is False
    assert TeacherConfig(model="m", data="d", out="o").trust_remote_code is False


def _loader_kwargs(monkeypatch, args: list[str]) -> list[dict]:
    """The keyword arguments the command passes to the model/tokenizer loaders (stopped at the first)."""
    import logitcache.pipeline.loading as loading

    seen = []

    def capture(name, option, **kwargs):
        seen.append(kwargs)
        raise LogitCacheError("stop here")

    monkeypatch.setattr(loading, "load_tokenizer", capture)
    monkeypatch.setattr(loading, "load_causal_lm", capture)
    r = runner.invoke(app, args)
    assert "stop here" in r.output, r.output
    return seen


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust-remote-code"], True)])
def test_train_passes_the_flag_to_the_student_loader(flag, expected, monkeypatch, tmp_path, built_cache):
    args = ["train", "--student", "./s", "--cache", str(built_cache), "--out", str(tmp_path / "o"), *flag]

    assert _loader_kwargs(monkeypatch, args)[0]["trust_remote_code"] is expected


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust-remote-code"], True)])
def test_eval_passes_the_flag_to_the_model_loader(flag, expected, monkeypatch, data_file):
    args = ["eval", "--model", "./m", "--data", str(data_file), "--prompt-field", "prompt",
            "--response-field", "response", *flag]

    assert _loader_kwargs(monkeypatch, args)[0]["trust_remote_code"] is expected


@pytest.mark.parametrize("skip", [False, True])
def test_a_fifo_in_place_of_a_shard_is_refused_not_waited_on(cache_copy, skip):
    import os

    shard = cache_copy / SHARD
    shard.unlink()
    os.mkfifo(shard)
    _edit_manifest(cache_copy, _set_shard(1, bytes=0))  # sizes made to match: only the file type tells

    if not skip:
        with pytest.raises(LogitCacheError, match="not a regular file"):
            LogitCacheDataset(cache_copy, shuffle=False)
    else:
        ds = LogitCacheDataset(cache_copy, shuffle=False, skip_bad_shards=True)
        assert [b.path for b in ds.skipped_shards] == [SHARD]
    assert not verify_cache(cache_copy).ok


def test_hashing_refuses_a_device_or_fifo(tmp_path):
    import os

    from logitcache.storage.fsutil import sha256_file

    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "fifo", "/dev/zero", tmp_path):
        with pytest.raises(LogitCacheError, match="not a regular file"):
            sha256_file(path)


def _rewrite_table(cache: Path, change) -> None:
    """Rewrite SHARD through ``change(table) -> table`` and re-record its size and sha256."""
    import pyarrow.parquet as pq

    from logitcache.storage.fsutil import sha256_file

    path = cache / SHARD
    pq.write_table(change(pq.read_table(path)), path)
    _edit_manifest(cache, _set_shard(1, bytes=path.stat().st_size, sha256=sha256_file(path)))


def test_a_v1_shard_whose_metadata_claims_the_compact_codec_reads_as_the_manifest_says(cache_copy):
    from logitcache.storage.codec import CODEC_NAME, META_CODEC

    everything = sorted(r["id"] for r in LogitCacheDataset(cache_copy, shuffle=False))
    _rewrite_table(cache_copy, lambda t: t.replace_schema_metadata({META_CODEC: CODEC_NAME}))

    assert verify_cache(cache_copy).ok
    assert sorted(r["id"] for r in LogitCacheDataset(cache_copy, shuffle=False)) == everything


def test_a_null_inside_a_list_column_is_refused_by_verify_and_train_alike(cache_copy):
    from test_hostile_matrix import null_in_a_list  # the matrix's damage: a null id inside input_ids

    null_in_a_list(cache_copy)

    report = verify_cache(cache_copy)
    assert any(SHARD in p and "null values in column(s) input_ids" in p for p in report.problems), report.problems
    with pytest.raises(LogitCacheError, match="null values in column"):
        list(LogitCacheDataset(cache_copy, shuffle=False))


def test_a_manifest_nested_thousands_deep_is_one_line(cache_copy):
    (cache_copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)

    with pytest.raises(LogitCacheError, match="nested too deeply"):
        load_manifest(cache_copy)
    r = runner.invoke(app, ["verify", str(cache_copy)])
    assert "nested too deeply" in _one_error_line(r)


def test_a_zlib_bomb_in_a_compact_footer_is_refused_without_inflating_it(tmp_path, teacher_dir, data_file):
    import base64
    import zlib

    import pyarrow.parquet as pq
    from conftest import make_config

    from logitcache.pipeline.teacher.run import run_teacher
    from logitcache.storage.codec import META_IDS
    from logitcache.storage.fsutil import sha256_file

    cache = tmp_path / "compact"
    run_teacher(make_config(teacher_dir, data_file, cache, codec="compact"), progress=False)
    path = cache / SHARD
    table = pq.read_table(path)
    deflate, zeros = zlib.compressobj(9), bytes(1 << 20)
    bomb = base64.b64encode(b"".join(deflate.compress(zeros) for _ in range(1024)) + deflate.flush())  # 1 GiB of ids
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, META_IDS: bomb}), path)
    _edit_manifest(cache, _set_shard(1, bytes=path.stat().st_size, sha256=sha256_file(path)))

    report = verify_cache(cache)
    assert any(SHARD in p and "inflates beyond" in p for p in report.problems), report.problems
    with pytest.raises(LogitCacheError, match="inflates beyond"):
        list(LogitCacheDataset(cache, shuffle=False))


def test_a_symlink_loop_in_place_of_a_shard_is_one_line(cache_copy):
    shard = cache_copy / SHARD
    shard.unlink()
    shard.symlink_to(shard.name)  # points at itself

    with pytest.raises(LogitCacheError, match="symlink loop"):
        resolve_inside(cache_copy, SHARD)
    assert any(SHARD in p for p in verify_cache(cache_copy).problems)
    with pytest.raises(LogitCacheError, match="symlink loop"):
        LogitCacheDataset(cache_copy, shuffle=False)
