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
            _render_stages(a, b, rtol, atol, console)
        return 0 if report.ok else 1
    return run_diff_cli(a, b, rtol, atol, as_json)


def _render_stages(a: Path, b: Path, rtol: float, atol: float, console: Console) -> None:
    """The stage where the runs part (inputs, model, sampling, guidance, sampler step)."""
    from ..repro.stages import diagnose
    from ..repro.trace import load_trace

    found = diagnose(load_trace(a), load_trace(b), rtol=rtol, atol=atol)
    if not found:
        return
    if found[-1].step is None:  # no tensor differs: settings recorded differently, without effect here
        console.print("the runs' tensors agree; recorded differences without effect:", markup=False)
        for f in found:
            console.print(f"  {f.line()}", markup=False)
        return
    console.print(f"runs part at {found[0].line()}", markup=False)
    for f in found[1:]:
        console.print(f"  also: {f.line()}", markup=False)
