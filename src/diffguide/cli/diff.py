"""``diffguide diff A B``: compare two tensor files, or two step traces."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import ConfigError


def diff(
    a: Annotated[
        Path, typer.Argument(help="File to check (.safetensors, .npy, .npz, .pt, .png, or a trace).")
    ],
    b: Annotated[Path, typer.Argument(help="Reference file, of the same kind.")],
    rtol: Annotated[float, typer.Option(help="Relative tolerance (|a-b| <= atol + rtol*|b|).")] = 1e-5,
    atol: Annotated[float, typer.Option(help="Absolute tolerance.")] = 1e-6,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> int:
    """Compare A with the reference B: errors, allclose, where the largest differences are.

    For two traces (diffguide generate --trace), name the first step and tensor where the
    runs diverge beyond tolerance, and print a per-step error table.
    Exit code: 0 within tolerance, 1 beyond it, 2 for bad input.
    """
    if not all(math.isfinite(t) and t >= 0 for t in (rtol, atol)):
        raise ConfigError(f"--rtol and --atol must be finite numbers >= 0, got rtol={rtol}, atol={atol}")
    from ..repro.diff import run_diff_cli
    from ..repro.trace import is_trace, load_trace
    from ..repro.trace_diff import diff_traces, render_trace_diff

    if is_trace(a) and is_trace(b):
        report = diff_traces(load_trace(a), load_trace(b), rtol=rtol, atol=atol)
        if as_json:
            typer.echo(report.to_json())
        else:
            console = Console(file=sys.stdout, highlight=False, width=160)
            console.print(f"comparing trace [bold]{a}[/bold] with reference trace [bold]{b}[/bold]")
            render_trace_diff(report, console)
        return 0 if report.ok else 1
    return run_diff_cli(a, b, rtol, atol, as_json)
