"""``diffguide layers``: the attention units of a model, the presets, and a dry run of a layer spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import DiffguideError
from .common import KINDS, check_spec, library_noise_off, model_option, plural, resolve_model

NETWORKS = ("unet", "transformer")  # the main network's folder in a diffusers model, by family


def load_network(path: Path, config: str | None = None) -> Any:
    """The model's main network (``unet`` or ``transformer``). A diffusers folder: built from its
    config on the meta device (no weights are read, so this is instant for any size). A single
    file: loaded (needs ``config``)."""
    import torch

    if not path.is_dir():
        from ..models.loading import load_pipeline

        with library_noise_off():
            pipe = load_pipeline(path, config=config)
        return next(getattr(pipe, n) for n in NETWORKS if getattr(pipe, n, None) is not None)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise DiffguideError(f"'{path}' is a folder but not a diffusers model (no model_index.json)")
    index = json.loads(index_file.read_text())
    folder = next((n for n in NETWORKS if index.get(n) and (path / n / "config.json").is_file()), None)
    if folder is None:
        raise DiffguideError(
            f"the model '{path}' has no UNet or transformer ('unet' or 'transformer' folder with config.json)"
        )
    entry = index[folder]
    import diffusers

    cls = getattr(diffusers, entry[1], None) if isinstance(entry, list) and len(entry) == 2 else None
    if cls is None:
        raise DiffguideError(f"the model '{path}' has a {folder} of unknown class {entry!r}")
    with torch.device("meta"):
        return cls.from_config(cls.load_config(str(path / folder)))


def _kinds(network: Any) -> dict[str, str]:
    """What each method's layers are (PAG: self-attention on a UNet, joint attention on a DiT)."""
    from ..models.layers import is_dit

    if is_dit(network):
        return {"pag": "attention modules", "tpg": "transformer blocks", "slg": "transformer blocks"}
    return dict(KINDS)


def _perturbation(method: str, spec: str | None) -> Any:
    from ..perturb import BlockSkip, IdentityAttention, TokenShuffle

    if method == "slg":
        return BlockSkip(spec)
    return IdentityAttention(spec) if method == "pag" else TokenShuffle(spec)


def layers(
    model: Annotated[Path | None, model_option()] = None,
    pag: Annotated[
        str | None,
        typer.Option(
            "--pag", metavar="SPEC", help="Print the self-attention modules this PAG layer spec selects."
        ),
    ] = None,
    tpg: Annotated[
        str | None,
        typer.Option(
            "--tpg", metavar="SPEC", help="Print the transformer blocks this TPG layer spec selects."
        ),
    ] = None,
    slg: Annotated[
        str | None,
        typer.Option(
            "--slg",
            metavar="SPEC",
            help="Print the transformer blocks this SLG (block skip) layer spec selects.",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="For a single-file checkpoint: a local diffusers folder of the same architecture.",
        ),
    ] = None,
) -> None:
    """List the attention units (d0, m0, u0, ...; on a transformer the block stacks b0-N, s0-N) and
    the PAG/TPG/SLG presets, or dry-run a layer spec.

    With --pag/--tpg/--slg, the selected fully-qualified module names go to stdout, one per line
    (a header per spec goes to stderr).
    """
    from ..models.layers import unit_table
    from ..models.presets import default_layers

    specs = {
        "pag": check_spec(pag, "--pag"),
        "tpg": check_spec(tpg, "--tpg"),
        "slg": check_spec(slg, "--slg"),
    }
    net = load_network(resolve_model(model), config)
    kinds = _kinds(net)
    if all(spec is None for spec in specs.values()):
        order = {"d": 0, "m": 1, "u": 2}  # down, mid, up; model order within each
        units = sorted(unit_table(net), key=lambda u: order.get(u.alias[0], 3))
        width = max([len(u.name) for u in units] + [len("module")])
        typer.echo(f"{'unit':<5} {'module':<{width}} blocks")
        for u in units:
            typer.echo(f"{u.alias:<5} {u.name:<{width}} {u.blocks}")
        typer.echo("")
        typer.echo("presets (the default layers of each method):")
        for method, kind in kinds.items():
            try:
                preset = default_layers(net, method)  # type: ignore[arg-type]
                count = len(_perturbation(method, None).targets(net))
                typer.echo(f"{method:<5} {preset:<{width}} {count} {plural(count, kind)}")
            except DiffguideError as err:
                typer.echo(f"{method:<5} (none: {err})")
        return
    for method, spec in specs.items():
        if spec is None:
            continue
        names = _perturbation(method, spec).targets(net)
        kind = kinds.get(method, "transformer blocks")
        typer.echo(f"# {method} '{spec}': {len(names)} {plural(len(names), kind)}", err=True)
        for name in names:
            typer.echo(name)
