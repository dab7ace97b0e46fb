"""``diffguide bench ...``: benchmarks. ``bench quality``: FID / prompt accuracy / precision-recall
of each guidance setting on the default model (see docs/quality.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError, DiffguideError
from .common import model_option, resolve_model
from .flags import FlagCommand, FlagGroup

bench_app = typer.Typer(
    name="bench",
    cls=FlagGroup,
    help="Benchmarks: guidance quality (FID, prompt accuracy, precision/recall).",
    no_args_is_help=True,
    add_completion=False,
)


@bench_app.callback()
def _bench() -> None:
    """Benchmarks: guidance quality (FID, prompt accuracy, precision/recall)."""


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated numbers, got '{text}'") from None


@bench_app.command("quality", cls=FlagCommand)
def quality(
    model: Annotated[Path | None, model_option("Diffusers model folder.")] = None,
    n: Annotated[
        int | None, typer.Option("--n", help="Images per setting.", show_default="1000; 16 with --quick")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Sampling steps.", show_default="20; 4 with --quick")
    ] = None,
    scheduler: Annotated[
        str, typer.Option("--scheduler", help="Scheduler name (as in 'generate').")
    ] = "euler",
    batch: Annotated[
        int | None, typer.Option("--batch", help="Images per sampling batch.", show_default="100")
    ] = None,
    chunk: Annotated[
        int | None,
        typer.Option(
            "--chunk",
            help="Images per setting per round; reports are rewritten after each round.",
            show_default="100",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (resumable).")] = Path(
        "outputs/bench-quality"
    ),
    quick: Annotated[
        bool, typer.Option("--quick", help="CI mode: 16 images, 4 settings, 4 steps, 40 reference images.")
    ] = False,
    settings: Annotated[
        str | None,
        typer.Option(
            "--settings",
            help="Comma-separated settings, e.g. 'cond/none,cond/cfg3,cond/cfg3+tpg2,uncond/pag2': "
            "<method><scale> parts joined by '+', any method of 'diffguide guides' with a scale.",
            show_default="all default settings",
        ),
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--setting",
            help="One setting, repeatable; parts may be terms in --guide syntax: "
            "'cond/cfg3+slg:scale=3,layers=b1', 'cond/apg:scale=5,eta=0'. Runs after --settings.",
        ),
    ] = None,
    cfg_scales: Annotated[
        str | None, typer.Option("--cfg-scales", help="CFG scales of the CFG-only rows.")
    ] = None,
    combo_cfg: Annotated[
        float | None, typer.Option("--combo-cfg", help="CFG scale of the CFG+PAG / CFG+TPG rows.")
    ] = None,
    pag_scales: Annotated[str | None, typer.Option("--pag-scales", help="PAG scale(s).")] = None,
    tpg_scales: Annotated[str | None, typer.Option("--tpg-scales", help="TPG scale(s).")] = None,
    pag_layers: Annotated[
        str | None, typer.Option("--pag-layers", help="PAG layer spec.", show_default="preset")
    ] = None,
    tpg_layers: Annotated[
        str | None, typer.Option("--tpg-layers", help="TPG layer spec.", show_default="preset")
    ] = None,
    layers: Annotated[
        list[str] | None,
        typer.Option(
            "--layers",
            help="METHOD=SPEC, repeatable: the layer spec of another method's <method><scale> parts, "
            "e.g. 'slg=b1' (diffguide layers).",
        ),
    ] = None,
    ref_per_class: Annotated[
        int | None,
        typer.Option(
            "--ref-per-class",
            help="Reference images per class (20 classes).",
            show_default="100; 2 with --quick",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of image 0 (image i: seed + i).")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads.")] = None,
) -> None:
    """Sample N images per guidance setting and score FID, prompt accuracy, precision/recall.

    Settings: conditional (prompts cycle over the 20 class captions) no guidance, CFG at several scales, PAG, TPG, CFG+PAG, CFG+TPG; unconditional (empty prompt) no guidance, PAG, TPG. CFG is not run unconditionally: with an empty prompt its two predictions are the same. See docs/quality.md.
    """
    from ..bench import quality as q

    chosen = None
    if settings or setting:
        chosen = [q.Setting.parse(s) for s in (settings or "").split(",") if s.strip()]
        chosen += [q.Setting.parse(s) for s in setting or []]
    elif any(v is not None for v in (cfg_scales, combo_cfg, pag_scales, tpg_scales)) or not quick:
        chosen = q.default_settings(
            _floats(cfg_scales, "--cfg-scales") or q.DEFAULT_CFG_SCALES,
            _floats(pag_scales, "--pag-scales") or q.DEFAULT_PAG_SCALES,
            _floats(tpg_scales, "--tpg-scales") or q.DEFAULT_TPG_SCALES,
            q.DEFAULT_COMBO_CFG if combo_cfg is None else combo_cfg,
        )
    path = str(resolve_model(model))
    common: dict[str, Any] = dict(
        n=n,
        steps=steps,
        batch=batch,
        chunk=chunk,
        ref_per_class=ref_per_class,
        settings=chosen,
        scheduler=scheduler,
        seed=seed,
        threads=threads,
        pag_layers=pag_layers,
        tpg_layers=tpg_layers,
        layers=_method_specs(layers),
    )
    if quick:
        opts = q.quick_options(path, out, **common)
    else:
        opts = q.BenchOptions(model=path, out=out, **{k: v for k, v in common.items() if v is not None})
    results = q.run(opts, log=lambda m: typer.echo(m, err=True))
    typer.echo(q.markdown_table(results["settings"]))
    if quick:
        problems = q.check_ranges(results)
        if problems:
            raise DiffguideError("quick check failed: " + "; ".join(problems))
        typer.echo("quick check: all metrics finite and in range")


def _method_specs(values: list[str] | None) -> dict[str, str] | None:
    """``["slg=b1", "seg=mid"]`` -> ``{"slg": "b1", "seg": "mid"}``."""
    if not values:
        return None
    out: dict[str, str] = {}
    for v in values:
        method, eq, spec = v.partition("=")
        if not eq or not method.strip() or not spec.strip():
            raise ConfigError(f"--layers '{v}': expected METHOD=SPEC, e.g. slg=b1")
        if method.strip() in out:
            raise ConfigError(f"--layers: {method.strip()} is given twice")
        out[method.strip()] = spec.strip()
    return out


@bench_app.command("report", cls=FlagCommand)
def report(
    runs: Annotated[list[Path], typer.Argument(help="Out dirs of 'bench quality' runs to merge.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("outputs/bench-report"),
    resamples: Annotated[
        int, typer.Option("--resamples", help="Paired bootstrap resamples per comparison.")
    ] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap draws.")] = 0,
) -> None:
    """Merge runs (same model, steps, seeds, reference) into one table, plot and grids, with
    paired-bootstrap FID differences for each question (PAG / TPG alone and added to CFG,
    conditional and unconditional). See docs/quality.md."""
    from ..bench import quality as q
    from ..bench import report as r

    merged = r.merge(runs, out, resamples=resamples, seed=seed)
    fids = {row["setting"]: row["fid"] for row in merged["settings"]}
    typer.echo(q.markdown_table(merged["settings"]))
    typer.echo("")
    typer.echo(r.comparison_table(merged["comparisons"], fids))
    typer.echo(f"written to {out}", err=True)
