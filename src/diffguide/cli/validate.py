"""``diffguide validate``: validation samples of a saved checkpoint (thin over sample_validation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DType, model_option, resolve_device, resolve_model


def validate(
    prompts: Annotated[
        Path,
        typer.Option("--prompts", help="Prompt file: YAML, JSON, or plain text with one prompt per line."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder; images go to step-NNNNNN/ under it.")
    ],
    model: Annotated[Path | None, model_option()] = None,
    step: Annotated[int, typer.Option("--step", min=0, help="Training step the checkpoint belongs to.")] = 0,
    family: Annotated[
        str | None, typer.Option("--family", help="Row of the family defaults table (default: the model's).")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = None,
    dtype: Annotated[DType, typer.Option("--dtype", help="Model dtype.")] = DType.float32,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch intra-op threads.")] = None,
) -> None:
    """Sample every prompt and seed of a prompt file with a saved checkpoint, as a training run's
    validation would (docs/validation.md); prints the step folder and the grids."""
    from .. import app
    from ..validation import sample_validation
    from ..validation.prompts import load_prompts

    pset = load_prompts(prompts)  # a bad file fails before the model loads
    req = app.ModelRequest(str(resolve_model(model)), DType(dtype).value, resolve_device(device))
    pipe = app.load_model(req)
    app.set_threads(pipe, threads)
    result = sample_validation(pipe, pset, step=step, out_dir=out, family=family)
    typer.echo(str(result.folder))
    typer.echo(str(result.grid))
    for path in result.step_grids.values():
        typer.echo(str(path))
