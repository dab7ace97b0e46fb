"""``diffguide comfy run|explain WORKFLOW.json``: run a ComfyUI workflow, or show the run it maps to."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from .flags import FlagCommand, FlagGroup

comfy_app = typer.Typer(
    cls=FlagGroup,
    help="Run ComfyUI workflows (API or UI JSON) with diffguide and get ComfyUI's tensors.",
    no_args_is_help=True,
)

Models = Annotated[
    Path | None,
    typer.Option(
        "--models",
        help="ComfyUI models folder (diffusion_models/, loras/, vae/, text_encoders/, checkpoints/).",
    ),
]
Cond = Annotated[
    list[str] | None,
    typer.Option(
        "--conditioning",
        help="NODE=FILE: ComfyUI-form conditioning (.safetensors) replacing that node's output; repeatable.",
    ),
]


def _overrides(specs: list[str] | None) -> dict[str, Path]:
    out = {}
    for spec in specs or []:
        node, sep, file = spec.partition("=")
        if not sep or not node or not file:
            raise ConfigError(f"--conditioning must be NODE=FILE, got '{spec}'")
        out[node] = Path(file)
    return out


@comfy_app.command("explain", cls=FlagCommand)
def explain(
    workflow: Annotated[Path, typer.Argument(help="Workflow JSON (API or UI format).")],
    models: Models = None,
    conditioning: Cond = None,
) -> None:
    """Print the diffguide run the workflow maps to: model, LoRAs, patches, terms, sigmas, seeds, noise."""
    from ..comfy_workflow import explain as explain_run
    from ..comfy_workflow import load

    run = load(workflow, models, _overrides(conditioning))
    for line in explain_run(run):
        typer.echo(line)


@comfy_app.command("run", cls=FlagCommand)
def run(
    workflow: Annotated[Path, typer.Argument(help="Workflow JSON (API or UI format).")],
    models: Models = None,
    conditioning: Cond = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where to write the latents (.safetensors).")
    ] = Path("comfy-latents.safetensors"),
    config: Annotated[
        str | None, typer.Option("--config", help="Diffusers folder describing a single-file checkpoint.")
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option("--trace", help="Also save a step trace (compare two with 'diffguide diff')."),
    ] = None,
) -> None:
    """Run the workflow; write ComfyUI's LATENT samples (key 'samples') and the manifest next to them."""
    from safetensors.torch import save

    from ..comfy_workflow import execute, load
    from ..io import manifest_json, replace_atomic

    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got '{out}'")
    from ..repro.trace import TraceRecorder, check_trace_path

    if trace is not None:
        check_trace_path(trace)
    wf = load(workflow, models, _overrides(conditioning))
    recorder = TraceRecorder() if trace is not None else None
    result = execute(wf, config=config, callback=recorder)
    manifest = result.result.manifests[0]
    data = save(
        {"samples": result.latents.contiguous()}, metadata={"diffguide_manifest": manifest_json(manifest)}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(out, data)
    replace_atomic(out.with_suffix(".json"), manifest_json(manifest, indent=2))
    if recorder is not None and trace is not None:
        recorder.save(trace, manifest)
    typer.echo(
        f"latents {list(result.latents.shape)} -> {out} ({result.result.forward_calls} model forward calls)"
    )
    if wf.decode_node is not None:
        typer.echo(f"note: node {wf.decode_node} (VAEDecode) not run: diffguide writes the latents only")
