"""What every command shares: the --debug switch and one-line errors."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, TypeVar

import typer

from logitcache.errors import LogitCacheError

F = TypeVar("F", bound=Callable)


@dataclass
class _State:
    debug: bool = False


state = _State()


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _one_line(message: str) -> str:
    # An error raised in a DataLoader worker arrives as "Caught LogitCacheError in DataLoader
    # worker process 0. Original Traceback ...": the user needs its last line.
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        return last.split("LogitCacheError: ", 1)[-1]
    return message


def user_errors(fn: F) -> F:
    """Print a user's error as one line (exit 2); the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LogitCacheError as e:
            if state.debug:
                raise
            fail(_one_line(str(e)))
        except KeyboardInterrupt:
            if state.debug:
                raise
            typer.echo("interrupted: finished shards are kept; rerun the same command to resume.", err=True)
            raise typer.Exit(130)

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    """transformers/datasets chatter (weight loading bars, split generation) drowns our progress bar."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover - optional niceties
        pass
