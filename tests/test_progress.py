"""Progress of a long stage: a bar on a terminal, plain flushed lines in a log file."""

from __future__ import annotations

import io
import re

import pytest

from logitcache.pipeline.progress import StepProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_plain_lines_with_count_loss_elapsed_and_time_left_when_not_a_terminal():
    out = io.StringIO()
    with StepProgress("teacher training", 10, stream=out, interval=0.0, indent="  ") as p:
        for step in range(1, 11):
            p.update(step, loss=2.0 / step)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # the start, steps 1..9, then the closing line
    assert lines[0] == "  teacher training: 0/10 steps (0%), elapsed 0:00"
    assert re.fullmatch(r"  teacher training: 4/10 steps \(40%\), loss 0\.5, elapsed 0:00, ETA ~0:00", lines[4])
    assert "ETA" not in lines[1]  # no rate is known after the first update
    assert re.fullmatch(r"  teacher training: 10/10 steps in 0:00, loss 0\.2", lines[-1])


def test_progress_prints_at_most_one_line_per_interval():
    out = io.StringIO()
    with StepProgress("student", 1000, stream=out, interval=3600.0) as p:
        for step in range(1, 1001):
            p.update(step, loss=1.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("student: 0/1,000 steps")  # the start, then the end
    assert "1,000/1,000 steps in" in lines[1]


def test_progress_disabled_prints_only_the_closing_line():
    out = io.StringIO()
    with StepProgress("student", 5, stream=out, interval=0.0, enabled=False) as p:
        for step in range(1, 6):
            p.update(step, loss=1.0)
    assert out.getvalue().splitlines() == ["student: 5/5 steps in 0:00, loss 1"]


def test_progress_draws_a_rich_bar_on_a_terminal():
    out = _Terminal()
    with StepProgress("teacher training", 4, stream=out, interval=0.0) as p:
        for step in range(1, 5):
            p.update(step, loss=1.0)
    text = out.getvalue()
    assert "━" in text and "\x1b[" in text  # a drawn bar (ANSI), not plain lines
    assert "teacher training: 2/4 steps (50%)" not in text
    assert text.rstrip().endswith("teacher training: 4/4 steps in 0:00, loss 1")


def test_progress_time_left_ignores_steps_of_an_earlier_run():
    p = StepProgress("student", 100, stream=io.StringIO(), start=90)
    p.update(90)
    p._first = (p._first[0] - 10.0, 90)  # 10 s ago, at step 90
    p.update(95)
    assert p.eta() == pytest.approx(10.0, rel=0.05)  # 5 steps in 10 s, 5 to go


def test_progress_prints_plain_lines_on_a_terminal_when_the_bar_is_off():
    out = _Terminal()
    with StepProgress("teacher", 4, unit="examples", bar=False, stream=out, interval=0.0) as p:
        for done in range(1, 5):
            p.update(done, note="10 tokens")
    lines = out.getvalue().splitlines()
    assert "\x1b[" not in out.getvalue()
    assert lines[2].startswith("teacher: 2/4 examples (50%), 10 tokens, elapsed 0:00")
    assert lines[-1] == "teacher: 4/4 examples in 0:00, 10 tokens"


def test_progress_at_every_update_prints_a_count_only_once():
    out = io.StringIO()
    with StepProgress("teacher", 10, stream=out, interval=0.0) as p:
        p.update(0)
        p.update(0)
    assert out.getvalue().splitlines() == ["teacher: 0/10 steps (0%), elapsed 0:00", "teacher: 0/10 steps in 0:00"]
