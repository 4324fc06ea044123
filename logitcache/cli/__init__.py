"""The `logitcache` command line: one module per command group, thin over pipeline/storage."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from logitcache.cli import cache as _cache
from logitcache.cli import convert as _convert
from logitcache.cli import copy as _copy
from logitcache.cli import demo as _demo
from logitcache.cli import evaluate as _evaluate
from logitcache.cli import merge as _merge
from logitcache.cli import teacher as _teacher
from logitcache.cli import train as _train
from logitcache.cli.common import UsageError, state, usage_error


class _Group(TyperGroup):
    """Usage errors that click finds while parsing (a missing option, ``--top-k abc``) become one
    ``error:`` line, like every other error, instead of a boxed usage panel."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as e:
            usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as e:  # the command's own options are parsed in here
            usage_error(e)


app = typer.Typer(
    cls=_Group,
    name="logitcache",
    help=(
        "Offline teacher-logit cache for LLM knowledge distillation.\n\n"
        "Stage 1: `logitcache teacher` runs a teacher once and stores its top-k log-probabilities "
        "with character offsets (split over a cluster with --num-parts, joined by `merge`); `inspect` "
        "and `verify` look into a cache, `convert` rewrites it with another codec, `copy` (`push`, `pull`) moves it "
        "between disks, object storage and the Hub. Stage 2: `logitcache train` "
        "distils the cache into a student with any tokenizer; `eval` compares models per character. "
        "`demo` runs the whole thing on tiny models built on the spot."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        import logitcache

        typer.echo(f"logitcache {logitcache.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    # Eager: it answers before click asks for the command that a bare `logitcache --version` lacks.
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    state.debug = debug
    from logitcache.pipeline.allocator import retain_freed_memory

    retain_freed_memory()  # CPU steps reuse their big blocks instead of faulting them in again


app.command("teacher")(_teacher.teacher)
app.command("inspect")(_cache.inspect)
app.command("verify")(_cache.verify)
app.command("merge")(_merge.merge)
app.command("convert")(_convert.convert)
app.command("copy")(_copy.copy)
app.command("push")(_copy.push)
app.command("pull")(_copy.pull)
app.command("train")(_train.train)
app.command("eval")(_evaluate.eval_)
app.command("demo")(_demo.demo)


def main() -> None:
    app()
