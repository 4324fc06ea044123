"""`demo`: the main job end to end at toy size, its progress reports and its thread choice."""

from __future__ import annotations

import re

import pytest
import torch

from logitcache.pipeline import demo
from logitcache.pipeline.demo import DemoConfig, cgroup_cpu_limit, configure_threads, usable_cpus


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch):
    """The demo sets torch's thread count for the whole process: give the other tests theirs back."""
    before = torch.get_num_threads()
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")  # restored (unset) after the test
    yield
    torch.set_num_threads(before)


TOY = ["--examples", "24", "--eval-examples", "8", "--teacher-steps", "3", "--student-steps", "2", "--no-progress"]


def _run_demo(out) -> str:
    from typer.testing import CliRunner

    from logitcache.cli import app

    r = CliRunner().invoke(app, ["demo", "--out", str(out), *TOY])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    """The demo at toy size, run once: (its folder, its output)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo") / "demo"
    try:
        yield out, _run_demo(out)
    finally:
        torch.set_num_threads(threads)


def test_demo_runs_end_to_end_at_toy_size(toy_demo):
    """The main job, shrunk: teacher, one cache, every student of the list, the table, and a
    closing line for every stage (teacher training, each student, the evaluation)."""
    out, output = toy_demo
    table = (out / "results.md").read_text().splitlines()
    names = [line.split("|")[1].strip() for line in table[2:]]
    students = [s.name for s in DemoConfig().students]
    assert names == ["teacher", *students]
    assert "OK " in output  # the cache verified
    assert "teacher training: 3/3 steps in " in output
    for i, name in enumerate(students, 1):
        assert re.search(rf"student {i}/{len(students)} {re.escape(name)} \(\w+\): 2/2 steps in \d+:\d\d, loss ", output)
    assert f"held-out eval: {len(students) + 1}/{len(students) + 1} models in " in output
    assert "torch threads: 1 (demo default)" in output


def test_a_rerun_keeps_the_students_and_what_their_training_measured(toy_demo):
    out, _ = toy_demo
    first = (out / "results.md").read_text()
    output = _run_demo(out)
    assert "trained by an earlier run, kept" in output and "steps in" not in output.split("[3/5]")[1].split("[4/5]")[0]
    assert (out / "results.md").read_text() == first  # aligned fraction and train seconds included


def test_default_students_set_sft_beside_every_cross_tokenizer_loss():
    students = DemoConfig().students
    sp = {s.loss for s in students if s.tokenizer == "sp"}
    assert "sft" in sp and len(sp) >= 2
    assert {s.loss for s in students if s.tokenizer == "teacher"} == {"sft", "kl"}
    assert len({s.name for s in students}) == len(students)


def test_student_rows_use_only_losses_that_train_offers():
    from logitcache.pipeline.student.train import LOSSES

    assert {s.loss for s in DemoConfig().students} <= set(LOSSES)


def test_teacher_training_reports_every_step_and_ends_each_text_with_eos():
    from logitcache.pipeline.tiny import TinyModelConfig, build_tiny_model, generate_corpus, train_bpe_tokenizer, train_briefly

    corpus = generate_corpus(40, 0)
    tok = train_bpe_tokenizer(corpus, 300)
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=16, num_layers=1))
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["input_ids"], kwargs["attention_mask"]))
        return forward(*args, **kwargs)

    model.forward = spy
    steps = []
    train_briefly(model, tok, corpus, steps=3, batch_size=4, on_step=lambda step, loss: steps.append((step, loss)))
    assert [s for s, _ in steps] == [1, 2, 3] and all(loss > 0 for _, loss in steps)
    for ids, mask in seen:
        last = mask.sum(1) - 1
        assert (ids[torch.arange(len(ids)), last] == tok.eos_token_id).all()


# --- threads -----------------------------------------------------------------------------------


def _cgroup(tmp_path, cpu_max: str | None, own: str = "/", parent_cpu_max: str | None = None):
    root = tmp_path / "cgroup"
    group = root / own.strip("/")
    group.mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        (group / "cpu.max").write_text(cpu_max + "\n")
    if parent_cpu_max is not None:
        (group.parent / "cpu.max").write_text(parent_cpu_max + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_cgroup_quota_is_read_in_cpus(tmp_path):
    assert cgroup_cpu_limit(*_cgroup(tmp_path, "150000 100000")) == 1.5


def test_cgroup_without_quota_has_no_limit(tmp_path):
    assert cgroup_cpu_limit(*_cgroup(tmp_path, "max 100000")) is None


def test_cgroup_quota_of_a_parent_group_counts(tmp_path):
    root, proc = _cgroup(tmp_path, "max 100000", own="/box/job", parent_cpu_max="200000 100000")
    assert cgroup_cpu_limit(root, proc) == 2.0


def test_cgroup_v1_quota_is_read(tmp_path):
    v1 = tmp_path / "cgroup" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "cgroup", tmp_path / "missing") == 3.0


def test_usable_cpus_is_capped_by_the_quota_not_the_visible_cpus(monkeypatch):
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(demo, "cgroup_cpu_limit", lambda: 2.5)
    assert usable_cpus() == 2


def test_demo_runs_torch_on_one_thread_by_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    line = configure_threads()
    assert torch.get_num_threads() == 1 and "torch threads: 1 (demo default)" in line


def test_demo_threads_follow_omp_num_threads_within_the_usable_cpus(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setattr(demo, "usable_cpus", lambda: 2)
    line = configure_threads()
    assert torch.get_num_threads() == 2 and "(OMP_NUM_THREADS, capped)" in line


def test_demo_threads_option_is_capped_at_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(demo, "usable_cpus", lambda: 1)
    configure_threads(4)
    assert torch.get_num_threads() == 1
