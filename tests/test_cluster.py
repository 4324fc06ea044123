"""Cluster runs: every example goes to exactly one worker, parts resume, Slurm defaults."""

import json

import pytest
from conftest import assert_same_rows, make_config

from logitcache import LogitCacheError, open_cache, verify_cache
from logitcache.pipeline.teacher.run import TeacherConfig, part_name, run_teacher


def _ids(path):
    return [row["id"] for row in open_cache(path).iter_rows(columns=["id"])]


def test_workers_split_the_data_without_overlap_or_loss(tmp_path, teacher_dir, data_file):
    out = tmp_path / "parts"
    seen = []
    for i in range(3):
        r = run_teacher(make_config(teacher_dir, data_file, out, num_workers=3, worker_index=i), progress=False)
        part = out / part_name(i, 3)
        assert r.out == str(part) and r.complete and verify_cache(part).ok
        m = json.loads((part / "manifest.json").read_text())
        assert m["worker"] == {"index": i, "count": 3} and m["dataset"]["num_records"] == 24
        seen += _ids(part)
    assert sorted(seen) == sorted(f"ex-{i:05d}" for i in range(24))


def test_assignment_is_record_index_modulo_workers(tmp_path, teacher_dir, data_file):
    out = tmp_path / "parts"
    run_teacher(make_config(teacher_dir, data_file, out, num_workers=5, worker_index=2), progress=False)
    assert _ids(out / part_name(2, 5)) == [f"ex-{i:05d}" for i in range(2, 24, 5)]


def test_a_killed_worker_resumes_its_part(tmp_path, teacher_dir, data_file):
    out = tmp_path / "parts"
    first = run_teacher(make_config(teacher_dir, data_file, out, num_workers=2, worker_index=1, limit=10), progress=False)
    assert first.written == 5 and not first.complete
    again = run_teacher(make_config(teacher_dir, data_file, out, num_workers=2, worker_index=1), progress=False)
    assert again.already_done == 5 and again.written == 7 and again.complete


def test_slurm_array_variables_are_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # --array=1-8
    cfg = TeacherConfig(model="m", data="d", out=str(tmp_path))
    assert cfg.worker() == (3, 8)
    assert cfg.out_dir() == tmp_path / "part-00003-of-00008"
    assert TeacherConfig(model="m", data="d", out="o", num_workers=2, worker_index=1).worker() == (1, 2)  # flags win


@pytest.mark.parametrize("count, index", [(3, 3), (3, -1), (0, 0)])
def test_bad_worker_options_are_refused(count, index, tmp_path, teacher_dir, data_file):
    with pytest.raises(LogitCacheError, match="--part-index|--num-parts"):
        run_teacher(make_config(teacher_dir, data_file, tmp_path / "o", num_workers=count, worker_index=index), progress=False)
    assert not (tmp_path / "o").exists()


def test_a_part_refuses_another_split(tmp_path, teacher_dir, data_file):
    out = tmp_path / "parts"
    run_teacher(make_config(teacher_dir, data_file, out, num_workers=2, worker_index=0, limit=4), progress=False)
    # the same directory name cannot come from another split, but a hand-moved part must not mix
    (out / part_name(0, 2)).rename(out / part_name(0, 3))
    with pytest.raises(LogitCacheError, match="worker"):
        run_teacher(make_config(teacher_dir, data_file, out, num_workers=3, worker_index=0), progress=False)


def test_cluster_run_then_merge_equals_a_single_run(tmp_path, teacher_dir, data_file, built_cache):
    """Three workers, `logitcache merge`, `logitcache verify`: the same examples and numbers as one run."""
    from typer.testing import CliRunner

    from logitcache.cli import app

    parts = tmp_path / "parts"
    for i in range(3):
        run_teacher(make_config(teacher_dir, data_file, parts, num_workers=3, worker_index=i), progress=False)
    runner = CliRunner()
    r = runner.invoke(app, ["merge", str(tmp_path / "merged"), str(parts)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(tmp_path / "merged")])
    assert r.exit_code == 0 and r.output.startswith("OK"), r.output
    assert_same_rows(tmp_path / "merged", built_cache)
    m = open_cache(tmp_path / "merged").manifest
    assert m.worker is None and m.status == "complete"


def test_merge_refuses_a_missing_part_in_one_line(tmp_path, teacher_dir, data_file):
    from typer.testing import CliRunner

    from logitcache.cli import app

    parts = tmp_path / "parts"
    for i in (0, 2):
        run_teacher(make_config(teacher_dir, data_file, parts, num_workers=3, worker_index=i), progress=False)
    r = CliRunner().invoke(app, ["merge", str(tmp_path / "merged"), str(parts)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "1" in errors[0] and "missing" in errors[0]
    assert not (tmp_path / "merged" / "manifest.json").exists()


def test_training_on_one_part_says_it_holds_a_share_of_the_data(tmp_path, teacher_dir, data_file, student):
    import subprocess
    import sys

    parts = tmp_path / "parts"
    run_teacher(make_config(teacher_dir, data_file, parts, num_workers=3, worker_index=1), progress=False)

    r = subprocess.run([sys.executable, "-m", "logitcache", "train", "--student", str(student), "--cache",
                        str(parts / part_name(1, 3)), "--out", str(tmp_path / "run"), "--loss", "kl", "--max-steps", "1",
                        "--batch-size", "2", "--no-progress"], capture_output=True, text=True, timeout=300, check=False)

    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert any("part 2 of 3 of a split teacher run" in w and "logitcache merge" in w for w in warnings), r.stderr


def _console(*args, env=None):
    """The real console script, as a user runs it."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "logitcache", *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False, env=env)


def _teacher(teacher_dir, data_file, out, *split):
    return ("teacher", "--model", teacher_dir, "--data", data_file, "--out", out, "--top-k", 8,
            "--prompt-field", "prompt", "--response-field", "response", "--no-progress", *split)


def test_a_part_says_it_is_one_part_and_names_the_merge_command(tmp_path, teacher_dir, data_file):
    parts = tmp_path / "parts"

    r = _console(*_teacher(teacher_dir, data_file, parts, "--num-parts", 4, "--part-index", 1))

    assert r.returncode == 0, r.stderr
    assert f"cache {parts / part_name(1, 4)}: 6 examples" in r.stdout
    assert "part 2 of 4 (about 1/4 of the data), complete" in r.stdout
    assert f"join them into one cache with `logitcache merge MERGED_DIR {parts}`" in r.stdout


def test_the_old_split_flags_still_work_with_a_deprecation_line(tmp_path, teacher_dir, data_file):
    from typer.testing import CliRunner

    from logitcache.cli import app

    parts = tmp_path / "parts"
    args = _teacher(teacher_dir, data_file, parts, "--num-workers", 3, "--worker-index", 2)

    r = CliRunner().invoke(app, [str(a) for a in args])

    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]  # progress lines follow
    assert warnings == [
        "warning: --num-workers is deprecated (it reads as dataloader workers); use --num-parts.",
        "warning: --worker-index is deprecated (it reads as dataloader workers); use --part-index.",
    ]
    assert json.loads((parts / part_name(2, 3) / "manifest.json").read_text())["worker"] == {"index": 2, "count": 3}


def test_the_old_split_flags_are_hidden_from_help():
    from typer.testing import CliRunner

    from logitcache.cli import app

    r = CliRunner().invoke(app, ["teacher", "--help"], env={"COLUMNS": "200"})

    assert "--num-parts" in r.output and "--part-index" in r.output
    assert "--num-workers" not in r.output and "--worker-index" not in r.output
