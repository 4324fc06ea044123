"""What every command shares: the --debug switch and one-line errors."""

from __future__ import annotations

import errno
import functools
import shlex
import signal
import sys
import threading
from contextlib import ExitStack, contextmanager
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


RESUME_TEACHER = "finished shards are kept; rerun the same command to resume."
RESUME_CONVERT = "finished shards are kept; rerun the same command to resume the convert."
RESUME_TRAIN = ("checkpoints saved in --out are kept; rerun the same command with --resume "
                "to continue from the last one (without it, train refuses an --out that holds checkpoints).")


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's pre-emption, `kill`): raised where Ctrl-C's KeyboardInterrupt would be,
    so that it stops as safely (the writers keep what they finished); exit 143, not 130."""


def _terminate(signum, frame) -> None:
    # Slurm follows with SIGKILL after a grace period: a second SIGTERM must not cut short the
    # clean-up that the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextmanager
def _sigterm_stops():
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_by(e: KeyboardInterrupt) -> str:
    """How a run was stopped, as the first words of its last line."""
    return "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"


def command_line(extra: list[str] | None = None) -> str:
    """The command as it was typed (and ``extra`` arguments), quoted for a shell: what to run again to resume."""
    return shlex.join(["logitcache", *sys.argv[1:], *(extra or [])])


def user_errors(fn: F | None = None, *, interrupted: str = "") -> F:
    """Print a user's error as one line (exit 2); the traceback only with --debug.

    User errors: ``LogitCacheError``, and the filesystem errors a path explains (a file where a
    directory belongs, no permission, a full disk, ...): an ``OSError`` of another kind (an I/O
    error, a lost connection) keeps its traceback. Ctrl-C and SIGTERM stop the command the same
    way (exit 130 and 143); ``interrupted`` then tells the way back that this command really
    takes, unless the command put a line of its own in the KeyboardInterrupt.
    """
    if fn is None:
        return functools.partial(user_errors, interrupted=interrupted)  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_stops():
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
        except KeyboardInterrupt as e:
            if state.debug:
                raise
            message = str(e) or interrupted
            typer.echo(f"{stopped_by(e)}: {message}" if message else f"{stopped_by(e)}.", err=True)
            raise typer.Exit(143 if isinstance(e, Terminated) else 130)

    return wrapper  # type: ignore[return-value]


def shard_bytes(shard_size_mb: float) -> int:
    """``--shard-size-mb`` in bytes, or one line refusing a size that is none."""
    import math

    if not (math.isfinite(shard_size_mb) and shard_size_mb > 0):
        raise LogitCacheError(f"--shard-size-mb must be a positive number of MiB (got {shard_size_mb}); the default is 256.")
    return max(1, int(shard_size_mb * 2**20))


def show_defaults(command: Callable, config: type) -> None:
    """Let ``--help`` show, for each option of ``command`` that defaults to None, the default of
    the ``config`` dataclass field of the same name (where it has one that is not None)."""
    import dataclasses
    import inspect

    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    for name, param in inspect.signature(command).parameters.items():
        option = param.default  # typer's OptionInfo, shared with the command that click builds
        if defaults.get(name) is not None and getattr(option, "default", ...) is None:
            value = defaults[name]
            option.show_default = str(value).lower() if isinstance(value, bool) else str(value)


def options_with_config(ctx: typer.Context, path) -> dict:  # noqa: ANN001 (a path)
    """The command's options, with a YAML file's value for each one the command line left out.

    Keys are the option names (``top_k`` or ``top-k``); values are converted as the flag's own
    value would be. An unknown key or a value of the wrong kind is refused in one line, naming
    the file and the key: a key read by nobody is a setting silently lost.
    """
    from logitcache.pipeline.config_file import read_config_mapping

    data = read_config_mapping(path)
    params = {q.name: q for q in ctx.command.params if not getattr(q, "hidden", False) and q.name != "config"}
    values = dict(ctx.params, config=None)
    unknown = sorted(str(k) for k in data if str(k).replace("-", "_") not in params)
    if unknown:
        raise LogitCacheError(f"--config {path}: unknown keys {unknown}; known keys are: {', '.join(params)}.")
    for key, value in data.items():
        name = str(key).replace("-", "_")
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            continue  # the command line wins
        if isinstance(value, list) and not params[name].multiple:  # temperatures: [2, 4] as the flag's "2,4"
            value = ",".join(map(str, value))
        try:
            values[name] = None if value is None else params[name].process_value(ctx, value)
        except typer.BadParameter as e:
            why = getattr(e, "message", None) or e.format_message()
            raise LogitCacheError(f"--config {path}: {key}: {value!r}: {why} (see `--help` for what it takes).") from None
    return values


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


class Stages:
    """Progress of each stage of a command in turn (merge, convert): a bar on a terminal, else a
    line every ``log_every`` seconds (none for a quick run, whose result is its one line).
    ``update(stage, done, total)`` is the ``on_progress`` callback the storage functions take."""

    def __init__(self, command: str, log_every: float) -> None:
        self.command = command
        self.log_every = log_every
        self.stage: str | None = None
        self._stack = ExitStack()

    def update(self, stage: str, done: int, total: int, unit: str = "shards") -> None:
        from logitcache.pipeline.progress import StepProgress

        if stage != self.stage:
            self._stack.close()  # the stage before is over
            self.stage = stage
            self.bar = self._stack.enter_context(
                StepProgress(f"{self.command}, {stage}", total, unit=unit, interval=self.log_every,
                             stream=sys.stderr, ends=False)
            )
        self.bar.update(done)

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)
