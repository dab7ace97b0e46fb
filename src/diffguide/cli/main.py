"""The ``diffguide`` app: one typer group, one small module per command.

To add a command, write ``cli/<name>.py`` with a plain function (typer-annotated options,
docstring = help) and register it below with one line::

    app.command("diff", cls=FlagCommand)(diff.diff)

(``FlagCommand``: flags show no ``<bool>`` placeholder in the help.) A command with subcommands
is a ``typer.Typer(cls=FlagGroup)`` in its module, added with
``app.add_typer(bench.app, name="bench")``. Import shared helpers (model path, device, dtype,
windows, layer specs) from :mod:`.common`. Import torch, diffusers and every diffguide module
that loads them inside the command function, never at module level: ``diffguide --help`` must
not load them (``tests/test_startup.py``).

Errors: a :class:`~diffguide.errors.DiffguideError` raised anywhere in a command, and every
usage error (bad option value, unknown option), is printed as ONE line ``error: <message>``
on stderr with exit code 2, without a traceback. Any other exception propagates unchanged.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from .. import __version__
from ..errors import DiffguideError
from . import check, diff, generate, guides, layers, replay, serve
from .bench import bench_app
from .flags import FlagCommand, FlagGroup
from .guard import Interrupted, exit_now_if_abandoned, interrupted, one_line_warnings, signals_raise

EXIT_USAGE = 2

# Usage errors: typer >= 0.2x vendors click (its errors derive from typer.TyperException);
# older typer raises click's own ClickException.
_USAGE_ERRORS: tuple[type[Exception], ...] = ()
with contextlib.suppress(ImportError):
    from typer import TyperException

    _USAGE_ERRORS += (TyperException,)
with contextlib.suppress(ImportError):
    import click

    _USAGE_ERRORS += (click.ClickException,)


def one_line(message: str) -> str:
    return " ".join(message.split())


def fail(message: str) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)


class DiffguideGroup(FlagGroup):
    """A typer group whose user-facing errors are one line on stderr (exit code 2)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = 0
        try:
            with signals_raise(), one_line_warnings():  # SIGTERM unwinds like Ctrl-C: no temp files left
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except Interrupted as err:
            fail(str(err))
            code = 128 + err.signum
            if standalone_mode:
                exit_now_if_abandoned(code)
        except DiffguideError as err:
            fail(str(err))
            code = EXIT_USAGE
        except _USAGE_ERRORS as err:  # bad option values, unknown options, missing command
            ctx = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
                typer.echo(ctx.get_help())
            else:
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                fmt = getattr(err, "format_message", None)
                message = fmt() if callable(fmt) else str(err)
                fail(message.replace("Value error, ", "") + hint)  # typer's enum wording
            code = getattr(err, "exit_code", EXIT_USAGE)
        except typer.Abort:
            fail("aborted")
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:  # before click turns it into Abort (and a bare newline)
            raise interrupted(err) from None


app = typer.Typer(
    name="diffguide",
    cls=DiffguideGroup,
    help="Guided sampling for diffusion models: CFG, PAG and TPG in one batched forward, with manifests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def print_version(value: bool) -> None:
    if value:
        typer.echo(f"diffguide {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Guided sampling for diffusion models: CFG, PAG and TPG in one batched forward, with manifests."""


def version() -> None:
    """Print the version."""
    print_version(True)


app.command("generate", cls=FlagCommand)(generate.generate)
app.command("layers", cls=FlagCommand)(layers.layers)
app.command("guides", cls=FlagCommand)(guides.guides)
app.command("diff", cls=FlagCommand)(diff.diff)
app.command("replay", cls=FlagCommand)(replay.replay_command)
app.command("check-determinism", cls=FlagCommand)(check.check_determinism)
app.add_typer(bench_app, name="bench")
app.command("serve", cls=FlagCommand)(serve.serve)
app.command("version", cls=FlagCommand)(version)


if __name__ == "__main__":  # pragma: no cover
    app()
