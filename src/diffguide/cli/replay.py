"""``diffguide replay IMAGE.png``: regenerate an image from its manifest; bit-identical or not."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..io import read_manifest
from .common import library_noise_off


def replay_command(
    image: Annotated[Path, typer.Argument(help="A PNG (or JSON sidecar) written by diffguide generate.")],
    model: Annotated[
        str | None, typer.Option(help="Model path, if it moved since the run.", show_default="the manifest's")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Device.", show_default="the manifest's")] = None,
) -> int:
    """Regenerate an image from the manifest in its PNG and report whether the result is
    bit-identical (latents hash and pixels), and if not, the difference.
    Exit code 0 when bit-identical, 1 otherwise."""
    from ..repro.diff import render_report
    from ..repro.replay import load_for_replay, replay

    manifest = read_manifest(image)
    console = Console(highlight=False)
    with library_noise_off():
        pipe = load_for_replay(manifest, model, device)
        report = replay(manifest, pipe, png=image if image.suffix.lower() == ".png" else None)
    for name, (recorded, loaded) in report.model_mismatch.items():
        console.print(f"[yellow]model differs[/yellow]: {name} recorded {recorded}, loaded {loaded}")
    console.print(
        f"image {report.index}: latents hash recorded {report.expected_hash}, replayed {report.actual_hash} "
        f"({report.threads} threads)"
    )
    if report.pixels is not None and not report.pixels.ok:
        render_report(report.pixels, console)
    console.print("[green]bit-identical[/green]" if report.identical else "[red]NOT bit-identical[/red]")
    return 0 if report.identical else 1
