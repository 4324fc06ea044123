"""What every command shares: the --debug switch and one-line errors."""

from __future__ import annotations

import errno
import functools
from dataclasses import dataclass
from typing import Callable, TypeVar

import typer

from logitcache.errors import LogitCacheError

F = TypeVar("F", bound=Callable)

# click's UsageError, from whichever click typer uses (recent typer vendors its own copy).
UsageError = typer.BadParameter.__mro__[1]


@dataclass
class _State:
    debug: bool = False


state = _State()


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def usage_error(e: UsageError) -> None:
    """Print a usage error as one line with the command's --help to turn to (exit 2).

    ``no_args_is_help`` raises a UsageError subclass whose message is the help: shown as it is.
    """
    if type(e).__name__ == "NoArgsIsHelpError":
        raise e
    message = " ".join(e.format_message().split())
    if e.ctx is not None:
        message += f" (see `{e.ctx.command_path} --help`)"
    fail(message, e.exit_code)


def _one_line(message: str) -> str:
    # An error raised in a DataLoader worker arrives as "Caught LogitCacheError in DataLoader
    # worker process 0. Original Traceback ...": the user needs its last line.
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        return last.split("LogitCacheError: ", 1)[-1]
    return message


# Filesystem errors a user causes with a path (or a full disk), and what to do about them.
_PATH_HINTS: dict[type, str] = {
    NotADirectoryError: "part of the path is a file, not a directory; check the path",
    IsADirectoryError: "a directory is where a file belongs; check the path",
    PermissionError: "no permission there; check the path and its permissions",
    FileExistsError: "something is in the way; remove it or choose another path",
    FileNotFoundError: "check the path",
}
_ERRNO_HINTS: dict[int, str] = {
    errno.ENOSPC: "the disk is full; free some space or choose another place, then rerun to resume",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another place, then rerun to resume",
    errno.EROFS: "the filesystem is read-only; choose a writable place",
    errno.ENAMETOOLONG: "use a shorter path",
}


def _path_problem(e: OSError) -> str | None:
    """One line for an OSError that a path or a full disk explains; None for anything else."""
    hint = _ERRNO_HINTS.get(e.errno) or next((h for t, h in _PATH_HINTS.items() if isinstance(e, t)), None)
    if hint is None:
        return None
    what = (e.strerror or type(e).__name__).lower()
    where = f": {e.filename}" if e.filename is not None else ""
    return f"{what}{where}; {hint}."


RESUME_TEACHER = "interrupted: finished shards are kept; rerun the same command to resume."
RESUME_TRAIN = ("interrupted: checkpoints saved in --out are kept; rerun the same command with --resume "
                "to continue from the last one (without it, train refuses an --out that holds checkpoints).")


def user_errors(fn: F | None = None, *, interrupted: str = "interrupted.") -> F:
    """Print a user's error as one line (exit 2); the traceback only with --debug.

    User errors: ``LogitCacheError``, and the filesystem errors a path explains (a file where a
    directory belongs, no permission, a full disk, ...): an ``OSError`` of another kind (an I/O
    error, a lost connection) keeps its traceback. ``interrupted``: the line for Ctrl-C, which
    must tell the way back that this command really takes (exit 130).
    """
    if fn is None:
        return functools.partial(user_errors, interrupted=interrupted)  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LogitCacheError as e:
            if state.debug:
                raise
            fail(_one_line(str(e)))
        except OSError as e:
            hint = _path_problem(e)
            if state.debug or hint is None:
                raise
            fail(hint)
        except KeyboardInterrupt:
            if state.debug:
                raise
            typer.echo(interrupted, err=True)
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
