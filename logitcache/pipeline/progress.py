"""Progress of a long stage, readable on a terminal and in a log file alike.

A job under Slurm or nohup writes its output to a file: a rich bar there shows nothing until
the end, so off a terminal (or with the bar switched off) a plain line is printed and flushed
every few seconds instead.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

from logitcache.errors import LogitCacheError


def clock(seconds: float) -> str:
    """Seconds as m:ss (h:mm:ss from an hour)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def check_log_every(seconds: float | None) -> None:
    """Refuse a --log-every that is no interval (negative, NaN, infinite); None is no progress at all."""
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise LogitCacheError(f"--log-every must be 0 or more seconds (got {seconds}); 0 logs at every step.")


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (a closed or file-less stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_enabled(requested: bool = True) -> bool:
    """Whether progress is shown: asked for, and not switched off by LOGITCACHE_NO_PROGRESS."""
    return requested and not os.environ.get("LOGITCACHE_NO_PROGRESS")


class StepProgress:
    """Progress of one long stage: done / total, loss or a note, elapsed time and time left.

    On a terminal: a rich progress bar (unless ``bar`` is False). Anywhere else (a log file, a
    pipe, CI): a line when the stage starts, then one at most every ``interval`` seconds (0: at
    every update), so a log never stays silent for long. Disabled: nothing until the end.
    Always: one closing line with the count, the time taken and the last loss or note; unless
    ``silent``, for a caller that reports progress its own way. Without ``ends``, neither the
    opening nor the closing line: a quick run stays quiet, a long one still logs.
    The time left is estimated from the rate since the first update, so set-up before the first
    step (imports, building a tokenizer) and steps an earlier run did (a resumed stage starts at
    ``start``) do not distort it.
    """

    def __init__(self, label: str, total: int, *, unit: str = "steps", enabled: bool = True, bar: bool = True,
                 interval: float = 5.0, stream: TextIO | None = None, start: int = 0, indent: str = "",
                 silent: bool = False, ends: bool = True) -> None:
        self.label, self.total, self.unit, self.interval, self.indent = label, total, unit, interval, indent
        self.stream = stream if stream is not None else sys.stdout
        self.enabled, self.bar, self.silent, self.ends = enabled and not silent, bar, silent, ends
        self.start = self.done = start
        self.loss: float | None = None
        self.note = ""
        self.t0 = self.last_print = time.perf_counter()
        self._first: tuple[float, int] | None = None  # (time, done) of the first update
        self._shown: int | None = None  # done, as the last plain line showed it
        self._bar = None
        self._task = None

    def __enter__(self) -> "StepProgress":
        self.t0 = self.last_print = time.perf_counter()
        if not self.enabled:
            return self
        if self.bar and is_terminal(self.stream):
            from rich.console import Console
            from rich.markup import escape
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(f"{self.indent}[bold]{escape(self.label)}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.start, info="")
        elif self.ends:  # a log shows at once that the stage began, and from where
            self._print(self.line())
        return self


    def update(self, done: int, loss: float | None = None, note: str = "", total: int | None = None) -> None:
        """``done`` of ``total`` (which a stage that learns its size late may give here)."""
        if total is not None:
            self.total = total
        if self._first is None:
            self._first = (time.perf_counter(), done)
        self.done = done
        if loss is not None:
            self.loss = loss
        if note:
            self.note = note
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total, info=self._info())
            return
        now = time.perf_counter()
        if now - self.last_print >= self.interval and done != self._shown and done < self.total:
            self.last_print = now
            self._print(self.line())

    def _info(self, sep: str = "  ") -> str:
        parts = [f"loss {self.loss:.4g}"] if self.loss is not None else []
        if self.note:
            parts.append(self.note)
        return sep.join(parts)

    def eta(self) -> float | None:
        """Seconds left at the rate since the first update; None before the first step."""
        if self._first is None:
            return None
        t_first, done_first = self._first
        ran = self.done - done_first
        if ran <= 0:
            return None
        return (time.perf_counter() - t_first) / ran * max(self.total - self.done, 0)

    def line(self) -> str:
        """The plain progress line: `label: 1,200/6,000 steps (20%), loss 2.31, elapsed 0:12, ETA ~0:48`."""
        parts = [f"{self.indent}{self.label}: {self.done:,}/{self.total:,} {self.unit}"
                 + (f" ({self.done / self.total:.0%})" if self.total else "")]
        info = self._info(", ")
        if info:
            parts.append(info)
        parts.append(f"elapsed {clock(time.perf_counter() - self.t0)}")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA ~{clock(eta)}")
        return ", ".join(parts)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None
        if exc_type is None and self.ends:
            info = self._info(", ")
            self._print(f"{self.indent}{self.label}: {self.done:,}/{self.total:,} {self.unit} in {clock(time.perf_counter() - self.t0)}"
                        + (f", {info}" if info else ""))

    def _print(self, text: str) -> None:
        self._shown = self.done
        if not self.silent:
            print(text, file=self.stream, flush=True)


def trainer_progress(progress: StepProgress, *, owns: bool = False):  # noqa: ANN201 (a TrainerCallback)
    """A transformers TrainerCallback that feeds ``progress``: the global step, the last logged loss.

    ``owns``: the callback opens ``progress`` when training begins (its total is known only then)
    and closes it when training ends; else the caller holds it open around the training.
    """
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            progress.total = state.max_steps or progress.total
            progress.start = progress.done = state.global_step
            if owns:
                progress.__enter__()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003
            if logs and "loss" in logs:
                progress.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            progress.update(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if owns:
                progress.__exit__(None, None, None)

    return _Callback()
